"""Write `predict` outputs to JSON Lines as they are produced (one file per rank)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class JsonlPredictionWriter(BasePredictionWriter):
    """`trainer.callbacks: [{class_path: vlsafe.eval.writer.JsonlPredictionWriter, init_args: {path: out.jsonl}}]`.

    Rows are appended batch by batch, so a long generation run that dies keeps what it finished.
    With several ranks, rank r writes `<stem>.rank<r>.jsonl`.
    """

    def __init__(self, path: str):
        super().__init__(write_interval="batch")
        self.path = Path(path)

    def _target(self, trainer: L.Trainer) -> Path:
        if trainer.world_size == 1:
            return self.path
        return self.path.with_name(f"{self.path.stem}.rank{trainer.global_rank}{self.path.suffix}")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target = self._target(trainer)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("")

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        with self._target(trainer).open("a", encoding="utf-8") as stream:
            for row in prediction:
                stream.write(json.dumps(row, ensure_ascii=False) + "\n")
