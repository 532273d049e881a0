"""Supervised instruction tuning (LLaVA stage 2, VLGuard safety SFT, LRV robust tuning)."""
from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric, Metric, SumMetric

from vlsafe.builders import VLMBuilder
from vlsafe.core.lora import LoraSettings
from vlsafe.data.encoding.encoders import ConversationEncoder, PromptEncoder
from vlsafe.data.encoding.packing import PackedConversationEncoder
from vlsafe.methods.base import GenerationSettings, OptimSettings, VLMModule
from vlsafe.methods.logprobs import masked_lm_loss, supervised_positions
from vlsafe.monitoring.metrics import TokenPerplexity, log_metrics, stage_metrics


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
    """Masked LM loss on assistant replies; token accuracy and perplexity as torchmetrics.

    `packing` (vlsafe improvement; None/false = off, the default, so the paper recipes train as released; None
    keeps checkpoints from before the switch resumable): each batch's samples
    are packed into fewer rows of at most `packing_max_tokens` tokens (None: the model's max_length) with
    attention kept inside each sample; same loss and gradients as the padded batch, less compute
    (`vlsafe.data.encoding.packing`). The batch still holds `batch_size` samples, so steps and resume are
    unchanged.
    """

    def __init__(self, vlm: VLMBuilder, lora: LoraSettings | None = None, train_vision: bool = False,
                 train_projector: bool = True, train_llm: bool = True, gradient_checkpointing: bool = False,
                 optim: OptimSettings | None = None, generation: GenerationSettings | None = None,
                 packing: bool | None = None, packing_max_tokens: int | None = None):
        if packing_max_tokens is not None and packing_max_tokens < 1:
            raise ValueError(f"packing_max_tokens must be a positive number of tokens or None, got "
                             f"{packing_max_tokens}")
        self.packing, self.packing_max_tokens = bool(packing), packing_max_tokens
        super().__init__(vlm=vlm, lora=lora, train_vision=train_vision, train_projector=train_projector,
                         train_llm=train_llm, gradient_checkpointing=gradient_checkpointing, optim=optim,
                         generation=generation)
        stages = stage_metrics(sft_metrics(), ("train", "val", "test"))
        self.train_metrics, self.val_metrics, self.test_metrics = stages["train"], stages["val"], stages["test"]

    def extra_hparams(self) -> dict[str, Any]:
        # None when off: checkpoints written before the switch existed resume (checkpoint_guard.resume_differences
        # reads a key on one side only as another method unless its value is None)
        return {"packing": self.packing or None, "packing_max_tokens": self.packing_max_tokens}

    def data_encoder(self, stage: str):
        if stage == "predict":
            return PromptEncoder(self.processor)
        if self.packing:
            return PackedConversationEncoder(self.processor, self.packing_max_tokens)
        return ConversationEncoder(self.processor)

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        positions, targets = supervised_positions(batch["labels"])
        output = self.vlm(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                          logits_to_keep=positions, position_ids=batch.get("position_ids"))
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
