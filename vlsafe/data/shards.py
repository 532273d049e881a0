"""WebDataset shard I/O for `Sample` records, plus the `index.json` that makes epochs plannable.

A shard member is `<key>.json` (the sample's metadata), `<key>.img<i>.<ext>` (encoded image bytes, as
read from disk) and `<key>.mask<i>.png`. Nothing is pickled. Keys are zero-padded sequence numbers, so
ids with dots or slashes never reach a tar member name and the order is deterministic.

The index lists every shard with its sample count. Counts let every rank and dataloader worker compute
the same epoch plan without reading the data (see `vlsafe.data.plan`).
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from vlsafe.data.images import image_header_size, inspect_image
from vlsafe.data.remote import (
    RemoteReadPolicy,
    ShardReadError,
    is_http_url,
    open_remote_shard,
    read_remote_bytes,
)
from vlsafe.data.schema import Sample, SampleError


class ImagePresizer(Protocol):
    """What the writer needs of `vlsafe.data.images.Presize` (which builds on this module)."""

    def apply(self, data: bytes, sample_id: str, field_name: str) -> tuple[bytes, str]: ...

    def record(self) -> dict: ...


log = logging.getLogger(__name__)
#: Shard writers stage into `<out>/.staging-<host>-<pid>-<random>` (see `write_shards`).
STAGING_PREFIX = ".staging-"

INDEX_NAME = "index.json"
INDEX_FORMAT = "vlsafe-shards/1"
_IMAGE_MEMBER = re.compile(r"^img(\d+)\.([a-z0-9]+)$")
_MASK_MEMBER = re.compile(r"^mask(\d+)\.png$")


# ---------------------------------------------------------------------------------------- index
@dataclass
class ShardInfo:
    url: str
    count: int


@dataclass
class ShardIndex:
    """What a shard directory holds. `url`s are relative to the index unless absolute/remote."""

    shards: list[ShardInfo]
    skipped: list[dict[str, str]] = field(default_factory=list)
    format: str = INDEX_FORMAT
    # `make_shards --presize`: how every image was squared and resized at writing time (None: originals)
    presized: dict | None = None

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / INDEX_NAME
        payload = {"format": self.format, "total": self.total, "shards": [asdict(s) for s in self.shards],
                   "skipped": self.skipped}
        if self.presized is not None:
            payload["presized"] = self.presized
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, path)
        return path


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def resolve_shard_url(base: str, url: str) -> str:
    if _is_remote(url) or os.path.isabs(url):
        return url
    return posixpath.join(base, url) if _is_remote(base) else str(Path(base) / url)


def _parent(url: str) -> str:
    return posixpath.dirname(url) if _is_remote(url) else str(Path(url).parent)


def expand_shard_pattern(pattern: str) -> list[str]:
    """`/data/shard-{000000..000099}.tar` -> the listed urls (brace expansion, as webdataset does)."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def index_for_pattern(pattern: str, remote: RemoteReadPolicy | None = None) -> ShardIndex:
    """Shards named by a brace pattern (or one tar): counts from the index.json beside them if there is one,
    otherwise counted by reading each shard once."""
    urls = expand_shard_pattern(pattern)
    parent = _parent(urls[0])
    try:
        known = {s.url: s.count for s in load_index(parent, remote).shards}
    except (FileNotFoundError, ValueError):
        known = {}
    shards = []
    for url in urls:
        if url not in known:
            log.warning("no index.json entry for %s; counting its samples by reading it", url)
        shards.append(ShardInfo(url, known[url] if url in known else sum(1 for _ in iter_shard(url, remote=remote))))
    return ShardIndex(shards=shards)


