"""MLLM-Protector's harm detector: a causal LM with a one-logit head that scores (question, answer) pairs.

- Model: a transformers `*ForSequenceClassification` with `num_labels=1` (the logit is read at the last
  non-pad token), built by a `vlsafe.methods.protector.builders` builder; LoRA through peft (`SEQ_CLS`), with the
  new head trained in full via `modules_to_save`.
- **Label semantics: 1 = SAFE.** `sigmoid(logit)` is P(safe); an answer is flagged harmful when
  P(safe) < `threshold` (0.5). The same convention holds in the data (`labels.chosen_safe` etc.), the
  loss, the metrics and `vlsafe.methods.protector.HarmDetector.p_safe`.
- Input: `"Question: {q}\\n\\nAnswer: {r}"` (`vlsafe.methods.protector.encoders.DETECTOR_TEMPLATE`), at most
  `max_length` (512) tokens; longer samples are a `SampleError` (raised, or counted and skipped with the
  data module's `on_error: skip`), never truncated silently. `preset` (`vlsafe.methods.protector.presets`):
  `released` (default; the paper recipe) keeps question and response as stored and makes the inference
  wrapper score the bare answer, as the released evaluation does; `vlsafe` strips them and scores
  question + answer at inference too.
- Loss (`loss: pairwise`): `ranking_weight * mean_pairs(-log σ(r_safer - r_other)) + bce_weight * BCE`,
  where BCE is summed over a sample's responses and averaged over samples; for a batch of pairs that is
  `BCE(r_safer, y_safer) + BCE(r_other, y_other)`, the released code's form. The released training
  script adds those two BCE terms twice, i.e. `bce_weight = 2`, the default here. Single labelled
  responses may be mixed in (they add BCE only). `loss: bce` is plain mean BCE over every response
  (pairs count as two independent responses), for data without pairs.
- Metrics (torchmetrics, logged per stage `val`/`test`, computed with *unsafe* as the positive class, i.e.
  on P(unsafe) = 1 - P(safe) at the same threshold; AUROC, accuracy and ECE are the same either way):
  `{stage}/auroc`, `{stage}/acc`, `{stage}/f1_unsafe` (F1 of flagging unsafe answers), `{stage}/ece`
  (expected calibration error, 10 bins), `{stage}/pair_acc` (safer response scored higher), `{stage}/loss`, and for
  every name in `categories`: `{stage}/category/{name}/{auroc,acc,f1_unsafe,ece}` (AUROC only when the
  category held both safe and unsafe answers in that epoch, F1 only when it held unsafe ones).
"""
from __future__ import annotations

from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryCalibrationError,
    BinaryF1Score,
)

from vlsafe.core.lora import LoraSettings
from vlsafe.methods.base import OptimSettings
from vlsafe.methods.protector.builders import TextLMBuilder
from vlsafe.methods.protector.encoders import DEFAULT_MAX_LENGTH, DetectorEncoder
from vlsafe.methods.protector.presets import PresetName, get_preset
from vlsafe.methods.protector.text_module import TextLMModule

DetectorLoss = Literal["pairwise", "bce"]
LOSSES: tuple[str, ...] = get_args(DetectorLoss)
STAGES = ("val", "test")


def detector_loss(logits: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor, num_samples: int,
                  ranking_weight: float = 1.0, bce_weight: float = 2.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ranking term, BCE term). `logits`/`labels` (P(safe) targets) are per response row, `pairs` holds
    (safer row, other row) indices, `num_samples` counts pairs and single responses (a pair is one sample)."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum") / max(num_samples, 1)
    if pairs.numel():
        ranking = -F.logsigmoid(logits[pairs[:, 0]] - logits[pairs[:, 1]]).mean()
    else:
        ranking = logits.new_zeros(())
    return ranking_weight * ranking + bce_weight * bce, ranking, bce


def _metric_set(threshold: float) -> dict[str, Any]:
    """Metrics fed (P(unsafe), is_unsafe): flagged iff P(safe) < threshold iff P(unsafe) > 1 - threshold."""
    flag_at = 1.0 - threshold
    return {"auroc": BinaryAUROC(), "acc": BinaryAccuracy(threshold=flag_at),
            "f1_unsafe": BinaryF1Score(threshold=flag_at), "ece": BinaryCalibrationError(n_bins=10)}


