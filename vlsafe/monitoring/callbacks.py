"""Lightning callbacks that report held-out numbers during `fit`: the method-independent part (printing
validation metrics; the before/after evaluation frame that eval and perception callbacks fill in)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


class BeforeAfterEvaluation(L.Callback):
    """Evaluate at fit start and fit end, print one line each, log the final metrics and write them to
    `<log_dir>/<results_file>`. Subclasses implement `evaluate`."""

    results_file = "evaluation.json"

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> tuple[Any, dict[str, Any], dict[str, float]]:
        """Return (report with `.summary()`, JSON-safe record, metrics to log)."""
        raise NotImplementedError

    def _run(self, trainer: L.Trainer, module: L.LightningModule, when: str) -> dict[str, float]:
        report, record, metrics = self.evaluate(trainer, module)
        self.results[when] = record
        if trainer.is_global_zero:
            print(f"[held-out, {when}] {report.summary()}", flush=True)
        return metrics

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module, "before training")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = self._run(trainer, pl_module, "after training")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        log_dir = trainer.log_dir  # a collective call under some strategies: every rank must make it
        if trainer.is_global_zero and log_dir:
            out = Path(log_dir) / self.results_file
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(self.results, indent=1))
