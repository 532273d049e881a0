"""Print held-out metrics of the protector models during `fit` (demo recipes)."""
from __future__ import annotations

import lightning as L


class PrintValidationMetrics(L.Callback):
    """After every validation run (not the sanity check), print the `val/*` metrics on one line.

    Uses `on_validation_end`, which runs after the module's `on_validation_epoch_end` has logged them."""

    def __init__(self, prefix: str = "val/"):
        self.prefix = prefix

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefix)}
        text = ", ".join(f"{k} {v:.3f}" for k, v in sorted(values.items()))
        print(f"[held-out, step {trainer.global_step}] {text}", flush=True)
