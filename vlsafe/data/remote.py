"""Shards and their index read over `http(s)://` (and `s3://` through an HTTP endpoint) with bounded waits.

On object storage a shard is one long GET, and networks drop connections and servers stall. A read must neither hang
nor end a shard early without saying so. `RemoteShardReader` is the file object the tar parser reads from:

- every wait is bounded: one connect or read waits at most `read_timeout`, and all of one shard's network waits
  together (connecting, reading, backing off between attempts) at most `timeout`. Time the consumer spends between
  reads does not count, so a shard that training consumes slowly for an hour is not a failure;
- a dropped, reset or stalled transfer is retried with exponential backoff, resuming with an HTTP Range request from
  the byte reached (checked against `Content-Range` and the `ETag`); where the server ignores Range, the shard is read
  again from its start and the bytes already delivered are skipped (checked by CRC-32 against what was delivered);
- a transfer of known length (`Content-Length`, `Content-Range`) that ends early is a drop, never an end of file
  (http.client itself returns a silent short read there);
- it gives up with `ShardReadError`, naming the url and the bytes read, after `retries` failed attempts in a row, on
  an HTTP status that retrying cannot fix, when the shard changed while being read, or when `timeout` is spent.

Requests are plain unsigned GETs (stdlib `http.client`, no proxy): a public bucket, an endpoint inside the cluster, or
presigned urls written into `index.json`. See docs/data_performance.md, "Shards from an object store".
"""
from __future__ import annotations

