"""Vision-to-language projectors with LLaVA's module names, so checkpoints map one to one."""
from __future__ import annotations

from torch import nn

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


def build_projector(kind: str, vision_dim: int, llm_dim: int) -> nn.Module:
    """`linear` is Shikra/LLaVA-v0's single layer; `mlp2x_gelu` is LLaVA-1.5's Linear-GELU-Linear.

    The MLP is an `nn.Sequential`, so its parameters are named `0.*` and `2.*` exactly like LLaVA's
    `mm_projector.0/2`, which is what the HF `multi_modal_projector.linear_1/2` names map onto.
    """
    if kind == "linear":
        return nn.Linear(vision_dim, llm_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
    raise ValueError(f"unknown projector type {kind!r}; choose one of {PROJECTOR_TYPES}")


def projector_kind(projector: nn.Module) -> str:
    """Inverse of `build_projector`, used when exporting."""
    if isinstance(projector, nn.Linear):
        return "linear"
    if isinstance(projector, nn.Sequential) and len(projector) == 3 and isinstance(projector[1], nn.GELU):
        return "mlp2x_gelu"
    raise ValueError(f"not a vlsafe projector: {projector.__class__.__name__}")