class HarmDetectorModule(TextLMModule):
    """Train/evaluate the harm detector (see the module docstring for the exact loss, labels and metrics)."""

    head = "classifier"

    def __init__(self, model: TextLMBuilder, lora: LoraSettings | None = None, optim: OptimSettings | None = None,
                 loss: DetectorLoss = "pairwise",
                 ranking_weight: float = 1.0, bce_weight: float = 2.0, threshold: float = 0.5,
                 max_length: int = DEFAULT_MAX_LENGTH, categories: list[str] | None = None,
                 category_key: str = "category", gradient_checkpointing: bool = False,
                 preset: PresetName = "released"):
        self.preset = get_preset(preset).name
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.loss_type, self.ranking_weight, self.bce_weight = loss, ranking_weight, bce_weight
        self.threshold, self.max_length = threshold, max_length
        self.categories, self.category_key = list(categories or []), category_key
        super().__init__(model, lora, optim, gradient_checkpointing)
        self.metrics = torch.nn.ModuleDict({stage: MetricCollection(_metric_set(threshold)) for stage in STAGES})
        self.category_metrics = torch.nn.ModuleDict({
            f"{stage}_{i}": MetricCollection(_metric_set(threshold)) for stage in STAGES
            for i in range(len(self.categories))})
        # per category, how many safe / unsafe answers an epoch saw (AUROC needs both)
        self.category_counts = torch.nn.ModuleDict({
            f"{stage}_{i}_{c}": SumMetric() for stage in STAGES for i in range(len(self.categories))
            for c in ("safe", "unsafe")})
        self.means = torch.nn.ModuleDict({f"{stage}_{name}": MeanMetric() for stage in STAGES
                                          for name in ("loss", "pair_acc")})

    def extra_hparams(self) -> dict[str, Any]:
        return {"loss": self.loss_type, "ranking_weight": self.ranking_weight, "bce_weight": self.bce_weight,
                "threshold": self.threshold, "max_length": self.max_length, "categories": self.categories,
                "category_key": self.category_key, "preset": self.preset}

    def data_encoder(self, stage: str) -> DetectorEncoder:
        return DetectorEncoder(self.tokenizer, max_length=self.max_length,
                               category_key=self.category_key, require_labels=stage != "predict",
                               preset=self.preset)

    # ------------------------------------------------------------------ forward and loss
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One logit per row (P(safe) = sigmoid)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)

    def compute_loss(self, batch: dict[str, Any], logits: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self(batch["input_ids"], batch["attention_mask"]) if logits is None else logits
        labels = batch["labels"].to(logits.device)
        pairs = batch["pairs"].to(logits.device)
        if self.loss_type == "pairwise":
            loss, ranking, bce = detector_loss(logits, labels, pairs, len(batch["ids"]), self.ranking_weight,
                                               self.bce_weight)
            return loss, {"ranking": ranking.detach(), "bce": bce.detach()}
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels)
        return bce, {"bce": bce.detach()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, parts = self.compute_loss(batch)
        size = len(batch["ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=size)
        return loss

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"].to(logits.device)
        p_unsafe = 1.0 - torch.sigmoid(logits.float())
        unsafe = (labels < 0.5).long()
        self.metrics[stage].update(p_unsafe, unsafe)
        for i, category in enumerate(self.categories):
            rows = torch.tensor([c == category for c in batch["categories"]], device=logits.device)
            if rows.any():
                self._update_category(stage, i, p_unsafe[rows], unsafe[rows])
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels)
        self.means[f"{stage}_loss"].update(bce, weight=len(labels))
        pairs = batch["pairs"].to(logits.device)
        if pairs.numel():
            self.means[f"{stage}_pair_acc"].update((logits[pairs[:, 0]] > logits[pairs[:, 1]]).float())

    def _update_category(self, stage: str, i: int, p_unsafe: torch.Tensor, unsafe: torch.Tensor) -> None:
        self.category_metrics[f"{stage}_{i}"].update(p_unsafe, unsafe)
        self.category_counts[f"{stage}_{i}_safe"].update((1 - unsafe).sum())
        self.category_counts[f"{stage}_{i}_unsafe"].update(unsafe.sum())

    def _epoch_end(self, stage: str) -> None:
        values = dict(self.metrics[stage].compute())
        for i, category in enumerate(self.categories):
            collection = self.category_metrics[f"{stage}_{i}"]
            safe = self.category_counts[f"{stage}_{i}_safe"].compute()
            unsafe = self.category_counts[f"{stage}_{i}_unsafe"].compute()
            if safe + unsafe == 0:
                continue
            undefined = {"auroc"} if safe == 0 or unsafe == 0 else set()
            if unsafe == 0:
                undefined.add("f1_unsafe")  # no unsafe answer to find: F1 is undefined, not 0
            computed = {k: m.compute() for k, m in collection.items(keep_base=True) if k not in undefined}
            values.update({f"category/{category}/{k}": v for k, v in computed.items()})
            collection.reset()
            self.category_counts[f"{stage}_{i}_safe"].reset(), self.category_counts[f"{stage}_{i}_unsafe"].reset()
        for name in ("loss", "pair_acc"):
            metric = self.means[f"{stage}_{name}"]
            if metric.update_count:
                values[name] = metric.compute()
            metric.reset()
        self.metrics[stage].reset()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        p_safe = torch.sigmoid(self(batch["input_ids"], batch["attention_mask"]).float()).tolist()
        return [{"id": i, "p_safe": p, "label": (None if y != y else y), "harmful": p < self.threshold}
                for i, p, y in zip(batch["row_ids"], p_safe, batch["labels"].tolist())]
