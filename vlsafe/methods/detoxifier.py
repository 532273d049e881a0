"""MLLM-Protector's detoxifier: SFT of a causal LM (LoRA) that rewrites a harmful answer into a harmless one.

Training pairs come from labelled response pairs (PKU-SafeRLHF, synthetic `harm_text`): the prompt is
`vlsafe.data.text_encoders.DETOX_TEMPLATE` filled with the question and the *less safe* response; the
target is the safer response followed by EOS, or the fixed refusal
(`vlsafe.data.text_encoders.REFUSAL`) when the safer response is unsafe too. The prompt tokens are
masked out of the loss. `vlsafe.protector.Detoxifier` builds the very same prompt at inference (the
released code trains with the question but infers without it; we use the question in both).
"""
from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric

from vlsafe.data.text_encoders import (DEFAULT_MAX_LENGTH, DETOX_TEMPLATE, REFUSAL, DetoxifierEncoder,
                                       DetoxPromptEncoder)
from vlsafe.methods.sft import masked_lm_loss, supervised_positions
from vlsafe.protector.text_module import TextLMModule


class DetoxifierModule(TextLMModule):
    """Masked-prompt SFT of the rewriting LM; `val/loss` and `val/token_acc` as torchmetrics."""

    head = "causal_lm"

    def __init__(self, model: Any, lora: Any = None, optim: Any = None, template: str = DETOX_TEMPLATE,
                 refusal: str = REFUSAL, max_length: int = DEFAULT_MAX_LENGTH, max_new_tokens: int = 128,
                 gradient_checkpointing: bool = False):
        for slot in ("{question}", "{answer}"):
            if slot not in template:
                raise ValueError(f"the detoxifier template must contain {slot}")
        self.template, self.refusal = template, refusal
        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        super().__init__(model, lora, optim, gradient_checkpointing)
        self.metrics = torch.nn.ModuleDict({f"{stage}_{name}": MeanMetric() for stage in ("val", "test")
                                            for name in ("nll", "acc")})

    def extra_hparams(self) -> dict[str, Any]:
        return {"template": self.template, "refusal": self.refusal, "max_length": self.max_length,
                "max_new_tokens": self.max_new_tokens}

    def data_encoder(self, stage: str):
        cls = DetoxPromptEncoder if stage == "predict" else DetoxifierEncoder
        return cls(self.tokenizer, template=self.template, refusal=self.refusal, max_length=self.max_length)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        positions, targets = supervised_positions(batch["labels"])
        output = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            logits_to_keep=positions)
        return masked_lm_loss(output.logits, targets)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, correct, n_tokens = self.compute_loss(batch)
        size = len(batch["ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/token_acc", correct.float() / max(n_tokens, 1), batch_size=size)
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        loss, correct, n_tokens = self.compute_loss(batch)
        self.metrics[f"{stage}_nll"].update(loss, weight=n_tokens)
        self.metrics[f"{stage}_acc"].update(correct.float() / max(n_tokens, 1), weight=n_tokens)
        self.log(f"{stage}/loss", self.metrics[f"{stage}_nll"], prog_bar=True)
        self.log(f"{stage}/token_acc", self.metrics[f"{stage}_acc"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @torch.no_grad()
    def rewrite_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      max_new_tokens: int | None = None) -> list[str]:
        """Greedy rewrites for a left-padded prompt batch (from `DetoxPromptEncoder`)."""
        return greedy_generate(self.model, self.tokenizer, input_ids, attention_mask,
                               max_new_tokens or self.max_new_tokens)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        rewrites = self.rewrite_batch(batch["input_ids"], batch["attention_mask"])
        return [{"id": i, "original": o, "rewrite": r, "reference": t}
                for i, o, r, t in zip(batch["ids"], batch["originals"], rewrites, batch["targets"])]


def greedy_generate(model: torch.nn.Module, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int) -> list[str]:
    """transformers greedy decoding of left-padded prompts; returns the new text up to EOS."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    finally:
        model.train(was_training)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, input_ids.shape[1]:]]
