"""REC/RES accuracy on held-out grounding samples before and after `fit` (free generation)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L

from vlsafe.data.shards import read_samples
from vlsafe.data.synthetic.world import generate
from vlsafe.methods.perception.evaluation import (
    ground_samples,
    is_perception_model,
    summarise,
)
from vlsafe.monitoring.callbacks import BeforeAfterEvaluation


@dataclass
class GroundingReport:
    rows: list[dict[str, Any]]
    mode: str

    @property
    def overall(self) -> dict[str, Any]:
        return next((r for r in self.rows if r["dataset"] == "all"), {"n": 0})

    def summary(self) -> str:
        o = self.overall
        text = (f"REC Acc@0.5 {o.get('acc@0.5', 0.0):.3f}, mean box IoU {o.get('box_iou', 0.0):.3f} "
                f"(n={o['n']}, {self.mode})")
        if "ciou" in o:
            text += f"; RES cIoU {o['ciou']:.3f}, mIoU {o['miou']:.3f}"
        if "mask_box_acc@0.5" in o:
            text += f"; box around the mask: Acc@0.5 {o['mask_box_acc@0.5']:.3f}, IoU {o['mask_box_iou']:.3f}"
        return text


class GroundingAccuracy(BeforeAfterEvaluation):
    """Held-out REC Acc@0.5 and RES cIoU/mIoU of generated answers, before and after training.

    Works for a `PerceptionModule` (boxes from `<loc>`) and for any text model whose answers are text
    coordinates (the baseline). Samples: `path` (a shard directory), else `synthetic_samples` fresh
    held-out synthetic `grounding` scenes, else the data module's first validation source.
    """

    results_file = "grounding.json"

    def __init__(self, path: str | None = None, max_samples: int = 200, synthetic_samples: int = 0,
                 batch_size: int = 32, max_new_tokens: int = 32):
        super().__init__()
        self.path, self.max_samples, self.synthetic_samples = path, max_samples, synthetic_samples
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def _samples(self, trainer: L.Trainer):
        if self.path:
            return list(read_samples(self.path, limit=self.max_samples))
        if self.synthetic_samples:

            return list(generate(min(self.synthetic_samples, self.max_samples), seed=0, kinds=["grounding"],
                                 split="heldout"))
        sources = getattr(trainer.datamodule, "sources", {}).get("validate") or []
        if not sources:
            raise ValueError("GroundingAccuracy needs `path`, `synthetic_samples` or a data module with validation data")
        return list(read_samples(sources[0].path, limit=self.max_samples))

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> tuple[GroundingReport, dict, dict]:
        predictions = ground_samples(module, self._samples(trainer), batch_size=self.batch_size,
                                     max_new_tokens=self.max_new_tokens)
        report = GroundingReport(summarise(predictions), "<loc> token" if is_perception_model(module)
                                 else "text coordinates")
        metrics = {f"heldout/{k}": float(v) for k, v in report.overall.items() if k not in ("dataset", "n")}
        return report, {"rows": report.rows, "mode": report.mode}, metrics
