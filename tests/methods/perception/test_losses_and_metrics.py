"""Perception losses and grounding metrics against hand-computed values and torchmetrics."""
import pytest
import torch
from torchmetrics.classification import BinaryJaccardIndex

from vlsafe.methods.perception.losses import (
    box_giou_loss,
    box_l1_loss,
    dice_loss,
    mask_bce_loss,
    perception_losses,
)
from vlsafe.methods.perception.metrics import GroundingMetrics, paired_box_iou


def test_giou_loss_matches_hand_computed_values():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [0.5, 0.5, 1.0, 1.0]])
    # overlap 1, union 7, hull 9: GIoU = 1/7 - 2/9;  disjoint: IoU 0, union 2, hull 3: GIoU = -1/3;  equal: 1
    expected = ((1 - (1 / 7 - 2 / 9)) + (1 + 1 / 3) + 0.0) / 3
    assert box_giou_loss(pred, target).item() == pytest.approx(expected, abs=1e-6)


def test_giou_is_computed_on_xyxy_not_on_boxes_reread_as_cxcywh():
    """The released code reads xyxy boxes as (cx, cy, w, h); ours must not (see vlsafe.methods.perception.losses)."""
    pred, target = torch.tensor([[0.1, 0.1, 0.3, 0.3]]), torch.tensor([[0.2, 0.2, 0.4, 0.4]])
    # xyxy: overlap 0.01, union 0.07, hull 0.09
    assert box_giou_loss(pred, target).item() == pytest.approx(1 - (0.01 / 0.07 - 0.02 / 0.09), abs=1e-6)


def test_released_giou_rereads_xyxy_boxes_as_centre_width_height():
    """`giou_boxes="released"`: mllm/utils/box_utils.py:114-125 passes xyxy boxes through xywh2xyxy (cx, cy, w, h)
    before GIoU; transcribed here: x1' = x1 - x2/2, x2' = x1 + x2/2 (same for y)."""
    pred, target = torch.tensor([[0.1, 0.1, 0.3, 0.3]]), torch.tensor([[0.2, 0.2, 0.4, 0.4]])
    # re-read: pred -> [-0.05, -0.05, 0.25, 0.25] (side 0.3), target -> [0.0, 0.0, 0.4, 0.4] (side 0.4)
    inter, union, hull = 0.25 ** 2, 0.3 ** 2 + 0.4 ** 2 - 0.25 ** 2, 0.45 ** 2
    expected = 1 - (inter / union - (hull - union) / hull)
    assert box_giou_loss(pred, target, boxes="released").item() == pytest.approx(expected, abs=1e-6)
    assert box_giou_loss(pred, target, boxes="released").item() != pytest.approx(box_giou_loss(pred, target).item())
    with pytest.raises(ValueError, match="giou_boxes"):
        box_giou_loss(pred, target, boxes="cxcywh")


def test_l1_and_dice_and_bce_match_hand_computed_values():
    assert box_l1_loss(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), torch.tensor([[0.2, 0.2, 0.1, 0.4]])).item() == \
        pytest.approx((0.1 + 0 + 0.2 + 0) / 4)
    probs = torch.tensor([[[1.0, 0.5], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    # mask 1: 2 * 1.5 / (1.5 + 2) = 6/7;  mask 2 (both empty): eps / eps = 1
    assert dice_loss(probs, target).item() == pytest.approx(1 - (6 / 7 + 1) / 2, abs=1e-5)
    logits = torch.tensor([[[0.0, 2.0]]])
    bce = (torch.log(torch.tensor(2.0)) + torch.log1p(torch.exp(torch.tensor(-2.0)))) / 2
    assert mask_bce_loss(logits, torch.tensor([[[1.0, 1.0]]])).item() == pytest.approx(bce.item(), abs=1e-6)
    terms = perception_losses(torch.zeros(1, 4), torch.zeros(1, 4), None, None)
    assert set(terms) == {"box_l1", "box_giou"}, "no mask terms without masks"


def test_acc_at_half_iou_is_strictly_greater_than_half():
    # pixel-scale boxes, so an IoU of exactly 0.5 is exact in float32
    pred = torch.tensor([[0.0, 0.0, 20.0, 10.0], [0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    target = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 12.0], [0.0, 0.0, 10.0, 10.0]])
    ious = paired_box_iou(pred, target)
    assert ious.tolist() == pytest.approx([0.5, 1 / 1.2, 0.0], abs=1e-6)
    metrics = GroundingMetrics()
    metrics.update(pred, target)
    out = metrics.compute()
    assert out["acc@0.5"] == pytest.approx(1 / 3) and out["box_iou"] == pytest.approx((0.5 + 1 / 1.2) / 3, abs=1e-6)


def test_ciou_is_cumulative_and_miou_is_per_mask_mean():
    gt = torch.zeros(3, 2, 2, dtype=torch.bool)
    pred = torch.zeros(3, 2, 2, dtype=torch.bool)
    gt[0, 0, 0] = pred[0, 0, 0] = pred[0, 0, 1] = True           # I 1, U 2
    gt[1, :, :] = True
    pred[1, 0, :] = pred[1, 1, 0] = True                          # I 3, U 4
    # mask 2: both empty -> IoU 1.0 in mIoU, nothing in cIoU
    metrics = GroundingMetrics()
    metrics.update(torch.zeros(0, 4), torch.zeros(0, 4), pred, gt)
    out = metrics.compute()
    assert out["ciou"] == pytest.approx(4 / 6) and out["miou"] == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    reference = BinaryJaccardIndex()
    reference.update(pred.int(), gt.int())
    assert out["ciou"] == pytest.approx(reference.compute().item(), abs=1e-6), "cIoU = torchmetrics' pooled IoU"