def load_index(location: str | Path, remote: RemoteReadPolicy | None = None) -> ShardIndex:
    """Read `index.json` from a shard directory (or the index file itself) and resolve shard urls.

    A `.tar` path or brace pattern (`shard-{000000..000009}.tar`) selects those shards instead. The location may be
    an `http(s)://` or `s3://` url (`vlsafe.data.remote`, read under `remote`'s timeouts and retries); the query of a
    presigned index url is not part of the name checked for `.json`/`.tar`.
    """
    location = str(location)
    name = location.split("?", 1)[0] if is_http_url(location) else location
    if name.endswith(".tar") or ("{" in name and ".." in name):
        return index_for_pattern(location, remote)
    index_path = location if name.endswith(".json") else (
        posixpath.join(location, INDEX_NAME) if _is_remote(location) else str(Path(location) / INDEX_NAME))
    base = (posixpath.dirname(index_path.split("?", 1)[0] if is_http_url(index_path) else index_path)
            if _is_remote(index_path) else str(Path(index_path).parent))
    try:
        if is_http_url(index_path):
            payload = json.loads(read_remote_bytes(index_path, remote).decode("utf-8"))
        else:
            with wds.gopen(index_path, "rb") as stream:
                payload = json.loads(stream.read().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no shard index at {index_path}; write shards with tools/make_shards.py, or index existing "
            f"vlsafe tars with `python tools/make_shards.py index {location}`") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{index_path}: malformed JSON ({err})") from None
    if payload.get("format") != INDEX_FORMAT:
        raise ValueError(f"{index_path}: format {payload.get('format')!r} is not {INDEX_FORMAT!r}")
    for entry in payload["shards"]:
        if str(entry["url"]).startswith("pipe:") and os.environ.get("VLSAFE_ALLOW_PIPE_URLS") != "1":
            # webdataset runs `pipe:` urls as shell commands; a downloaded index must not be able to do that.
            raise ValueError(f"{index_path}: shard url {entry['url']!r} is a shell command (pipe:); refusing it. "
                             f"Set VLSAFE_ALLOW_PIPE_URLS=1 if you wrote this index yourself")
    shards = [ShardInfo(resolve_shard_url(base, s["url"]), int(s["count"])) for s in payload["shards"]]
    if not shards:
        raise ValueError(f"{index_path}: lists no shards")
    return ShardIndex(shards=shards, skipped=payload.get("skipped", []), presized=payload.get("presized"))


def sample_members(sample: Sample, key: str, presize: ImagePresizer | None = None) -> dict[str, bytes | str]:
    """Encode one validated sample into tar members (all bytes); images and masks are decoded once to check
    them, and boxes/masks are checked against the first image's size. With `presize`, images are stored
    squared and resized to the model's side (PPM or PNG, see `vlsafe.data.images`)."""
    members: dict[str, bytes | str] = {"__key__": key, "json": sample.to_json()}
    if presize is not None and (sample.boxes or sample.masks):
        # Boxes and masks are in the original image's pixels; pre-sizing would silently move them.
        raise SampleError(sample.id, "boxes", "pre-sizing images (--presize) would move the boxes and masks out "
                                              "of their image's frame; write grounding data without --presize")
    sizes = []
    for i, image in enumerate(sample.images):
        data, ext, size = inspect_image(image, sample.id, f"images[{i}]")
        if presize is not None:
            data, ext = presize.apply(data, sample.id, f"images[{i}]")
        members[f"img{i}.{ext}"] = data
        sizes.append(size)
    mask_sizes = []
    for i, mask in enumerate(sample.masks or []):
        data, ext, size = inspect_image(mask, sample.id, f"masks[{i}]")
        if ext != "png":
            raise SampleError(sample.id, f"masks[{i}]", f"masks must be PNG, got {ext}")
        members[f"mask{i}.png"] = data
        mask_sizes.append(size)
    if sizes and (sample.boxes or mask_sizes):
        sample.check_geometry(sizes[0], mask_sizes)
    return members


def write_shards(samples: Iterable[Sample], out_dir: str | Path, *, max_samples: int = 1000,
                 max_bytes: int = 512 * 2**20, prefix: str = "shard", on_error: str = "raise",
                 progress: bool = False, total: int | None = None, presize: ImagePresizer | None = None) -> ShardIndex:
    """Validate and write samples to size-capped tar shards in `out_dir`, then write `index.json`.

    `presize` squares and resizes every image to a model's input side once, here, instead of in every
    epoch's dataloader (`make_shards --presize`); it is recorded in the index as `presized`.

    `on_error="raise"` stops at the first unusable sample with a message naming it and the field;
    `"skip"` records `{id, error}` in the index's `skipped` list and logs a summary.

    The shards are written to a staging folder inside `out_dir` and moved in only when every sample is written
    (`replace_shard_set`), so a run that fails or is interrupted leaves a shard set already in `out_dir`
    untouched, never old `index.json` counts over new shard contents. A staging folder that a killed writer left
    (SIGKILL, OOM: no cleanup ran) is removed, and logged, by the next write (`remove_stale_staging`).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(), dir=out))
    started = staging.stat().st_mtime  # the file system's clock, as the other folders' times are
    try:
        index = _write_shard_files(samples, out, staging, max_samples, max_bytes, prefix, on_error, progress, total,
                                   presize)
        replace_shard_set(staging, out, index)
        remove_stale_staging(out, older_than=started)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return index


def _staging_prefix() -> str:
    """`.staging-<host>-<pid>-`: the name says which process owns the folder, so a later run can tell a folder
    left by a killed writer (SIGKILL, OOM, node loss: no `finally` ran) from one a live writer is filling."""
    return f"{STAGING_PREFIX}{_host_tag()}-{os.getpid()}-"


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", socket.gethostname()) or "host"


def _staging_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) a staging folder's name records; None for a name without them."""
    match = re.fullmatch(re.escape(STAGING_PREFIX) + r"(\w+)-(\d+)-.*", name)
    return (match.group(1), int(match.group(2))) if match else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(out: Path, older_than: float | None = None) -> list[str]:
    """Remove staging folders that earlier writers left in `out`, and log each; returns their names.

    Without `older_than` (before a run) only folders whose owner process on this host is dead go: nothing can be
    filling them. With `older_than` (after a successful run, a modification time) also folders last changed
    before then that name no owner or one on another host (whose liveness cannot be checked from here); a folder
    of a live process on this host is always kept."""
    host, removed = _host_tag(), []
    for folder in sorted(out.glob(STAGING_PREFIX + "*")):
        if not folder.is_dir() or folder.is_symlink():
            continue
        owner = _staging_owner(folder.name)
        if owner is not None and owner[0] == host:
            if owner[1] == os.getpid() or _pid_alive(owner[1]):
                continue
            reason = f"its writer (pid {owner[1]}) is no longer running"
        else:
            try:
                changed = folder.stat().st_mtime
            except FileNotFoundError:
                continue
            if older_than is None or changed >= older_than:
                continue
            reason = "it is older than this successful write and names no live writer on this host"
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            continue  # another writer cleaned it first
        except OSError as err:  # e.g. no permission: leave it, but say so
            log.warning("could not remove stale staging folder %s (%s): %s", folder, reason, err)
            continue
        log.warning("removed stale staging folder %s left by an interrupted shard write (%s)", folder, reason)
        removed.append(folder.name)
    return removed


