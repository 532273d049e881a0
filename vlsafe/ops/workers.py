"""Which shard each dataloader worker is reading, kept in shared memory so a dead worker can be named.

When a DataLoader worker dies (killed by the OOM killer, a segfault in an image decoder, ...), PyTorch raises
`RuntimeError: DataLoader worker (pid 1234) is killed by signal: Killed.`, from wherever the main process
happens to be. That names a process, not the data. Workers record their pid, the shard they are reading and
the id of the sample they are turning into tensors; `annotate(error)` adds that to the error (an exception
note, shown in the traceback) and logs it. PyTorch often reports the same death a second time (its SIGCHLD
handler fires again while Lightning tears down), so from then on that handler's errors are annotated too.

Workers also ignore the signals meant for the trainer. SLURM (scancel, preemption, `--signal`), `kill -- -PGID`
and Ctrl-C signal the whole process group, workers included. A worker forked after Lightning installed its
SLURM handler would run it on SIGUSR1 (saving an `hpc_ckpt` from its stale copy of the trainer and calling
`scontrol requeue`), and on SIGTERM it dies (PyTorch's worker handler exits quietly only when the parent sends
it), which kills training with "DataLoader worker ... killed by signal: Terminated" before the preemption
checkpoint. `start_workers` forks them with those signals blocked and `shield_worker_from_signals` (the
`worker_init_fn`) ignores them; SIGTERM from the parent (PyTorch's own shutdown) still ends a worker.

A worker that is stuck rather than dead (a hung network read, a decoder that never returns) would otherwise be
waited for forever: with a `timeout` the wait ends in `WorkerTimeoutError`, naming the worker and its shard.
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
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from torch.utils.data import get_worker_info

log = logging.getLogger(__name__)
_SLOT_BYTES = 4096
_LIVE: "weakref.WeakSet[ShardTracker]" = weakref.WeakSet()
_WORKER_ERROR = re.compile(r"DataLoader worker \(pids?\(?s?\)? ([\d, ]+)\)|DataLoader timed out")
SHIELDED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))
DEFAULT_WORKER_TIMEOUT = 600.0  # seconds the main process waits for one batch; below NCCL's 30-minute default


class WorkerTimeoutError(RuntimeError):
    """A dataloader worker is alive but has delivered no batch within the data module's `worker_timeout`."""


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


# ---------------------------------------------------------------------------------------------- signals
@contextmanager
def _shielded_signals_blocked() -> Iterator[None]:
    """Block the shielded signals in this thread while it forks workers: children start with them blocked, so
    none can run an inherited handler before `shield_worker_from_signals`; the parent gets them right after."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SHIELDED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def shield_worker_from_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: ignore SIGUSR1 and SIGINT; ignore SIGTERM unless the parent sends it.

    The parent process alone decides how training stops (vlsafe.ops.preemption); it ends its workers itself.
    SIGTERM stays blocked and a thread takes it, because SIG_IGN would also ignore PyTorch's `terminate()` of a
    worker that does not stop, and the interpreter would then wait for that worker forever at exit.
    """
    for signum in SHIELDED_SIGNALS:
        if signum != signal.SIGTERM:
            signal.signal(signum, signal.SIG_IGN)
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no process groups to signal
        return
    unblock = set(SHIELDED_SIGNALS) - {signal.SIGTERM}
    if hasattr(signal, "sigwaitinfo"):  # SIGTERM stays blocked (it is still, from the fork) for the thread
        threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), name="vlsafe-sigterm",
                         daemon=True).start()
    else:  # macOS: SIGTERM keeps PyTorch's handler
        unblock.add(signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, unblock)


def _exit_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # what PyTorch's own worker handler does for its parent's SIGTERM


def worker_loader_options(num_workers: int, timeout: float) -> dict[str, Any]:
    """The DataLoader arguments that go with `start_workers` (none without worker processes)."""
    if num_workers <= 0:
        return {}
    if timeout < 0:
        raise ValueError(f"worker_timeout must be >= 0 seconds (0 waits forever), got {timeout}")
    return {"worker_init_fn": shield_worker_from_signals, "timeout": timeout}


def start_workers(start: Callable[[], Iterator[Any]], timeout: float, tracker: ShardTracker | None) -> Iterator[Any]:
    """`iter(loader)` (passed as `start`) with the workers forked under blocked signals, and timeouts named."""
    with _shielded_signals_blocked():
        iterator = start()
    return _NamedTimeouts(iterator, timeout, tracker) if timeout and tracker is not None else iterator


class _NamedTimeouts:
    """Passes a DataLoader iterator through; its timeout becomes a `WorkerTimeoutError` naming the worker."""

    def __init__(self, iterator: Iterator[Any], timeout: float, tracker: ShardTracker):
        self._iterator, self._timeout, self._tracker = iterator, timeout, tracker

    def __iter__(self) -> "_NamedTimeouts":
        return self

    def __next__(self) -> Any:
        try:
            return next(self._iterator)
        except RuntimeError as err:
            if not str(err).startswith("DataLoader timed out"):
                raise
            message = self._explain()
            self._end_awaited_worker()
            raise WorkerTimeoutError(message) from err

    def __len__(self) -> int:
        return len(self._iterator)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_iterator":
            raise AttributeError(name)
        return getattr(self._iterator, name)

    def _awaited_worker(self) -> int | None:
        """The worker whose batch is next in line (PyTorch hands out batches round-robin)."""
        task = getattr(self._iterator, "_task_info", {}).get(getattr(self._iterator, "_rcvd_idx", None))
        return task[0] if task and len(task) == 1 else None

    def _end_awaited_worker(self) -> None:
        """SIGTERM the stuck worker now, as PyTorch's shutdown would after waiting 5 s for it to join."""
        awaited = self._awaited_worker()
        workers = getattr(self._iterator, "_workers", [])
        if awaited is not None and awaited < len(workers) and workers[awaited].is_alive():
            workers[awaited].terminate()

    def _explain(self) -> str:
        reading = self._tracker.current()
        awaited = self._awaited_worker()
        named = [awaited] if awaited in reading else sorted(reading)
        what = "; ".join(
            f"worker {w} (pid {reading[w][0]}, {'exited' if _process_gone(reading[w][0]) else 'still running'}) "
            f"last read shard {reading[w][1]}" + (f" and sample {reading[w][2]!r}" if reading[w][2] else "")
            for w in named) or "no worker had started reading"
        return (f"no batch from the dataloader workers for {self._timeout:g} s (data.worker_timeout): {what}. "
                f"A worker that is still running is stuck, not dead: look at that shard/sample (a hung network "
                f"filesystem read, a decoder that never returns); if batches legitimately take this long, raise "
                f"data.worker_timeout (0 waits forever).")
