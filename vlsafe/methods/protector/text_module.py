"""What the text-only method modules (harm detector, detoxifier) share: build a text LM, LoRA, optimiser.

They are `MethodModule`s (the base `tools/fit.py` accepts), not `VLMModule`s: they own no VLM, and the model
is a plain transformers LM built by a `vlsafe.methods.protector.builders.TextLMBuilder`. Hyperparameters are plain
data, so checkpoints load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from vlsafe.core.lora import LoraSettings, count_parameters
from vlsafe.methods.base import MethodModule, OptimSettings, _as, lr_lambda
from vlsafe.methods.protector.builders import TextLMBuilder

PEFT_TASKS = {"classifier": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


def apply_text_lora(model: torch.nn.Module, settings: LoraSettings, head: str) -> torch.nn.Module:
    """peft LoRA with the task type of the head. For `SEQ_CLS`, peft adds the classification head
    (`score`/`classifier`) to `modules_to_save`, so the freshly initialised head trains in full."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules, bias=settings.bias,
                        modules_to_save=settings.modules_to_save or None, task_type=PEFT_TASKS[head])
    return get_peft_model(model, config)


class TextLMModule(MethodModule):
    """One transformers LM (`self.model`) and its tokenizer; LoRA optional; AdamW + warmup/decay per step."""

    head: str = "causal_lm"

    def __init__(self, model: TextLMBuilder | dict[str, Any], lora: LoraSettings | dict[str, Any] | None = None,
                 optim: OptimSettings | dict[str, Any] | None = None, gradient_checkpointing: bool = False):
        super().__init__()
        builder = TextLMBuilder.from_config(model)
        self.lora = _as(LoraSettings, lora)
        self.optim = _as(OptimSettings, optim) or OptimSettings()
        self.save_hyperparameters({"model": builder.config(), "lora": asdict(self.lora) if self.lora else None,
                                   "optim": asdict(self.optim), "gradient_checkpointing": gradient_checkpointing,
                                   **self.extra_hparams()})
        self.model, self.tokenizer = builder.build(self.head)
        if self.lora is not None:
            self.model = apply_text_lora(self.model, self.lora, self.head)
        if gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            self.model.config.use_cache = False
        self.model.train()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 and "norm" not in name.lower() else no_decay).append(param)
        if not decay and not no_decay:
            raise ValueError("nothing to train: every parameter is frozen")
        groups = [{"params": decay, "weight_decay": self.optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        # torch's default AdamW kernel here, whatever `optim.fused` says: switching these modules to the fused
        # kernel (same maths to 1e-7) moved their short learning-test runs across thresholds; to do when those
        # tests are made robust.
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = self.optim.warmup_steps if self.optim.warmup_steps is not None else int(
            round(self.optim.warmup_ratio * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.optim.schedule, warmup, total, self.optim.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        trainable, total = count_parameters(self.model)
        self.print(f"vlsafe: {trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")

    def merged_model(self) -> torch.nn.Module:
        """The model with any LoRA adapter merged in (a copy; this module keeps training as it was)."""
        import copy

        model = copy.deepcopy(self.model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        return model.eval()