def replace_shard_set(staging: Path, out: Path, index: ShardIndex) -> None:
    """Move the finished shards of `index` from `staging` into `out`, replacing the set `out` held.

    The old `index.json` goes first, so from here until the new one is saved (a few renames) the folder is
    unreadable rather than mixed; shards the old index listed that the new set does not reuse are removed."""
    old = _local_shard_names(out)
    (out / INDEX_NAME).unlink(missing_ok=True)
    for shard in index.shards:
        os.replace(staging / shard.url, out / shard.url)
    for name in old - {shard.url for shard in index.shards}:
        (out / name).unlink(missing_ok=True)
    index.save(out)


def _local_shard_names(out: Path) -> set[str]:
    """Names of the shards the index in `out` lists as plain files of `out` (none if there is no usable index)."""
    try:
        payload = json.loads((out / INDEX_NAME).read_text(encoding="utf-8"))
        urls = [str(entry["url"]) for entry in payload["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {url for url in urls if url.endswith(".tar") and Path(url).name == url and (out / url).is_file()}


def _write_shard_files(samples: Iterable[Sample], out: Path, staging: Path, max_samples: int, max_bytes: int,
                       prefix: str, on_error: str, progress: bool, total: int | None,
                       presize: ImagePresizer | None) -> ShardIndex:
    """Write the shards into `staging`; the returned index is not saved yet."""
    shards: list[ShardInfo] = []
    skipped: list[dict[str, str]] = []
    writer: wds.TarWriter | None = None
    count = size = key = 0

    def close_current() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            shards[-1].count = count
            writer = None

    iterator: Iterable[Sample] = samples
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(samples, total=total, desc=f"writing shards to {out}", unit="sample")
    try:
        for sample in iterator:
            try:
                sample.validate()
                members = sample_members(sample, f"{key:09d}", presize)
            except SampleError as err:
                if on_error == "raise":
                    raise
                skipped.append({"id": err.sample_id, "field": err.field_name, "error": err.problem})
                continue
            member_bytes = sum(len(v) for k, v in members.items() if k != "__key__")
            if writer is None or count >= max_samples or (count and size + member_bytes > max_bytes):
                close_current()
                name = f"{prefix}-{len(shards):06d}.tar"
                writer = wds.TarWriter(str(staging / name), encoder=False, mtime=0.0)
                shards.append(ShardInfo(name, 0))
                count = size = 0
            writer.write(members)
            count += 1
            size += member_bytes
            key += 1
    except BaseException:
        if writer is not None:
            writer.close()  # the staging folder is removed by the caller
        raise
    close_current()
    if not shards:
        raise ValueError(f"no usable samples to write to {out} ({len(skipped)} skipped)")
    if skipped:
        log.warning("skipped %d unusable sample(s) while writing %s; see 'skipped' in %s/%s; first: %s",
                    len(skipped), out, out, INDEX_NAME, skipped[0])
    return ShardIndex(shards=shards, skipped=skipped, presized=presize.record() if presize is not None else None)


# ---------------------------------------------------------------------------------------- reading
def _raise(err: Exception) -> bool:
    raise err


def iter_shard(url: str, keep: Callable[[int], bool] | None = None,
               on_sample_error: Callable[[SampleError], None] | None = None,
               remote: RemoteReadPolicy | None = None) -> Iterator[tuple[int, Sample]]:
    """Yield `(position_in_shard, Sample)` for one tar; `keep(position)` skips parsing unwanted ones.

    Images and masks stay encoded bytes: decoding belongs to the (parallel) transform step. A record that
    does not parse or validate raises `SampleError`, or goes to `on_sample_error` and is left out.
    `http(s)://` and `s3://` shards are streamed under `remote`'s timeouts and retries (`vlsafe.data.remote`); one
    that cannot be read completely raises `ShardReadError` (url, bytes read).
    """
    stream = open_remote_shard(url, remote) if is_http_url(url) else None
    if stream is None:
        raw_samples = wds.tarfile_to_samples(handler=_raise)([{"url": url}])
    else:  # webdataset's own tar reading, over the retrying stream instead of its `curl` pipe
        raw_samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=_raise),
                                    handler=_raise)
    position = 0
    try:
        for raw in raw_samples:
            if keep is None or keep(position):
                try:
                    sample = sample_from_members(raw, where=f"{url}#{raw.get('__key__')}")
                except SampleError as err:
                    if on_sample_error is None:
                        raise
                    on_sample_error(err)
                else:
                    yield position, sample
            position += 1
    except (SampleError, ShardReadError):
        raise
    except Exception as err:
        raise IOError(f"cannot read shard {url} after {position} sample(s): {err}") from err
    finally:
        if stream is not None:
            stream.close()


