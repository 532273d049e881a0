"""Which checkpoint a resumed run starts from: the newest training state by global step, not by file name.

Lightning resolves `--ckpt_path hpc` (and, under SLURM, no `--ckpt_path` at all) to the highest-numbered
`hpc_ckpt_<N>.ckpt` in `default_root_dir`, and `--ckpt_path last` to the most recently written `last.ckpt`;
neither looks at the other. After a preemption checkpoint at step 7 and a `last.ckpt` at step 20, a job that
SLURM requeues after a node failure restored step 7, trained steps 8-20 again and overwrote `last.ckpt`.
`newest_resume_checkpoint` picks, among the hpc checkpoints and the ModelCheckpoint `last` files, the one with
the highest `global_step` (an hpc checkpoint on a tie: it is what Lightning would have picked). A job SLURM
restarted after a node failure, which had no time to write an hpc checkpoint, resumes from `last.ckpt` too.

Once training has restored a step, the hpc checkpoints below it are superseded: `retire_superseded_hpc` moves
them (never deletes) into `<default_root_dir>/superseded_hpc/`, out of Lightning's reach. They stay
restorable by path until you delete them.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

log = logging.getLogger(__name__)
HPC_CHECKPOINT = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")
SUPERSEDED_DIR = "superseded_hpc"


def checkpoint_step(path: str | Path) -> int:
    """The `global_step` saved in a checkpoint file (tensors are memory-mapped, not read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["global_step"])
    except Exception as err:
        raise ValueError(f"cannot read global_step from checkpoint {path}: {err}; move the file away or pass "
                         f"--ckpt_path <file> explicitly") from err


def hpc_checkpoints(root: str | Path) -> list[Path]:
    """`hpc_ckpt_<N>.ckpt` files directly under `root` (Lightning's preemption checkpoints), by N."""
    root = Path(root)
    found = [p for p in root.iterdir() if HPC_CHECKPOINT.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(HPC_CHECKPOINT.match(p.name).group(1)))


def last_checkpoints(trainer: L.Trainer) -> list[Path]:
    """The `last*.ckpt` files of the trainer's ModelCheckpoint callbacks (what `--ckpt_path last` considers)."""
    found: set[str] = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            found |= callback._find_last_checkpoints(trainer)
    return sorted(Path(p) for p in found)


def newest_resume_checkpoint(trainer: L.Trainer, ckpt_path: str | None) -> str | None:
    """The checkpoint `fit` should restore for the `ckpt_path` the user gave (a path is returned unchanged).

    `"hpc"`, `"last"`, and `None` in a requeued SLURM job all resume from the newest state by global step
    among the hpc and last checkpoints. A SLURM job counts as requeued when `default_root_dir` holds an hpc
    checkpoint (Lightning's rule) or SLURM says it restarted it (`SLURM_RESTART_COUNT` > 0, e.g. after a node
    failure, which leaves no hpc checkpoint). Anything else is left to Lightning.
    """
    if ckpt_path is None and not SLURMEnvironment.detect():
        return None
    if ckpt_path is not None and ckpt_path not in ("hpc", "last"):
        return ckpt_path
    hpc = hpc_checkpoints(trainer.default_root_dir)
    restarted = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    if ckpt_path is None and not hpc and not restarted:
        return None  # a new SLURM job
    candidates = hpc + last_checkpoints(trainer)
    if any(p.is_dir() for p in candidates):  # sharded checkpoints (FSDP, DeepSpeed) are folders
        rank_zero_info("vlsafe: sharded checkpoints: Lightning picks between the hpc and last ones (by number/time)")
        return ckpt_path
    if not candidates:
        return ckpt_path  # Lightning explains that there is nothing to resume from
    steps = {p: checkpoint_step(p) for p in candidates}
    chosen = max(candidates, key=lambda p: (steps[p], p in hpc))
    others = ", ".join(f"{p.name} (step {steps[p]})" for p in candidates if p != chosen)
    rank_zero_info(f"vlsafe: resuming from {chosen} (step {steps[chosen]}), the newest by global step"
                   + (f"; also found {others}" if others else ""))
    return str(chosen)


def retire_superseded_hpc(root: str | Path, restored_step: int) -> list[Path]:
    """Move the hpc checkpoints saved before `restored_step` into `root/superseded_hpc/`; returns new paths."""
    moved = []
    for path in hpc_checkpoints(root):
        if not path.is_file():  # a sharded checkpoint folder: left where it is
            continue
        step = checkpoint_step(path)
        if step >= restored_step:
            continue
        target = Path(root) / SUPERSEDED_DIR / f"{path.stem}-step{step}.ckpt"
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        moved.append(target)
        log.warning("vlsafe: %s (step %d) is superseded by the restored step %d: moved to %s", path.name, step,
                    restored_step, target)
    return moved
