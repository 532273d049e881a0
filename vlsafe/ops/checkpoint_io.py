"""Checkpoints that are either complete or absent: temporary file beside the target, fsync, rename.

Lightning's `TorchCheckpointIO` serialises the whole checkpoint into memory and, inside an fsspec
transaction, writes it to the *system* temporary directory before `shutil.move`-ing it into place. When
`/tmp` is another filesystem (node-local disk or tmpfs on most clusters) that move is a copy, so a crash
during it leaves a truncated `last.ckpt` that `--ckpt_path last` would pick; `/tmp` must also hold a whole
checkpoint, and nothing is fsynced. `AtomicCheckpointIO` streams `torch.save` into a temporary file in the
target's own directory, fsyncs it, renames it over the target (atomic on POSIX) and fsyncs the directory.
A failed write (disk full, quota, I/O error) removes the temporary file and raises `CheckpointWriteError`
naming the target; the previous checkpoint files are untouched. torch reports a full disk as
`RuntimeError: [enforce fail at inline_container.cc] unexpected pos`, with the `OSError` only in the
exception chain, so the whole chain is searched. `check_writable` finds a read-only checkpoint folder at fit
start instead of at the first save, and `load_checkpoint` reads through `checkpoint_read.read_checkpoint`
(weights_only=True, also for http(s) URLs). Temporary names (`.vlsafe-partial-*`)
contain neither "last" nor "hpc_ckpt", so Lightning's `last`/`hpc` lookup never selects one; partial files
left by a killed process are removed by the next save in that directory.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from vlsafe.ops.checkpoint_read import CheckpointLoadError, read_checkpoint

log = logging.getLogger(__name__)
PARTIAL_PREFIX = ".vlsafe-partial-"
_SPACE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed; the file it would have replaced (if any) is unchanged."""


class CheckpointFolderError(CheckpointWriteError):
    """A checkpoint folder cannot be written; found at fit start, before the first step."""


def os_error_in_chain(err: BaseException) -> OSError | None:
    """The first `OSError` in `err`'s cause/context chain (torch wraps ENOSPC in a RuntimeError)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def check_writable(folders: list[Any]) -> None:
    """Raise `CheckpointFolderError` naming the first local folder a checkpoint could not be written to.

    A folder that does not exist yet is judged by its nearest existing parent (nothing is created); the test
    is a real file created and removed there, because permission bits say nothing for root or read-only mounts.
    """
    for folder in dict.fromkeys(str(f) for f in folders if f is not None and _is_local(f)):
        target = Path(folder.removeprefix("file://")).absolute()
        existing = target
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            if not existing.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
            fd, probe = tempfile.mkstemp(prefix=f"{PARTIAL_PREFIX}write-check-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise CheckpointFolderError(
                err.errno, f"checkpoint folder {target} is not writable ({err.strerror or err}; checked in {existing})."
                f" Checkpoints would fail at the first save: choose a writable dirpath / default_root_dir") from err


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host_tag() -> str:
    """This host as 8 hex digits: partial-file names must never contain "last" or "hpc_ckpt"."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def remove_stale_partials(directory: Path) -> list[Path]:
    """Delete partial checkpoint files this host's dead processes left behind (a crash mid-save)."""
    removed = []
    for path in directory.glob(f"{PARTIAL_PREFIX}*"):
        parts = path.name[len(PARTIAL_PREFIX):].split("-")
        if len(parts) != 3 or parts[0] != _host_tag() or not parts[1].isdigit() or _pid_alive(int(parts[1])):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    if removed:
        log.warning("removed %d partial checkpoint file(s) left by an interrupted save in %s", len(removed), directory)
    return removed


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic and whose disk-full errors are explicit (local paths;
    remote URLs fall back to Lightning's behaviour)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target.parent)
        temp = target.parent / f"{PARTIAL_PREFIX}{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as file:
                self._serialize(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, target)
        except BaseException as err:
            temp.unlink(missing_ok=True)
            os_error = os_error_in_chain(err) if isinstance(err, Exception) else None
            if os_error is not None and os_error.errno in _SPACE_ERRORS:
                raise CheckpointWriteError(
                    os_error.errno, f"cannot write checkpoint {target}: {os.strerror(os_error.errno)} (disk full or "
                    f"quota exceeded). Nothing was replaced: the checkpoints already in {target.parent} are intact. "
                    f"Free space or point the checkpoint directory elsewhere, then resume from the last one") from err
            if os_error is not None:
                raise CheckpointWriteError(os_error.errno, f"cannot write checkpoint {target}: {os_error}; the "
                                           f"checkpoints already in {target.parent} are intact") from err
            raise
        _fsync_directory(target.parent)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        """Every checkpoint Lightning restores (`--ckpt_path` file or URL, `last`, `hpc`) is read weights-only."""
        if weights_only is False:
            raise CheckpointLoadError(f"{path}: weights_only=False was asked for; vlsafe never unpickles code from "
                                      f"a checkpoint (leave weights_only unset or true)")
        return read_checkpoint(path, map_location=map_location or "cpu")

    def _serialize(self, checkpoint: dict[str, Any], file: IO[bytes]) -> None:
        """Stream the checkpoint into `file` (no in-memory copy of the whole checkpoint)."""
        torch.save(checkpoint, file)


def use_atomic_checkpoint_io(trainer: L.Trainer) -> bool:
    """Swap the trainer's default `TorchCheckpointIO` for `AtomicCheckpointIO`; True if swapped.

    A checkpoint IO chosen in the recipe (`trainer.plugins`) is kept. Sharded strategies (FSDP, DeepSpeed)
    write checkpoint directories themselves and do not go through it.
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True
