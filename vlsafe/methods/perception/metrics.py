"""REC and RES metrics (accumulated with torchmetrics, so they sync across ranks).

- REC Acc@0.5: share of predicted boxes whose IoU with the ground truth is **strictly** above 0.5
  (Shikra's and PerceptionGPT's `ious > 0.5`); mean box IoU alongside.
- RES cIoU: cumulative intersection over cumulative union of all masks (pixels pooled over the dataset).
- RES mIoU: mean over masks of the per-mask IoU, a mask with an empty union counting as 1.0 (the LISA
  convention the released code calls "gIoU").
Boxes are xyxy in any common frame; masks are booleans of equal size.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchvision.ops import box_iou


def paired_box_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of pred[i] with target[i] (the diagonal of torchvision's pairwise `box_iou`)."""
    if pred.shape[0] == 0:
        return pred.new_zeros(0)
    return torch.diagonal(box_iou(pred.float(), target.float()))


def mask_intersection_union(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask foreground intersection and union pixel counts of boolean (N, H, W) masks."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    return (pred & target).sum(-1).float(), (pred | target).sum(-1).float()


class GroundingMetrics(nn.Module):
    """Acc@0.5, box IoU, cIoU and mIoU over everything passed to `update`."""

    def __init__(self, mask_threshold: float = 0.35):
        super().__init__()
        self.mask_threshold = mask_threshold
        self.acc = MeanMetric()
        self.box_iou = MeanMetric()
        self.intersection = SumMetric()
        self.union = SumMetric()
        self.mask_iou = MeanMetric()
        self.n_masks = SumMetric()

    def update(self, pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, pred_masks: torch.Tensor | None = None,
               gt_masks: torch.Tensor | None = None, mask_valid: torch.Tensor | None = None) -> None:
        if pred_boxes.shape[0]:
            ious = paired_box_iou(pred_boxes, gt_boxes.to(pred_boxes.device))
            self.acc.update((ious > 0.5).float())
            self.box_iou.update(ious)
        if pred_masks is not None and gt_masks is not None:
            if mask_valid is not None:
                pred_masks, gt_masks = pred_masks[mask_valid], gt_masks[mask_valid]
            if pred_masks.shape[0]:
                inter, union = mask_intersection_union(pred_masks, gt_masks)
                self.intersection.update(inter.sum())
                self.union.update(union.sum())
                self.mask_iou.update(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)))
                self.n_masks.update(float(pred_masks.shape[0]))

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.acc.update_count:
            out["acc@0.5"] = float(self.acc.compute())
            out["box_iou"] = float(self.box_iou.compute())
        if self.n_masks.update_count and float(self.n_masks.compute()) > 0:
            out["ciou"] = float(self.intersection.compute() / self.union.compute().clamp(min=1))
            out["miou"] = float(self.mask_iou.compute())
        return out

    def reset(self) -> None:
        for metric in self.children():
            metric.reset()


class DatasetTable:
    """`GroundingMetrics` per dataset name plus an overall row, for split tables."""

    def __init__(self, mask_threshold: float = 0.35):
        self.mask_threshold = mask_threshold
        self.per_dataset: dict[str, GroundingMetrics] = defaultdict(lambda: GroundingMetrics(mask_threshold))
        self.counts: dict[str, int] = defaultdict(int)

    def update(self, dataset: str, pred_box: torch.Tensor, gt_box: torch.Tensor, pred_mask: torch.Tensor | None,
               gt_mask: torch.Tensor | None) -> None:
        masks = (pred_mask is not None and gt_mask is not None)
        for name in (dataset, "all"):
            self.per_dataset[name].update(pred_box.view(1, 4), gt_box.view(1, 4),
                                          pred_mask.unsqueeze(0) if masks else None,
                                          gt_mask.unsqueeze(0) if masks else None)
            self.counts[name] += 1

    def rows(self) -> list[dict[str, float | str | int]]:
        names = sorted(n for n in self.per_dataset if n != "all") + (["all"] if "all" in self.per_dataset else [])
        return [{"dataset": name, "n": self.counts[name], **self.per_dataset[name].compute()} for name in names]
