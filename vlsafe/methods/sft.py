"""Supervised instruction tuning (LLaVA stage 2, VLGuard safety SFT, LRV robust tuning)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, Metric, SumMetric

from vlsafe.core.vlm import IGNORE_INDEX
from vlsafe.data.encoders import ConversationEncoder, PromptEncoder
from vlsafe.methods.base import VLMModule
from vlsafe.monitoring.metrics import TokenPerplexity, log_metrics, stage_metrics


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean token cross-entropy over non-ignored targets; also returns #correct and #tokens.

    `logits[:, i]` predicts `targets[:, i]` (already shifted by the caller).
    """
    mask = targets != IGNORE_INDEX
    n_tokens = int(mask.sum())
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum") / max(n_tokens, 1)
    correct = ((logits.argmax(-1) == targets) & mask).sum()
    return loss, correct, n_tokens


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose logits predict a supervised token (union over the batch), and their targets.

    Computing the LM head only there is what keeps long prompts with short answers cheap.
    """
    shifted = labels[:, 1:]
    positions = (shifted != IGNORE_INDEX).any(0).nonzero().squeeze(-1)
    return positions, shifted[:, positions]


def sft_metrics() -> dict[str, Metric]:
    """The masked-LM metrics (names in docs/metrics.md). Means are token-weighted and synced across ranks by
    torchmetrics (validation is not padded, so ranks may hold different numbers of tokens)."""
    return {"loss": MeanMetric(), "token_acc": MeanMetric(), "perplexity": TokenPerplexity(),
            "supervised_tokens": SumMetric()}


def sft_metric_values(loss: torch.Tensor, correct: torch.Tensor, n_tokens: int) -> dict[str, Any]:
    """`log_metrics` input for one batch: token-weighted loss/accuracy/perplexity and the token count."""
    loss = loss.detach()
    return {"loss": (loss, n_tokens), "token_acc": (correct.float() / max(n_tokens, 1), n_tokens),
            "perplexity": (loss, n_tokens), "supervised_tokens": float(n_tokens)}


class SFTModule(VLMModule):
    """Masked LM loss on assistant replies; token accuracy and perplexity as torchmetrics."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        stages = stage_metrics(sft_metrics(), ("train", "val", "test"))
        self.train_metrics, self.val_metrics, self.test_metrics = stages["train"], stages["val"], stages["test"]

    def data_encoder(self, stage: str):
        return PromptEncoder(self.processor) if stage == "predict" else ConversationEncoder(self.processor)

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        positions, targets = supervised_positions(batch["labels"])
        output = self.vlm(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                          logits_to_keep=positions)
        return masked_lm_loss(output.logits, targets)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, correct, n_tokens = self._loss(batch)
        log_metrics(self, self.train_metrics, sft_metric_values(loss, correct, n_tokens), on_step=True,
                    prog_bar=("loss",))
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        loss, correct, n_tokens = self._loss(batch)
        log_metrics(self, getattr(self, f"{stage}_metrics"), sft_metric_values(loss, correct, n_tokens),
                    on_step=False, prog_bar=("loss", "token_acc"))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        responses = self.generate_batch(batch)
        return [{"id": i, "response": r, "reference": ref}
                for i, r, ref in zip(batch["ids"], responses, batch["references"])]
