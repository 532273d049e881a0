"""Token log-probabilities and the masked LM loss: the arithmetic every method shares.

All functions take logits already aligned with their targets (`logits[:, i]` predicts `targets[:, i]`) and skip
`IGNORE_INDEX` targets, so prompt, image and padding tokens never count.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vlsafe.constants import IGNORE_INDEX
from vlsafe.core.vlm import VLM


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


def response_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                      average: bool = False) -> torch.Tensor:
    """Per-row sum (or mean) of target-token log-probs; `logits[:, i]` predicts `targets[:, i]`."""
    mask = targets != ignore_index
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    total = picked.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def sequence_logps(vlm: VLM, batch: dict[str, Any], features: torch.Tensor | None,
                   average: bool = False) -> torch.Tensor:
    """Response log-probs of every sequence in a `PreferenceEncoder` batch, shape (k * B,).

    `features` are the image features for all k response groups (k copies of the per-sample features).
    Only positions that predict response tokens go through the LM head.
    """
    positions, targets = supervised_positions(batch["labels"])
    logits = vlm(batch["input_ids"], batch["attention_mask"], image_features=features,
                 logits_to_keep=positions).logits
    return response_logprobs(logits, targets, IGNORE_INDEX, average=average)
