"""Preemption: a signal becomes a checkpoint at the next step boundary, a SLURM requeue and a clean exit.

SLURM sends SIGUSR1 shortly before a job's time limit (`#SBATCH --signal=SIGUSR1@90`) and SIGTERM when it
preempts or cancels a job; Kubernetes, `kill` and most schedulers send SIGTERM. Lightning's own SLURM handler
saves from inside the signal handler, i.e. wherever the main thread happens to be: possibly between an
optimiser step and the loop's progress counters, or half-way through AdamW's parameter groups, and ranks
may save at different steps. Here the handler only notes the signal; the checkpoint is written at the end of
the next optimiser step, at the same step on every rank (one all-reduce of a flag per step, under DDP).

The checkpoint is `<trainer.default_root_dir>/hpc_ckpt_<N>.ckpt`, Lightning's name for preemption
checkpoints: a job resubmitted under SLURM resumes automatically; elsewhere, restart with `--ckpt_path hpc`.
Either way the newest state by global step wins, this or a later `last.ckpt` (vlsafe.ops.resume), and a run
that resumed past an hpc checkpoint moves it aside. Only this process handles the signals: dataloader workers,
which SLURM and `kill -- -PGID` signal too, ignore them (vlsafe.ops.workers). On the scheduler's requeue
signal (SIGUSR1 under SLURM with auto-requeue, Lightning's default), rank 0 then runs `scontrol requeue
<job>`. Finally the process exits (`exit_code`, default 0) without running validation or after-training
evaluation, which may not fit in the grace period.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from vlsafe.ops.resume import HPC_CHECKPOINT, hpc_checkpoints, retire_superseded_hpc

log = logging.getLogger(__name__)


class PreemptedExit(SystemExit):
    """Raised after the preemption checkpoint is written; exits the process with `code` and no traceback."""


def next_hpc_checkpoint_path(root: str | Path) -> Path:
    """`root/hpc_ckpt_<N+1>.ckpt` for the highest existing N (Lightning's numbering)."""
    numbers = [int(HPC_CHECKPOINT.match(p.name).group(1)) for p in hpc_checkpoints(root)]
    return Path(root) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes (`<array job>_<task>` for array jobs), or None outside SLURM."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    if job is not None and not re.fullmatch(r"[0-9]+(_[0-9]+)?", job):
        raise ValueError(f"unexpected SLURM job id {job!r}")
    return job


def requeue_slurm_job(job_id: str) -> bool:
    """`scontrol requeue <job_id>`; True on success. Failure is logged, not raised: the checkpoint exists."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        rank_zero_warn(f"could not requeue SLURM job {job_id}: {err}; resubmit it by hand (it will resume)")
        return False
    if result.returncode != 0:
        rank_zero_warn(f"`scontrol requeue {job_id}` failed (exit {result.returncode}): {result.stderr.strip()}; "
                       f"resubmit the job by hand (it will resume)")
        return False
    rank_zero_info(f"vlsafe: requeued SLURM job {job_id}")
    return True


def _cluster_environment(trainer: L.Trainer) -> Any:
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is None:  # single-device strategies keep it on the accelerator connector only
        environment = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return environment


class PreemptionCheckpoint(L.Callback):
    """On any of `signals`, save `hpc_ckpt_<N>.ckpt` after the current optimiser step, requeue, and exit.

    `exit_code=None` stops through `trainer.should_stop` instead (end-of-training hooks then run).
    `requeue=False` never calls `scontrol` (e.g. when the batch script requeues itself).
    """

    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGUSR1", "SIGTERM"), requeue: bool = True,
                 exit_code: int | None = 0):
        self.signals = [signal.Signals[name] if isinstance(name, str) else signal.Signals(name) for name in signals]
        self.requeue = requeue
        self.exit_code = exit_code
        self.received: int | None = None
        self.saved_path: Path | None = None
        self._previous: dict[int, Any] = {}
        self._last_step = -1

    # ------------------------------------------------------------------ signal handling
    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            log.warning("vlsafe: received %s; a checkpoint follows at the end of this step",
                        signal.Signals(signum).name)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning registered its handlers (which would otherwise run first and save mid-step).
        self._last_step = trainer.global_step
        if trainer.ckpt_path and trainer.is_global_zero:  # resumed: older hpc checkpoints must not win a requeue
            retire_superseded_hpc(trainer.default_root_dir, trainer.global_step)
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._note)
            except ValueError:  # not the main thread: leave signals to Lightning
                rank_zero_warn("vlsafe: PreemptionCheckpoint is inactive (training does not run in the main thread)")
                return

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    # ------------------------------------------------------------------ the step boundary
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:
            return  # mid gradient accumulation: accumulated gradients are not in checkpoints
        self._last_step = trainer.global_step
        code = self.received or 0
        if trainer.world_size > 1:  # every rank saves at the same step, whichever got the signal first
            flag = torch.tensor([code], device=trainer.strategy.root_device)
            code = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        if code:
            self._preempt(trainer, code)

    def _preempt(self, trainer: L.Trainer, signum: int) -> None:
        path = trainer.strategy.broadcast(str(next_hpc_checkpoint_path(trainer.default_root_dir)))
        trainer.save_checkpoint(path, weights_only=False)
        self.saved_path = Path(path)
        name = signal.Signals(signum).name
        rank_zero_info(f"vlsafe: {name} -> saved {path} at step {trainer.global_step}")
        environment = _cluster_environment(trainer)
        requeue = (self.requeue and isinstance(environment, SLURMEnvironment) and environment.auto_requeue
                   and signum == environment.requeue_signal)
        if requeue:
            job_id = slurm_job_id()
            if trainer.is_global_zero and job_id is not None:
                requeue_slurm_job(job_id)
        else:
            rank_zero_info(f"vlsafe: resume with the same command under SLURM, or add `--ckpt_path hpc` (or "
                           f"`--ckpt_path {path}`)")
        self._restore_handlers()
        if self.exit_code is None:
            trainer.should_stop = True
            return
        raise PreemptedExit(self.exit_code)
