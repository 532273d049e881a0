"""Perception losses as pure functions of tensors (unit-tested against hand-computed values).

Box: L1 + (1 - GIoU) on normalised **xyxy** boxes. The released PerceptionGPT code passes its xyxy boxes
through `xywh2xyxy` before GIoU, i.e. it reads (x1, y1, x2, y2) as (cx, cy, w, h). That term still has
its minimum at the right box but its gradients describe the wrong geometry; we compute GIoU on the boxes
as they are (torchvision's `generalized_box_iou_loss`).

Mask: mean binary cross-entropy on logits + Dice on probabilities, per mask then averaged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss


@dataclass
class LossWeights:
    """Weights of the four perception terms next to the LM loss (the released config uses 1 for all)."""

    lm: float = 1.0
    box_l1: float = 1.0
    box_giou: float = 1.0
    mask_bce: float = 1.0
    mask_dice: float = 1.0


def box_l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all coordinates of (N, 4) boxes."""
    return F.l1_loss(pred.float(), target.float())


def box_giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - GIoU for paired (N, 4) xyxy boxes."""
    return generalized_box_iou_loss(pred.float(), target.float(), reduction="mean")


def dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - mean over masks of (2 * sum(p * g) + eps) / (sum(p) + sum(g) + eps), sums over each (H, W) mask."""
    probs, target = probs.float().flatten(1), target.float().flatten(1)
    dice = (2 * (probs * target).sum(-1) + eps) / (probs.sum(-1) + target.sum(-1) + eps)
    return 1 - dice.mean()


def mask_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with logits over every pixel of every mask."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def perception_losses(pred_boxes: torch.Tensor, target_boxes: torch.Tensor, mask_logits: torch.Tensor | None,
                      target_masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The four unweighted terms; mask terms are absent when there are no masks to supervise."""
    losses = {"box_l1": box_l1_loss(pred_boxes, target_boxes), "box_giou": box_giou_loss(pred_boxes, target_boxes)}
    if mask_logits is not None and mask_logits.shape[0]:
        losses["mask_bce"] = mask_bce_loss(mask_logits, target_masks)
        losses["mask_dice"] = dice_loss(mask_logits.float().sigmoid(), target_masks)
    return losses
