"""Supervised instruction tuning (LLaVA stage 2, VLGuard safety SFT, LRV robust tuning)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from vlsafe.core.vlm import IGNORE_INDEX
from vlsafe.data.encoders import ConversationEncoder, PromptEncoder
from vlsafe.methods.base import VLMModule


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


class SFTModule(VLMModule):
    """Masked LM loss on assistant replies; token accuracy and perplexity as torchmetrics."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Token-weighted means, synced across ranks by torchmetrics (validation is not padded, so ranks may
        # hold different numbers of tokens).
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": MeanMetric() for stage in ("val", "test") for name in ("nll", "acc")})

    def data_encoder(self, stage: str):
        return PromptEncoder(self.processor) if stage == "predict" else ConversationEncoder(self.processor)

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        positions, targets = supervised_positions(batch["labels"])
        output = self.vlm(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                          logits_to_keep=positions)
        return masked_lm_loss(output.logits, targets)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, correct, n_tokens = self._loss(batch)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/token_acc", correct.float() / max(n_tokens, 1), batch_size=batch_size)
        self.log("train/perplexity", torch.exp(loss.detach()), batch_size=batch_size)
        self.log("train/supervised_tokens", float(n_tokens), batch_size=batch_size, reduce_fx="sum")
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        loss, correct, n_tokens = self._loss(batch)
        nll, acc = self.metrics[f"{stage}_nll"], self.metrics[f"{stage}_acc"]
        nll.update(loss, weight=n_tokens)
        acc.update(correct.float() / max(n_tokens, 1), weight=n_tokens)
        self.log(f"{stage}/loss", nll, prog_bar=True)
        self.log(f"{stage}/token_acc", acc, prog_bar=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.log("val/perplexity", torch.exp(self.metrics["val_nll"].compute()))

    def on_test_epoch_end(self) -> None:
        self.log("test/perplexity", torch.exp(self.metrics["test_nll"].compute()))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        responses = self.generate_batch(batch)
        return [{"id": i, "response": r, "reference": ref}
                for i, r, ref in zip(batch["ids"], responses, batch["references"])]
