"""Which module classes are a VLM's repeated transformer blocks: the units sharding and checkpointing act on.

Found by inspecting the built model rather than listed per family, so a recipe never names a class:
- the LLM's decoder layer comes from transformers' own `_no_split_modules` (what `device_map="auto"` also
  refuses to split), e.g. `LlamaDecoderLayer` for Llama/Vicuna, `MistralDecoderLayer`, `Qwen2DecoderLayer`;
- the vision tower's block is the class of the open_clip ViT's `transformer.resblocks` entries
  (`ResidualAttentionBlock`), or an HF vision model's `_no_split_modules` (`CLIPEncoderLayer`).
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import nn


def _hf_block_names(model: nn.Module) -> set[str]:
    """Class names transformers declares unsplittable, over every `PreTrainedModel` inside `model`."""
    names: set[str] = set()
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None)
        if declared and hasattr(module, "config"):
            names.update(declared)
    return names


def _vit_block_types(model: nn.Module) -> set[type[nn.Module]]:
    """Types of the blocks of every open_clip `Transformer` (`.resblocks` ModuleList) inside `model`."""
    found: set[type[nn.Module]] = set()
    for module in model.modules():
        blocks = getattr(module, "resblocks", None)
        if isinstance(blocks, nn.ModuleList):
            found.update(type(block) for block in blocks)
    return found


def block_classes(model: nn.Module, extra: Iterable[str] = ()) -> set[type[nn.Module]]:
    """The transformer-block classes present in `model` (LLM decoder layers and vision blocks).

    `extra` adds class names (e.g. a custom projector block). Raises if nothing is found, because an FSDP
    wrap with no block units silently degrades to one giant unit (all parameters gathered at once).
    """
    wanted = _hf_block_names(model) | set(extra)
    found = {type(m) for m in model.modules() if type(m).__name__ in wanted} | _vit_block_types(model)
    missing = set(extra) - {cls.__name__ for cls in found}
    if missing:
        raise ValueError(f"block classes {sorted(missing)} do not occur in {type(model).__name__}")
    if not found:
        raise ValueError(f"found no transformer blocks in {type(model).__name__}: no transformers model with "
                         "_no_split_modules and no open_clip resblocks; name the classes explicitly")
    return found


def block_modules(model: nn.Module, classes: set[type[nn.Module]] | None = None) -> list[nn.Module]:
    """Every block instance in `model`, in module order (children before the root, as sharding needs)."""
    classes = classes if classes is not None else block_classes(model)
    return [m for m in model.modules() if isinstance(m, tuple(classes))]


def describe(classes: Iterable[type[Any]]) -> str:
    return ", ".join(sorted(f"{c.__module__}.{c.__qualname__}" for c in classes))
