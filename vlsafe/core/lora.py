"""Trainability of the core: LoRA on the LLM through peft, freeze policies, gradient checkpointing."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from vlsafe.core.vlm import VLM


@dataclass
class LoraSettings:
    """peft LoRA on the LLM only; the projector stays fully trainable alongside (LLaVA's recipe).

    `target_modules="all-linear"` is every linear layer of the LLM except the LM head, which is what
    LLaVA's `find_all_linear_names` selects for a Llama.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    bias: str = "none"
    modules_to_save: list[str] = field(default_factory=list)


def apply_lora(vlm: VLM, settings: LoraSettings) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules, bias=settings.bias,
                        modules_to_save=settings.modules_to_save or None, task_type="CAUSAL_LM")
    vlm.llm = get_peft_model(vlm.llm, config)
    _initialise_meta_adapters(vlm.llm)


def _initialise_meta_adapters(llm: nn.Module) -> None:
    """peft puts adapters on the base weights' device; on a meta skeleton (`load: streamed`) they are given
    memory here and peft's own initialisation (A: Kaiming-uniform, B: zeros), so they are never loaded."""
    for module in llm.modules():
        if not hasattr(module, "reset_lora_parameters"):
            continue
        for adapter in list(getattr(module, "lora_A", {})):
            parts = [module.lora_A[adapter], module.lora_B[adapter]]
            if any(p.is_meta for part in parts for p in part.parameters()):
                for part in parts:
                    part.to_empty(device="cpu")
                module.reset_lora_parameters(adapter, True)


_PEFT_WRAPPERS = ((re.compile(r"^llm\.base_model\.model\."), "llm."), (re.compile(r"\.base_layer\."), "."),
                  (re.compile(r"\.modules_to_save\.[^.]+\."), "."), (re.compile(r"\.original_module\."), "."))


def peft_free_name(name: str) -> str:
    """A VLM parameter name without peft's wrappers (`llm.base_model.model.`, `.base_layer.`, ...): the name the
    same weight has in a model without LoRA, which is what a checkpoint holds."""
    for pattern, replacement in _PEFT_WRAPPERS:
        name = pattern.sub(replacement, name)
    return name


def is_peft(module: nn.Module) -> bool:
    return hasattr(module, "peft_config")


def set_trainable(vlm: VLM, *, train_vision: bool = False, train_projector: bool = True, train_llm: bool = True,
                  lora: LoraSettings | None = None) -> None:
    """Apply a freeze policy. With LoRA the LLM's base weights stay frozen and only adapters train."""
    vlm.vision.requires_grad_(train_vision)
    vlm.projector.requires_grad_(train_projector)
    if lora is not None:
        if not is_peft(vlm.llm):
            apply_lora(vlm, lora)  # peft freezes the base and marks adapters trainable
    else:
        vlm.llm.requires_grad_(train_llm)
    if not train_vision:
        vlm.vision.eval()


def enable_gradient_checkpointing(vlm: VLM, vision: bool = True) -> None:
    """Trade compute for memory in the LLM (and the vision tower if it trains)."""
    llm = vlm.llm
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vlm.llm.config.use_cache = False
    if vision and hasattr(vlm.vision, "set_grad_checkpointing"):
        vlm.vision.set_grad_checkpointing(True)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total
