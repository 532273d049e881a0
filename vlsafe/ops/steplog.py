"""One JSON line per optimiser step (step, epoch, loss, sample ids): a trace to compare runs step by step.

The exact-resume tests compare these lines between an uninterrupted run and a killed-and-resumed one; they
are also a cheap way to watch a run from a shell (`tail -f`). The file is appended to, so a resumed run
continues it (steps redone after a crash appear twice, which shows how much work the crash cost).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


class StepLog(L.Callback):
    """Append `{"step", "epoch", "loss", "ids"}` to `path` after every optimiser step (rank 0 only; `ids` are
    the batch's sample ids when the batch carries them)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.is_global_zero or trainer.global_step == self._last_step:
            return  # gradient accumulation: log once per optimiser step
        self._last_step = trainer.global_step
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch,
                  "loss": float(loss.detach()) if isinstance(loss, torch.Tensor) else loss}
        if isinstance(batch, dict) and "ids" in batch:
            record["ids"] = list(batch["ids"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