def unsafe_member_name(name: str) -> bool:
    """True for tar member names that could point outside an extraction folder (absolute, `..`, drive or
    backslash paths, NUL). vlsafe never extracts shards to disk, but refuses such members anyway: a shard
    holding them was not written by vlsafe and may be hostile."""
    parts = name.replace("\\", "/").split("/")
    return (name.startswith(("/", "\\")) or ".." in parts or "\0" in name or "\\" in name
            or re.match(r"^[A-Za-z]:", name) is not None)


def sample_from_members(raw: dict[str, bytes], where: str) -> Sample:
    """One tar record -> a validated `Sample`. Only `json`, `img<i>.<ext>` and `mask<i>.png` members are
    read; anything else (e.g. a `.pth` or `.pickle` member) is ignored, never decoded."""
    key = str(raw.get("__key__", "?"))
    if unsafe_member_name(key):
        raise SampleError(key, "tar member name", "is an absolute or parent-directory ('..') path; refusing a "
                                                  "shard member that could escape its folder", where)
    if "json" not in raw:
        raise SampleError(key, "json", "member is missing", where)
    try:
        data = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError(key, "json", f"malformed: {err}", where) from None
    except RecursionError:
        raise SampleError(key, "json", "malformed: nested too deeply", where) from None
    images: dict[int, bytes] = {}
    masks: dict[int, bytes] = {}
    for name, value in raw.items():
        if (match := _IMAGE_MEMBER.match(name)) is not None:
            images[int(match.group(1))] = value
        elif (match := _MASK_MEMBER.match(name)) is not None:
            masks[int(match.group(1))] = value
    if not isinstance(data, dict):
        raise SampleError(key, "json", "must be a JSON object", where)
    if sorted(images) != list(range(len(images))) or sorted(masks) != list(range(len(masks))):
        raise SampleError(str(data.get("id", key)), "images", f"image/mask members are not numbered 0..n-1: "
                                                              f"{sorted(images)}, {sorted(masks)}", where)
    # `num_masks` is written whenever the sample had a mask list, so an empty list comes back as [] (not None)
    ordered_masks = [masks[i] for i in sorted(masks)] if masks or "num_masks" in data else None
    sample = Sample.from_metadata(data, [images[i] for i in sorted(images)], ordered_masks, where=where)
    sample.validate(where)
    if sample.images and (sample.boxes or sample.masks):
        field_names = ["images[0]"] + [f"masks[{i}]" for i in range(len(sample.masks or []))]
        sizes = [image_header_size(b, sample.id, f) for b, f in zip([sample.images[0], *(sample.masks or [])],
                                                                   field_names)]
        sample.check_geometry(sizes[0], sizes[1:], where)
    return sample


def read_samples(location: str | Path, limit: int | None = None,
                 remote: RemoteReadPolicy | None = None) -> Iterator[Sample]:
    """All samples of a shard directory in index order (for evaluation and tools, not training)."""
    produced = 0
    for shard in load_index(location, remote).shards:
        for _, sample in iter_shard(shard.url, remote=remote):
            if limit is not None and produced >= limit:
                return
            yield sample
            produced += 1
