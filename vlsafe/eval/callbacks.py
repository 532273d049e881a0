"""Lightning callbacks that report evaluation numbers during `fit`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from vlsafe.data.shards import read_samples
from vlsafe.eval.answers import AnswerReport, evaluate_answers


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


class AnswerAccuracy(BeforeAfterEvaluation):
    """Held-out closed-set answer accuracy before and after training (and every `every_n_epochs`).

    Reads up to `max_samples` samples from `path` (a shard directory; default: the data module's first
    validation source; or, with `synthetic_samples`, fresh held-out synthetic qa scenes), prints a one-line summary, logs `heldout/accuracy` and writes
    `<log_dir>/answer_accuracy.json` with the before/after numbers.
    """

    def __init__(self, path: str | None = None, max_samples: int = 200, generate: bool = True,
                 every_n_epochs: int = 0, batch_size: int = 16, synthetic_samples: int = 0):
        super().__init__()
        self.path = path
        self.synthetic_samples = synthetic_samples
        self.max_samples = max_samples
        self.generate = generate
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size

    def _samples(self, trainer: L.Trainer):
        if self.synthetic_samples:
            from vlsafe.data.synthetic import generate as synthetic

            return list(synthetic(min(self.synthetic_samples, self.max_samples), seed=0, kinds=["qa"],
                                  split="heldout"))
        path = self.path
        if path is None:
            sources = getattr(trainer.datamodule, "sources", {}).get("validate") or []
            if not sources:
                raise ValueError("AnswerAccuracy needs `path` or a data module with validation data")
            path = sources[0].path
        return list(read_samples(path, limit=self.max_samples))

    results_file = "answer_accuracy.json"

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> tuple[AnswerReport, dict, dict]:
        report = evaluate_answers(module.vlm, module.processor, self._samples(trainer), generate=self.generate,
                                  batch_size=self.batch_size)
        record = {"accuracy": report.accuracy, "chance": report.chance, "n": report.n,
                  "per_task": dict(report.per_task)}
        metrics = {"heldout/accuracy": report.accuracy}
        if self.generate:
            record["exact_match"] = metrics["heldout/exact_match"] = report.exact_match
        return report, record, metrics

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            metrics = self._run(trainer, pl_module, f"epoch {trainer.current_epoch}")
            pl_module.log("heldout/accuracy", metrics["heldout/accuracy"])
