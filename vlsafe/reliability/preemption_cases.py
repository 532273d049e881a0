"""Trust cases for preemption: signals to the whole process group, SLURM requeue, which checkpoint a requeued
job resumes from, and a dataloader worker that hangs.

The signal cases start a real training process (2 dataloader workers, vlsafe's PreemptionCheckpoint) in its
own session and signal its process group with `os.killpg`, as SLURM does; under SLURM the environment is faked
and a fake `scontrol` on PATH logs its calls. The tests pinning each behaviour are in
tests/ops/test_ops_group_signals.py and tests/ops/test_ops_worker_failure.py.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from vlsafe.reliability.bad_inputs import LOADS, Bench, Case, WrongResult

_SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "vlsafe-case", "SLURM_NTASKS": "1",
              "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
              "SLURM_NODELIST": "node001", "SLURM_JOB_NUM_NODES": "1"}


def _write_numbers(folder: Path, n: int = 400) -> Path:
    from vlsafe.data.schema import Sample
    from vlsafe.data.shards import write_shards

    samples = (Sample(id=str(i), messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
               for i in range(n))
    write_shards(samples, folder / "shards", max_samples=50)
    return folder / "shards"


def child_run(folder: str) -> None:
    """The signalled process: a tiny fit over `folder/shards` with 2 workers; writes each step to `folder/step`."""
    import lightning as L
    import torch

    from vlsafe.data.datamodule import ShardDataModule
    from vlsafe.ops.preemption import PreemptionCheckpoint

    class Numbers:
        def encode(self, sample):
            return int(sample.id)

        def collate(self, items):
            return torch.tensor(items, dtype=torch.float32)

    class Counter(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def data_encoder(self, stage):
            return Numbers()

        def training_step(self, batch, batch_idx):
            time.sleep(0.05)
            return (self.weight * batch.mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class StepFile(L.Callback):  # runs before PreemptionCheckpoint, which may end the process at this step
        def on_train_batch_end(self, trainer, *args):
            Path(folder, "step").write_text(str(trainer.global_step))

    trainer = L.Trainer(max_steps=150, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=folder,
                        callbacks=[StepFile(), PreemptionCheckpoint()])
    trainer.fit(Counter(), ShardDataModule(train=str(Path(folder, "shards")), batch_size=2, num_workers=2,
                                           shuffle_buffer=0))


def _signal_group(bench: Bench, name: str, signum: int, slurm: bool) -> tuple[Path, int, str, list[str]]:
    """Run `child_run` in its own session, signal its group after step 2: (folder, exit code, output, calls)."""
    folder = bench.folder(name)
    _write_numbers(folder)
    bin_dir, calls = folder / "bin", folder / "scontrol_calls.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", **(_SLURM_ENV if slurm else {})})
    code = f"from vlsafe.reliability.preemption_cases import child_run; child_run({str(folder)!r})"
    with open(folder / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ((folder / "step").exists() and int((folder / "step").read_text() or 0) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise WrongResult(f"the run ended before step 2: {(folder / 'log').read_text()[-1500:]}")
            time.sleep(0.02)
        os.killpg(proc.pid, signum)
        returncode = proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # nothing left if all went well
    output = (folder / "log").read_text()
    return folder, returncode, output, calls.read_text().splitlines() if calls.exists() else []


def _saved(folder: Path) -> list[tuple[str, int]]:
    from vlsafe.ops.resume import checkpoint_step, hpc_checkpoints

    return [(p.name, checkpoint_step(p)) for p in hpc_checkpoints(folder)]


def _group_sigterm(bench: Bench) -> str:
    folder, code, output, calls = _signal_group(bench, "group-sigterm", signal.SIGTERM, slurm=False)
    saved, reached = _saved(folder), int((folder / "step").read_text())
    if code != 0 or "killed by signal" in output or saved != [("hpc_ckpt_1.ckpt", reached)] or calls:
        raise WrongResult(f"exit {code}, checkpoints {saved}, last step {reached}, scontrol {calls}: "
                          f"{output[-800:]}")
    return f"exit 0; hpc_ckpt_1.ckpt at step {reached} (the last step trained); no worker-killed error; no requeue"


def _group_sigusr1_slurm(bench: Bench) -> str:
    folder, code, output, calls = _signal_group(bench, "group-sigusr1", signal.SIGUSR1, slurm=True)
    saved, reached = _saved(folder), int((folder / "step").read_text())
    if code != 0 or calls != ["requeue 4242"] or saved != [("hpc_ckpt_1.ckpt", reached)]:
        raise WrongResult(f"exit {code}, checkpoints {saved}, last step {reached}, scontrol calls {calls}: "
                          f"{output[-800:]}")
    return f"exit 0; 1 `scontrol requeue 4242` call; 1 checkpoint, hpc_ckpt_1.ckpt at step {reached}"


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stale_hpc_vs_newer_last(bench: Bench) -> str:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vlsafe.ops.resume import newest_resume_checkpoint, retire_superseded_hpc

    folder = bench.folder("stale-hpc")
    (folder / "checkpoints").mkdir()
    torch.save({"global_step": 7, "state_dict": {}}, folder / "hpc_ckpt_1.ckpt")
    torch.save({"global_step": 20, "state_dict": {}}, folder / "checkpoints" / "last.ckpt")
    trainer = L.Trainer(default_root_dir=str(folder), logger=False, enable_progress_bar=False,
                        callbacks=[ModelCheckpoint(dirpath=str(folder / "checkpoints"), save_last=True)])
    with _environment(_SLURM_ENV):
        chosen = newest_resume_checkpoint(trainer, None)  # what a requeued job (no --ckpt_path) restores
    if Path(chosen) != folder / "checkpoints" / "last.ckpt":
        raise WrongResult(f"a requeued job would restore {chosen}, not last.ckpt (step 20)")
    moved = retire_superseded_hpc(folder, 20)
    return (f"requeued job restores last.ckpt (step 20), not hpc_ckpt_1.ckpt (step 7); the hpc file is moved "
            f"to {moved[0].relative_to(folder)}")


def _stuck_worker(bench: Bench) -> str:
    import lightning as L
    import torch

    from vlsafe.data.datamodule import ShardDataModule
    from vlsafe.ops.workers import WorkerTimeoutError

    class HangsOnSample7:
        def encode(self, sample):
            if sample.id == "7":
                time.sleep(3600)
            return int(sample.id)

        def collate(self, items):
            return torch.tensor(items, dtype=torch.float32)

    class Consumer(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def data_encoder(self, stage):
            return HangsOnSample7()

        def training_step(self, batch, batch_idx):
            return (self.weight * batch.mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    shards = _write_numbers(bench.folder("stuck-worker"), n=40)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    data = ShardDataModule(train=str(shards), batch_size=2, num_workers=2, shuffle_buffer=0, worker_timeout=1)
    started = time.monotonic()
    try:
        trainer.fit(Consumer(), data)
    except WorkerTimeoutError as err:
        return f"WorkerTimeoutError after {time.monotonic() - started:.1f} s: {err}"
    raise WrongResult("training finished although a worker never returned")


def preemption_cases() -> list[Case]:
    return [
        Case("preemption", "SIGTERM to the whole process group (scancel, `kill -- -PGID`), 2 dataloader workers",
             LOADS, ("exit 0", "hpc_ckpt_1.ckpt at step"), _group_sigterm),
        Case("preemption", "SIGUSR1 to the whole process group under SLURM (auto-requeue)", LOADS,
             ("1 `scontrol requeue 4242` call", "1 checkpoint"), _group_sigusr1_slurm),
        Case("preemption", "requeued SLURM job with a stale hpc_ckpt_1 (step 7) and a newer last.ckpt (step 20)",
             LOADS, ("restores last.ckpt (step 20)", "superseded_hpc/hpc_ckpt_1-step7.ckpt"),
             _stale_hpc_vs_newer_last),
        Case("preemption", "a dataloader worker that hangs (alive, never returns a batch)", LOADS,
             ("WorkerTimeoutError", "stuck, not dead", "sample '7'"), _stuck_worker),
    ]
