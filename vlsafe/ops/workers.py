"""Which shard each dataloader worker is reading, kept in shared memory so a dead worker can be named.

When a DataLoader worker dies (killed by the OOM killer, a segfault in an image decoder, ...), PyTorch raises
`RuntimeError: DataLoader worker (pid 1234) is killed by signal: Killed.`, from wherever the main process
happens to be. That names a process, not the data. Workers record their pid, the shard they are reading and
the id of the sample they are turning into tensors; `annotate(error)` adds that to the error (an exception
note, shown in the traceback) and logs it. PyTorch often reports the same death a second time (its SIGCHLD
handler fires again while Lightning tears down), so from then on that handler's errors are annotated too.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import re
import signal
import threading
import weakref

from torch.utils.data import get_worker_info

log = logging.getLogger(__name__)
_SLOT_BYTES = 4096
_LIVE: "weakref.WeakSet[ShardTracker]" = weakref.WeakSet()
_WORKER_ERROR = re.compile(r"DataLoader worker \(pids?\(?s?\)? ([\d, ]+)\)|DataLoader timed out")


class ShardTracker:
    """One shared slot per worker holding `"<pid>\\t<shard url>\\t<sample id>"`."""

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self._slots = multiprocessing.Array(ctypes.c_char, max(1, num_workers) * _SLOT_BYTES, lock=False)
        self._url = ""  # per process: the shard this worker reads
        _LIVE.add(self)

    def _write(self, url: str, sample_id: str) -> None:
        info = get_worker_info()
        if info is None or info.id >= self.num_workers:
            return
        data = f"{os.getpid()}\t{url}\t{sample_id}".encode("utf-8", "replace")[:_SLOT_BYTES - 1]
        start = info.id * _SLOT_BYTES
        self._slots[start:start + _SLOT_BYTES] = data + b"\0" * (_SLOT_BYTES - len(data))

    def reading(self, url: str) -> None:
        """Called in a worker before it opens a shard."""
        self._url = url
        self._write(url, "")

    def encoding(self, sample_id: str) -> None:
        """Called in a worker before it decodes and tokenises a sample (with a shuffle buffer, the sample
        may come from an earlier shard than the one being read)."""
        self._write(self._url, sample_id)

    def current(self) -> dict[int, tuple[int, str, str]]:
        """worker id -> (pid, shard url, sample id) of what each worker was last doing."""
        out = {}
        for worker in range(self.num_workers):
            raw = bytes(self._slots[worker * _SLOT_BYTES:(worker + 1) * _SLOT_BYTES]).split(b"\0", 1)[0]
            if raw:
                pid, url, sample_id = raw.decode("utf-8", "replace").split("\t", 2)
                out[worker] = (int(pid), url, sample_id)
        return out

    def explain(self, error: BaseException) -> str | None:
        """A sentence naming the shard(s) of the worker(s) a DataLoader error is about, or None.

        PyTorch names the dead worker's pid ("DataLoader worker (pid 12) is killed by signal"); when the main
        process instead trips over the dead worker's half-sent batch (a connection error), the workers whose
        process is gone are named.
        """
        reading = self.current()
        match = _WORKER_ERROR.search(str(error))
        if match is not None:
            pids = {int(p) for p in re.findall(r"\d+", match.group(1) or "")}
            named = [(w, *slot) for w, slot in sorted(reading.items()) if not pids or slot[0] in pids]
        elif isinstance(error, (ConnectionError, EOFError)):
            named = [(w, *slot) for w, slot in sorted(reading.items()) if _process_gone(slot[0])]
        else:
            return None
        if not named:
            return None
        what = "; ".join(f"worker {w} (pid {pid}) was reading shard {url}"
                         + (f" and processing sample {sample_id!r}" if sample_id else "")
                         for w, pid, url, sample_id in named)
        return f"dataloader worker failure: {what}"

    def annotate(self, error: BaseException) -> bool:
        """Add the shard context to `error` (exception note) and log it; True if `error` was a worker failure."""
        _annotate_later_worker_errors()  # a dying worker may surface again, e.g. during teardown
        sentence = self.explain(error)
        if sentence is None:
            return False
        log.error(sentence)
        if sentence not in getattr(error, "__notes__", ()):
            error.add_note(sentence)
        return True


def _process_gone(pid: int) -> bool:
    """True if `pid` has exited (a zombie not yet reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _annotate_later_worker_errors() -> None:
    """Wrap PyTorch's SIGCHLD handler so the errors it raises later also name the shard (idempotent)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGCHLD"):
        return
    previous = signal.getsignal(signal.SIGCHLD)
    if not callable(previous) or getattr(previous, "vlsafe_annotates", False):
        return

    def handler(signum: int, frame) -> None:
        try:
            previous(signum, frame)
        except (RuntimeError, ConnectionError, EOFError) as error:
            for tracker in list(_LIVE):
                if tracker.explain(error) and tracker.annotate(error):
                    break
            raise

    handler.vlsafe_annotates = True
    signal.signal(signal.SIGCHLD, handler)
