"""Perception losses as pure functions of tensors (unit-tested against hand-computed values).

Box: L1 + (1 - GIoU) on normalised **xyxy** boxes. The released PerceptionGPT code passes its xyxy boxes
through `xywh2xyxy` before GIoU (`mllm/utils/box_utils.py:114-125`), i.e. it reads (x1, y1, x2, y2) as
(cx, cy, w, h). That term still has its minimum at the right box but its gradients describe the wrong
geometry. `giou_boxes="xyxy"` computes GIoU on the boxes as they are (torchvision's
`generalized_box_iou_loss`); `giou_boxes="released"` re-reads them as the release does.

Mask: mean binary cross-entropy on logits + Dice on probabilities. `dice_reduction="batch"` (released,
`mllm/utils/dice_loss.py:5-28` with `reduce_batch_first=True`) pools the sums over every mask of the batch into
one Dice; `"per_mask"` (vlsafe's variant) averages one Dice per mask, so a small object counts as much as a
large one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss


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


GiouBoxes = Literal["xyxy", "released"]
GIOU_BOXES: tuple[str, ...] = get_args(GiouBoxes)


def box_giou_loss(pred: torch.Tensor, target: torch.Tensor, boxes: str = "xyxy") -> torch.Tensor:
    """Mean of 1 - GIoU for paired (N, 4) xyxy boxes; `boxes="released"` first re-reads both as (cx, cy, w, h)."""
    if boxes not in GIOU_BOXES:
        raise ValueError(f"giou_boxes must be one of {GIOU_BOXES}, got {boxes!r}")
    pred, target = pred.float(), target.float()
    if boxes == "released":
        pred, target = box_convert(pred, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy")
    return generalized_box_iou_loss(pred, target, reduction="mean")


DiceReduction = Literal["batch", "per_mask"]
DICE_REDUCTIONS: tuple[str, ...] = get_args(DiceReduction)


def dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-6,
              reduction: str = "per_mask") -> torch.Tensor:
    """1 - (2 * sum(p * g) + eps) / (sum(p) + sum(g) + eps) for (N, H, W) masks.

    `reduction="per_mask"`: sums over each mask, then the mean of the N Dice values. `"batch"` (released):
    one Dice whose sums run over all N masks together (an empty batch, where both sums are 0, gives loss 0)."""
    if reduction not in DICE_REDUCTIONS:
        raise ValueError(f"dice_reduction must be one of {DICE_REDUCTIONS}, got {reduction!r}")
    probs, target = probs.float().flatten(1), target.float().flatten(1)
    if reduction == "batch":
        probs, target = probs.flatten().unsqueeze(0), target.flatten().unsqueeze(0)
    dice = (2 * (probs * target).sum(-1) + eps) / (probs.sum(-1) + target.sum(-1) + eps)
    return 1 - dice.mean()


def mask_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with logits over every pixel of every mask."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def perception_losses(pred_boxes: torch.Tensor, target_boxes: torch.Tensor, mask_logits: torch.Tensor | None,
                      target_masks: torch.Tensor | None, dice_reduction: DiceReduction = "per_mask",
                      giou_boxes: GiouBoxes = "xyxy") -> dict[str, torch.Tensor]:
    """The four unweighted terms; mask terms are absent when there are no masks to supervise."""
    losses = {"box_l1": box_l1_loss(pred_boxes, target_boxes),
              "box_giou": box_giou_loss(pred_boxes, target_boxes, giou_boxes)}
    if mask_logits is not None and mask_logits.shape[0]:
        losses["mask_bce"] = mask_bce_loss(mask_logits, target_masks)
        losses["mask_dice"] = dice_loss(mask_logits.float().sigmoid(), target_masks, reduction=dice_reduction)
    return losses
