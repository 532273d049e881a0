"""`Batcher`: concurrent requests -> one batched model call, behind a bounded queue.

A request waits in the queue until the worker takes it. The worker takes the oldest request, then waits until
the batch is full (`max_batch_size`) or the oldest request has waited `max_wait_ms`, and runs `process` on the
whole batch once; while it runs, new requests queue up for the next batch. A full queue refuses at once
(`QueueFull`, a 429), a closing batcher refuses new work (`ShuttingDown`, a 503) but finishes what is queued,
and a request that outlives its timeout is answered `RequestTimeout` (504) and dropped from any batch that has
not started yet.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: `process(payloads)` returns one result per payload; an Exception in the list fails only its own request
Process = Callable[[Sequence[Any]], Awaitable[Sequence[Any]]]


class QueueFull(Exception):
    """The queue holds `max_queue` requests already."""


class ShuttingDown(Exception):
    """The server is closing and takes no new requests."""


class RequestTimeout(Exception):
    """The request was not answered within its timeout."""


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int = 8       # requests per model call
    max_wait_ms: float = 10.0     # how long the oldest request may wait for the batch to fill
    max_queue: int = 64           # requests waiting (not counting the batch being run); more -> 429
    timeout_s: float = 120.0      # per request, from arrival to answer; longer -> 504

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError(f"invalid batch settings {self}: sizes must be >= 1, times positive")


@dataclass
class _Job:
    payload: Any
    future: asyncio.Future
    arrived: float
    abandoned: bool = False


@dataclass
class BatchStats:
    """Counters for /health and the tests: how requests fared and how large batches were."""

    served: int = 0
    batches: int = 0
    largest_batch: int = 0
    queue_full: int = 0
    timed_out: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"served": self.served, "batches": self.batches, "largest_batch": self.largest_batch,
                "queue_full": self.queue_full, "timed_out": self.timed_out,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


class Batcher:
    """Collects requests into batches for `process`; `start()`/`close()`/`drain()` run inside the server's loop."""

    def __init__(self, process: Process, settings: BatchSettings = BatchSettings()):
        self.process, self.settings = process, settings
        self.stats = BatchStats()
        self._pending: collections.deque[_Job] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.closing = False

    @property
    def queued(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="vlsafe-batcher")

    async def submit(self, payload: Any, timeout_s: float | None = None) -> Any:
        """Queue `payload` and wait for its result (raises QueueFull, ShuttingDown, RequestTimeout or the
        payload's own exception)."""
        if self.closing or self._worker is None:
            raise ShuttingDown("the server is shutting down")
        if len(self._pending) >= self.settings.max_queue:
            self.stats.queue_full += 1
            raise QueueFull(f"the queue is full ({self.settings.max_queue} requests waiting)")
        loop = asyncio.get_running_loop()
        job = _Job(payload, loop.create_future(), time.monotonic())
        self._pending.append(job)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future),
                                          self.settings.timeout_s if timeout_s is None else timeout_s)
        except asyncio.TimeoutError:  # noqa: UP041 (on Python 3.10 it is not the builtin TimeoutError)
            job.abandoned = True
            self.stats.timed_out += 1
            limit = self.settings.timeout_s if timeout_s is None else timeout_s
            raise RequestTimeout(f"no answer within {limit:g} s") from None
        finally:
            job.abandoned = job.abandoned or not job.future.done()  # e.g. the client went away

    def close(self) -> None:
        """Refuse new requests from now on; queued ones are still answered (see `drain`)."""
        self.closing = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def drain(self, grace_s: float = 30.0) -> None:
        """Close, let the worker answer what is queued for up to `grace_s`, then fail the rest with ShuttingDown."""
        self.close()
        if self._worker is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._worker), grace_s)
        except asyncio.TimeoutError:  # noqa: UP041 (on Python 3.10 it is not the builtin TimeoutError)
            self._worker.cancel()
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server shut down before this request ran"))

    async def _next_batch(self) -> list[_Job]:
        """Wait for the first job, then for more until the batch is full or the oldest job's wait is over."""
        while not self._pending:
            if self.closing:
                return []
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._pending[0].arrived + self.settings.max_wait_ms / 1000
        while len(self._pending) < self.settings.max_batch_size and not self.closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)  # losing an Event.wait loses nothing
            except asyncio.TimeoutError:  # noqa: UP041 (on Python 3.10 it is not the builtin TimeoutError)
                break
        size = min(self.settings.max_batch_size, len(self._pending))
        return [self._pending.popleft() for _ in range(size)]

    async def _run(self) -> None:
        while True:
            batch = [job for job in await self._next_batch() if not job.abandoned and not job.future.done()]
            if not batch:
                if self.closing and not self._pending:
                    return
                continue
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            self.stats.batch_sizes[len(batch)] += 1
            try:
                results = list(await self.process([job.payload for job in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"process returned {len(results)} results for {len(batch)} requests")
            except Exception as err:  # one failed model call fails its batch, never the server
                log.exception("a batch of %d requests failed", len(batch))
                results = [err] * len(batch)
            for job, result in zip(batch, results):
                if job.future.done() or job.abandoned:  # its client has had its 504 already
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    self.stats.served += 1
                    job.future.set_result(result)
