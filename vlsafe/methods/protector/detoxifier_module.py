"""MLLM-Protector's detoxifier: SFT of a causal LM (LoRA) that rewrites a harmful answer into a harmless one.

Training pairs come from labelled response pairs (PKU-SafeRLHF, synthetic `harm_text`): the prompt is the
preset's training template filled with the question and the *less safe* response; the target is the safer
response followed by EOS, or the preset's fixed refusal when the responses are unsafe. The prompt tokens are
masked out of the loss. `preset` (`vlsafe.methods.protector.presets`):

- `released` (default; the paper recipe): the released script's prompt with the question, target
  "Sorry, I can not answer this question." when both responses are unsafe, ids tokenized as released;
  `vlsafe.methods.protector.Detoxifier` then prompts *without* the question, as the released evaluation does;
- `vlsafe`: one prompt with the question (`DETOX_TEMPLATE`) for training and inference, the guard's refusal
  as the both-unsafe target.

Rewrite lengths default to the released `generate(max_length=1024)`: prompt + rewrite at most
`max_total_tokens` (1024); `max_new_tokens` caps the rewrite itself (None: no extra cap).
"""
from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric

from vlsafe.core.lora import LoraSettings
from vlsafe.methods.base import OptimSettings
from vlsafe.methods.logprobs import masked_lm_loss, supervised_positions
from vlsafe.methods.protector.builders import TextLMBuilder
from vlsafe.methods.protector.encoders import (
    DEFAULT_MAX_LENGTH,
    DetoxifierEncoder,
    DetoxPromptEncoder,
)
from vlsafe.methods.protector.presets import PresetName, get_preset
from vlsafe.methods.protector.text_module import TextLMModule

#: released rewrite length: `detoxifier.generate(input_ids, max_length=1024)` (robustness_eval.py:137)
RELEASED_DETOX_MAX_TOTAL_TOKENS = 1024


class DetoxifierModule(TextLMModule):
    """Masked-prompt SFT of the rewriting LM; `val/loss` and `val/token_acc` as torchmetrics."""

    head = "causal_lm"

    def __init__(self, model: TextLMBuilder, lora: LoraSettings | None = None, optim: OptimSettings | None = None,
                 template: str | None = None,
                 refusal: str | None = None, max_length: int = DEFAULT_MAX_LENGTH, max_new_tokens: int | None = None,
                 gradient_checkpointing: bool = False, preset: PresetName = "released",
                 max_total_tokens: int | None = RELEASED_DETOX_MAX_TOTAL_TOKENS):
        settings = get_preset(preset)
        template = template if template is not None else settings.detox_train_template
        for slot in ("{question}", "{answer}"):
            if slot not in template:
                raise ValueError(f"the detoxifier template must contain {slot}")
        self.preset, self.template = settings.name, template
        self.refusal = refusal if refusal is not None else settings.both_unsafe_target
        self.max_length, self.max_new_tokens, self.max_total_tokens = max_length, max_new_tokens, max_total_tokens
        super().__init__(model, lora, optim, gradient_checkpointing)
        self.metrics = torch.nn.ModuleDict({f"{stage}_{name}": MeanMetric() for stage in ("val", "test")
                                            for name in ("nll", "acc")})

    def extra_hparams(self) -> dict[str, Any]:
        return {"template": self.template, "refusal": self.refusal, "max_length": self.max_length,
                "max_new_tokens": self.max_new_tokens, "preset": self.preset, "max_total_tokens": self.max_total_tokens}

    @property
    def inference_template(self) -> str:
        """The prompt at inference: released drops the question; vlsafe uses the training template."""
        return self.template if self.preset == "vlsafe" else get_preset(self.preset).detox_inference_template

    def data_encoder(self, stage: str):
        if stage == "predict":
            return DetoxPromptEncoder(self.tokenizer, template=self.inference_template, refusal=self.refusal,
                                      max_length=self.max_length, preset=self.preset)
        return DetoxifierEncoder(self.tokenizer, template=self.template, refusal=self.refusal,
                                 max_length=self.max_length, preset=self.preset)

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
        """Rewrites for a left-padded prompt batch (from `DetoxPromptEncoder`), decoded as the preset says."""
        settings = get_preset(self.preset)
        return generate_rewrites(self.model, self.tokenizer, input_ids, attention_mask,
                                 max_new_tokens or self.max_new_tokens, self.max_total_tokens,
                                 greedy=settings.detox_greedy, tidy=settings.tidy_rewrite)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        rewrites = self.rewrite_batch(batch["input_ids"], batch["attention_mask"])
        return [{"id": i, "original": o, "rewrite": r, "reference": t}
                for i, o, r, t in zip(batch["ids"], batch["originals"], rewrites, batch["targets"])]


def rewrite_budgets(prompt_lengths: list[int], max_new_tokens: int | None, max_total_tokens: int | None
                    ) -> list[int]:
    """New-token budget per prompt: the released `generate(max_length=L)` counts the prompt, so a prompt of n
    tokens gets L - n (at most `max_new_tokens`); 0 means the prompt leaves no room."""
    if max_new_tokens is None and max_total_tokens is None:
        raise ValueError("set max_new_tokens or max_total_tokens: an unbounded rewrite never ends on a weak model")
    budgets = []
    for n in prompt_lengths:
        budget = max_new_tokens if max_new_tokens is not None else max_total_tokens
        if max_total_tokens is not None:
            budget = min(budget, max_total_tokens - n)
        budgets.append(max(budget, 0))
    return budgets


def generate_rewrites(model: torch.nn.Module, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      max_new_tokens: int | None, max_total_tokens: int | None = None, greedy: bool = True,
                      tidy: bool = True) -> list[str]:
    """Rewrites of left-padded prompts, each up to its own budget (`rewrite_budgets`), decoded without special
    tokens. `greedy=False` leaves decoding to the model's generation_config, as the released call does;
    `tidy` strips the text. The batch generates up to the largest budget and each row is cut to its own,
    which for greedy decoding matches generating the prompts one by one, as the released evaluation does (up to
    floating-point differences from padding)."""
    lengths = attention_mask.sum(dim=1).tolist()
    budgets = rewrite_budgets(lengths, max_new_tokens, max_total_tokens)
    if max(budgets) == 0:
        return [""] * len(budgets)
    device = next(model.parameters()).device
    options: dict[str, Any] = {"max_new_tokens": max(budgets), "pad_token_id": tokenizer.pad_token_id}
    if greedy:
        options.update(do_sample=False, eos_token_id=tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **options)
    finally:
        model.train(was_training)
    new = out[:, input_ids.shape[1]:]
    texts = [tokenizer.decode(row[:budget], skip_special_tokens=True) for row, budget in zip(new, budgets)]
    return [text.strip() for text in texts] if tidy else texts

