"""Lightning callbacks that report evaluation numbers during `fit`."""
from __future__ import annotations

import lightning as L

from vlsafe.data.shards import read_samples
from vlsafe.data.synthetic.world import generate as synthetic
from vlsafe.eval.answers import AnswerReport, evaluate_answers
from vlsafe.monitoring.callbacks import BeforeAfterEvaluation


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