import http.client
import io
import logging
import os
import re
import ssl
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Environment variables that give the endpoint `s3://bucket/key` maps to, first set wins.
S3_ENDPOINT_ENV = ("VLSAFE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
#: Statuses a later attempt may not get (overload, throttling, gateway trouble); any other error status is final.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class ShardReadError(OSError):
    """A remote shard or index could not be read completely; says which url and how many bytes had arrived.

    An `OSError`, so `ShardDataModule(on_error="skip")` counts the shard's unread samples as skipped (and reports
    them) instead of stopping, as for a missing or truncated local shard."""

    def __init__(self, message: str, url: str = "", bytes_read: int = 0):
        super().__init__(message)
        self.message, self.url, self.bytes_read = message, url, bytes_read

    def __str__(self) -> str:  # webdataset appends context to `args`; the message stays the message
        return self.message

    def __reduce__(self):
        return type(self), (self.message, self.url, self.bytes_read)


class RemoteNotFoundError(ShardReadError, FileNotFoundError):
    """HTTP 404 (S3 also answers 403 for a missing key when listing is not allowed)."""


@dataclass(frozen=True)
class RemoteReadPolicy:
    """How shards and indexes at `http(s)://` and `s3://` urls are read (recipe key `data.init_args.remote`).

    Args:
        timeout: seconds one shard (or index) may spend waiting on the network in all: connecting, reading and
            backing off, over all its attempts. Time the consumer spends between reads does not count.
        read_timeout: seconds one connect or read may wait for a byte before the attempt counts as stalled.
        retries: failed attempts in a row retried before `ShardReadError`. An attempt that delivered new bytes before
            failing restarts the count, so a long-lived stream whose idle connection a server closed while training
            consumed the shard slowly is not taken for a failing store (`timeout` still bounds the whole shard).
        backoff: seconds before the first retry; doubled for each further failure in a row, up to `backoff_max`.
        backoff_max: the longest wait between two attempts.
        s3_endpoint: base url `s3://bucket/key` maps to, as `<endpoint>/bucket/key` (path style, unsigned requests);
            None: the first of VLSAFE_S3_ENDPOINT, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL that is set.
    """

    timeout: float = 600.0
    read_timeout: float = 60.0
    retries: int = 5
    backoff: float = 1.0
    backoff_max: float = 30.0
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        for name in ("timeout", "read_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"remote read policy: {name} must be > 0 seconds, got {getattr(self, name)!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"remote read policy: retries must be a whole number >= 0, got {self.retries!r}")
        if not 0 <= self.backoff <= self.backoff_max:
            raise ValueError(f"remote read policy: need 0 <= backoff <= backoff_max, got {self.backoff!r} and "
                             f"{self.backoff_max!r}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` failed attempts in a row."""
        return min(self.backoff * 2 ** (failures - 1), self.backoff_max)


def as_policy(policy: RemoteReadPolicy | dict | None) -> RemoteReadPolicy:
    """A policy from a policy, a recipe dict or None (the defaults)."""
    if policy is None:
        return RemoteReadPolicy()
    return RemoteReadPolicy(**policy) if isinstance(policy, dict) else policy


def is_http_url(url: str) -> bool:
    """True for the urls this module reads: `http://`, `https://` and `s3://`."""
    return urlsplit(str(url)).scheme in ("http", "https", "s3")


def http_url(url: str, policy: RemoteReadPolicy | None = None) -> str:
    """The HTTP(S) url to GET for `url`; `s3://bucket/key` becomes `<endpoint>/bucket/key`."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        return url
    endpoint = (policy.s3_endpoint if policy is not None else None) or next(
        (os.environ[name] for name in S3_ENDPOINT_ENV if os.environ.get(name)), None)
    if not endpoint:
        raise ShardReadError(f"cannot read {url}: s3:// urls are read through an HTTP endpoint; set one with "
                             f"data.init_args.remote.s3_endpoint or the {S3_ENDPOINT_ENV[0]} environment variable "
                             f"(e.g. https://s3.us-east-1.amazonaws.com), or write https:// urls", url)
    if not parts.netloc:
        raise ShardReadError(f"cannot read {url}: no bucket name", url)
    return f"{endpoint.rstrip('/')}/{parts.netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def read_remote_bytes(url: str, policy: RemoteReadPolicy | None = None) -> bytes:
    """The whole object at `url` (an `index.json`), under the same timeout and retry policy as shards."""
    with RemoteShardReader(url, policy) as reader:
        return reader.readall()


def open_remote_shard(url: str, policy: RemoteReadPolicy | None = None,
                      buffer_size: int = 1 << 18) -> io.BufferedReader:
    """A buffered, retrying, time-bounded stream of the shard at `url` (close it when done)."""
    return io.BufferedReader(RemoteShardReader(url, policy), buffer_size)


class RemoteShardReader(io.RawIOBase):
    """The bytes of one remote object, read front to back over as many HTTP attempts as the policy allows.

    `retries_done` counts the attempts made after a failure; `waited` the seconds spent waiting on the network."""

    def __init__(self, url: str, policy: RemoteReadPolicy | None = None):
        super().__init__()
        self.url = str(url)  # as the index names it (an s3:// url stays one in messages)
        self.policy = as_policy(policy)
        self._target = http_url(self.url, self.policy)
        self.position = 0  # bytes delivered to the caller
        self.total: int | None = None  # the object's length, once a response told it
        self.retries_done = 0
        self.waited = 0.0
        self._crc = 0  # CRC-32 of the delivered bytes: checks a restart that re-reads them
        self._etag: str | None = None
        self._failures = 0  # failed attempts in a row
        self._attempt_start = 0
        self._conn: http.client.HTTPConnection | None = None
        self._sock = None
        self._response: http.client.HTTPResponse | None = None
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._eof or not len(buffer):
            return 0
        while True:
            try:
                if self._response is None:
                    self._connect()
                data = self._wait(lambda: self._response.read1(len(buffer)))  # one recv: bytes now, not later
            except ShardReadError:
                self._drop()
                raise
            except (OSError, http.client.HTTPException) as err:  # reset, timeout, refused, truncated chunk, 5xx
                self._fail(err)
                continue
            n = len(data)
            if n == 0:
                if self.total is not None and self.position < self.total:
                    self._fail(ConnectionError(f"the connection closed after byte {self.position} of {self.total}"))
                    continue
                self._eof = True
                self._drop()
                return 0
            buffer[:n] = data
            self._crc = zlib.crc32(data, self._crc)
            self.position += n
            return n

    def close(self) -> None:
        self._drop()
        super().close()

    # ------------------------------------------------------------------ attempts
    def _remaining(self) -> float:
        return self.policy.timeout - self.waited

    def _wait(self, call: Callable[[], T]) -> T:
        """Run one network call with the socket timeout cut to what is left of the shard's time budget."""
        remaining = self._remaining()
        if remaining <= 0:
            raise self._error(f"no data within its time budget (data.remote.timeout = {self.policy.timeout:g} s of "
                               f"waiting on the network)")
        if self._sock is not None:
            self._sock.settimeout(min(self.policy.read_timeout, remaining))
        started = time.monotonic()
        try:
            return call()
        finally:
            self.waited += time.monotonic() - started

    def _error(self, why: str, cls: type[ShardReadError] = ShardReadError) -> ShardReadError:
        of = f" of {self.total}" if self.total is not None else ""
        target = f" (GET {self._target})" if self._target != self.url else ""
        return cls(f"cannot read shard {self.url}{target}: {why}; {self.position}{of} bytes read, "
                   f"{self.retries_done} retries, {self.waited:.1f} s waited", self.url, self.position)

    def _fail(self, err: BaseException) -> None:
        """A failed attempt: back off and let the caller reconnect, or raise `ShardReadError` if the policy is spent."""
        self._drop()
        self._failures = 1 if self.position > self._attempt_start else self._failures + 1
        if self._remaining() <= 0:
            raise self._error(f"gave up when its time budget ran out (data.remote.timeout = {self.policy.timeout:g} s "
                              f"of waiting on the network); last error: {_describe(err)}") from err
        if self._failures > self.policy.retries:
            raise self._error(f"{self._failures} attempt(s) in a row failed (data.remote.retries = "
                              f"{self.policy.retries}); last error: {_describe(err)}") from err
        delay = min(self.policy.delay(self._failures), self._remaining())
        log.warning("reading shard %s failed at byte %d (%s); retry %d in %.2f s", self.url, self.position,
                    _describe(err), self.retries_done + 1, delay)
        time.sleep(delay)
        self.waited += delay
        self.retries_done += 1

    def _connect(self) -> None:
        """Open an attempt at `position`: a Range request after the first bytes, following redirects."""
        self._attempt_start = self.position
        headers = {"Accept-Encoding": "identity", "User-Agent": "vlsafe"}
        if self.position:
            headers["Range"] = f"bytes={self.position}-"
            if self._etag and not self._etag.startswith("W/"):
                headers["If-Range"] = self._etag  # changed since: the server sends it whole, the CRC check decides
        url = self._target
        for _ in range(_MAX_REDIRECTS + 1):
            response = self._request(url, headers)
            location = response.getheader("Location")
            if response.status not in _REDIRECTS or not location:
                break
            self._drop()
            url = urljoin(url, location)
        else:
            raise self._error(f"more than {_MAX_REDIRECTS} redirects")
        self._accept(response)

    def _request(self, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        parts = urlsplit(url)
        timeout = min(self.policy.read_timeout, max(self._remaining(), 1e-3))
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=timeout, context=ssl.create_default_context())
        elif parts.scheme == "http":
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        else:
            raise self._error(f"unsupported url scheme {parts.scheme!r}")
        self._conn = conn
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._wait(lambda: conn.request("GET", path, headers=headers))
        self._sock = conn.sock  # the response keeps reading from it after the connection hands it over
        self._response = self._wait(conn.getresponse)
        return self._response

    def _accept(self, response: http.client.HTTPResponse) -> None:
        """Check the response continues the bytes delivered so far; skip them when the server sent it whole."""
        status = response.status
        if status in RETRYABLE_STATUS:
            raise ConnectionError(f"HTTP {status} {response.reason}")
        if status == 404:
            raise self._error(f"HTTP 404 {response.reason}: no such object", RemoteNotFoundError)
        if status not in (200, 206):
            hint = (" (an expired presigned url, or a private bucket: s3:// urls are read unsigned)"
                    if status == 403 else "")
            raise self._error(f"HTTP {status} {response.reason}{hint}")
        etag = response.getheader("ETag")
        if self._etag and etag and etag != self._etag:
            raise self._error(f"it changed while being read (ETag {self._etag} became {etag})")
        self._etag = self._etag or etag
        if status == 206:
            match = _CONTENT_RANGE.fullmatch((response.getheader("Content-Range") or "").strip())
            if match is None or int(match.group(1)) != self.position:
                raise self._error(f"asked for bytes from {self.position}, the server sent Content-Range "
                                  f"{response.getheader('Content-Range')!r}")
            self._check_total(None if match.group(3) == "*" else int(match.group(3)))
            return
        length = response.getheader("Content-Length")
        self._check_total(int(length) if length and length.isdigit() else None)
        if self.position:
            self._skip_delivered()

    def _check_total(self, total: int | None) -> None:
        if total is not None and self.total is not None and total != self.total:
            raise self._error(f"it changed while being read (its length was {self.total}, now {total})")
        self.total = total if total is not None else self.total

    def _skip_delivered(self) -> None:
        """The server ignored Range: read the bytes already delivered again and check they are the same."""
        crc, left = 0, self.position
        while left:
            data = self._wait(partial(self._response.read1, min(left, 1 << 16)))
            if not data:
                raise ConnectionError(f"the connection closed while re-reading byte {self.position - left} of the "
                                      f"{self.position} already delivered")
            crc = zlib.crc32(data, crc)
            left -= len(data)
        if crc != self._crc:
            raise self._error("it changed while being read (the bytes already delivered read differently on a retry)")

    def _drop(self) -> None:
        """Close the current attempt's connection (a half-read response cannot be reused)."""
        response, conn = self._response, self._conn
        self._response = self._conn = self._sock = None
        for thing in (response, conn):
            if thing is not None:
                try:
                    thing.close()
                except OSError:
                    pass  # the connection is already broken; nothing more to release


def _describe(err: BaseException) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
