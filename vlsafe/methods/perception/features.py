"""Which vision-tower features the perception heads read (`MaskDecoderSettings.vision_features`).

- `"select_layer"` (vlsafe's default before this option): the decoder reads the same one-layer features the
  projector reads (LLaVA's layer -2; the tiny demo tower's last block), so the tower runs once and stops early.
- `"merged"` (released PerceptionGPT): a learned softmax-weighted sum of the tower's HF-style
  `hidden_states[:-1]` (the embedding output and blocks 1..L-1, i.e. 24 of CLIP-L's 25), one weight per layer,
  initialised to 1/L, so the first merge is the plain mean (perceptionGPT.py:186-189, weights :317-318).
  The LLM keeps its own `select_layer` features: both come from one tower pass that runs to the deeper of
  block L-1 and the select layer (for LLaVA's -2 that is block L-1, exactly the default path's cost).

The released code also merges the LLM's own features (`merge_coef_lower`, :186-187, on a second 224 px
tower pass); vlsafe keeps the LLM on `select_layer`, the features its pretrained projector was trained on.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

VisionFeatures = Literal["select_layer", "merged"]
VISION_FEATURES: tuple[str, ...] = get_args(VisionFeatures)


class LayerMerge(nn.Module):
    """sum_k softmax(w)_k * h_k over `num_states` hidden states, w initialised to 1/num_states (released)."""

    def __init__(self, num_states: int):
        super().__init__()
        if num_states < 1:
            raise ValueError(f"a layer merge needs at least one hidden state, got {num_states}")
        self.weights = nn.Parameter(torch.full([num_states], 1.0 / num_states))

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        """`states`: `num_states` tensors (N, P, D) -> (N, P, D), in float32 at least (the weights' dtype)."""
        if len(states) != self.weights.numel():
            raise ValueError(f"layer merge has {self.weights.numel()} weights but got {len(states)} hidden states")
        coef = self.weights.softmax(dim=0)
        stacked = torch.stack(states, dim=-1)  # (N, P, D, K)
        return stacked.to(torch.promote_types(stacked.dtype, coef.dtype)) @ coef


def merged_state_count(num_layers: int) -> int:
    """How many hidden states the released merge reads: `hidden_states[:-1]` of an L-block tower = L."""
    return num_layers


def perception_vision(vlm, pixel_values: torch.Tensor,
                      merge: LayerMerge | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features for the projector, features for the perception decoder) from normalised pixels.

    Without `merge` both are `vlm.vision_features` (one tower pass, stopping at the select layer). With it the
    tower runs once to the deeper of the select layer and block L-1 and both are read from that pass; the tower
    keeps autograd off when it is frozen, while the merge weights always get gradients."""
    if merge is None:
        vision = vlm.vision_features(pixel_values)
        return vision, vision
    tower = vlm.vision
    select = tower.hf_index()
    vision_trainable = any(p.requires_grad for p in tower.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and vision_trainable):
        states = tower.hidden_states(pixel_values, last=max(select, tower.num_layers - 1))
    return states[select], merge(states[:tower.num_layers])
