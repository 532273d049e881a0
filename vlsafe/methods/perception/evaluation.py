"""Grounding predictions for a list of samples, from a perception model or a text-coordinate model.

- A `PerceptionModule` generates freely; the box (and mask) decoded at its i-th emitted `<loc>` is its
  answer for the i-th box of the reference answer.
- Any other vlsafe module (e.g. SFT on text coordinates) generates text; the i-th "[x1, y1, x2, y2]" in
  it is read as a normalised box in the padded-square frame (Shikra's convention; for square images that is
  the image itself). Text models predict no masks.
A missing prediction scores IoU 0 (and an empty mask), so models are never rewarded for staying silent.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from vlsafe.data.encoding.encoders import PromptEncoder, split_reference
from vlsafe.data.grounding import (
    LOC_TOKEN,
    TEXT_BOX,
    mask_to_frame,
    normalise_boxes,
    to_loc_text,
)
from vlsafe.data.schema import Sample
from vlsafe.methods.perception.encoders import PerceptionPromptEncoder, image_size_of
from vlsafe.methods.perception.metrics import (
    DatasetTable,
    mask_intersection_union,
    paired_box_iou,
)


@dataclass
class GroundingPrediction:
    """One reference box of one sample, with what the model answered for it."""

    sample: Sample
    index: int
    dataset: str
    text: str
    gt_box: torch.Tensor
    pred_box: torch.Tensor | None
    gt_mask: torch.Tensor | None = None
    pred_mask: torch.Tensor | None = None
    box_iou: float = 0.0
    mask_iou: float | None = None
    mask_box: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """JSON-safe row for predictions.jsonl."""
        return {"id": self.sample.id, "box_index": self.index, "dataset": self.dataset,
                "expression": self.sample.meta.get("expression"), "answer": self.text,
                "gt_box": [round(v, 4) for v in self.gt_box.tolist()],
                "pred_box": None if self.pred_box is None else [round(v, 4) for v in self.pred_box.tolist()],
                "box_iou": round(self.box_iou, 4), "hit@0.5": self.box_iou > 0.5,
                "mask_iou": None if self.mask_iou is None else round(self.mask_iou, 4),
                "mask_box": None if self.mask_box is None else [round(v, 4) for v in self.mask_box.tolist()]}


def is_perception_model(module: Any) -> bool:
    return hasattr(module, "heads") and hasattr(module, "loc_token_id")


def mask_bounding_box(mask: torch.Tensor) -> torch.Tensor:
    """Normalised xyxy box around a boolean (S, S) mask (exclusive x2, y2; zeros when the mask is empty)."""
    ys, xs = mask.nonzero(as_tuple=True)
    if xs.numel() == 0:
        return torch.zeros(4)
    side = mask.new_tensor([mask.shape[1], mask.shape[0], mask.shape[1], mask.shape[0]], dtype=torch.float)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float() / side


def parse_text_boxes(text: str) -> list[torch.Tensor]:
    """Every "[x1, y1, x2, y2]" in `text`, in order, as normalised boxes."""
    out = []
    for match in TEXT_BOX.finditer(text):
        values = [float(v) for v in match.group(0).strip("[]").split(",")]
        out.append(torch.tensor(values))
    return out


def reference_targets(sample: Sample, mask_size: int, pad_to_square: bool,
                      text_boxes: bool = True) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Normalised GT boxes (k, 4) of the reference answer and their frame masks (None where absent)."""
    prompt, reference = split_reference(sample)
    n_inputs = sum(to_loc_text(m["content"], text_boxes).count(LOC_TOKEN) for m in prompt)
    n_targets = to_loc_text(reference or "", text_boxes).count(LOC_TOKEN)
    boxes = (sample.boxes or [])[n_inputs:n_inputs + n_targets]
    if not boxes:
        return torch.zeros(0, 4), []
    width, height = image_size_of(sample)
    masks: list[torch.Tensor | None] = []
    for i in range(n_inputs, n_inputs + len(boxes)):
        has = sample.masks is not None and i < len(sample.masks)
        masks.append(mask_to_frame(sample.masks[i], mask_size, pad_to_square) > 0.5 if has else None)
    return normalise_boxes(boxes, width, height, pad_to_square), masks


@torch.no_grad()
def _answers(module: Any, samples: list[Sample], batch_size: int, max_new_tokens: int,
             progress: bool) -> list[tuple[str, list[torch.Tensor], list[torch.Tensor | None]]]:
    """(text, boxes, mask logits) per sample."""
    perception = is_perception_model(module)
    processor = module.processor
    if perception:
        encoder = PerceptionPromptEncoder(processor, module.loc_token_id, module.mask_size, module.text_boxes)
    else:
        encoder = PromptEncoder(processor)
    starts = range(0, len(samples), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="grounding", unit="batch")
    out = []
    for start in starts:
        items = [encoder.encode(s) for s in samples[start:start + batch_size]]
        batch = encoder.collate(items)
        if perception:
            for result in module.generate_perception(batch, max_new_tokens=max_new_tokens):
                out.append((processor.decode(result.token_ids), result.boxes, result.mask_logits))
        else:
            device = module.device
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            texts = module.generate_batch(batch, max_new_tokens=max_new_tokens, do_sample=False)
            out += [(text, parse_text_boxes(text), []) for text in texts]
    return out


def ground_samples(module: Any, samples: Iterable[Sample], *, batch_size: int = 16, max_new_tokens: int = 32,
                   mask_threshold: float | None = None, progress: bool = False) -> list[GroundingPrediction]:
    """Generate for every sample with a reference box and pair predictions with references in order."""
    usable = [s for s in samples if s.boxes and s.images and split_reference(s)[1]]
    processor = module.processor
    mask_size = getattr(module, "mask_size", processor.image_size)
    threshold = getattr(module, "mask_threshold", 0.35) if mask_threshold is None else mask_threshold
    was_training = module.training
    module.eval()
    try:
        answers = _answers(module, usable, batch_size, max_new_tokens, progress)
    finally:
        module.train(was_training)
    predictions = []
    for sample, (text, boxes, masks) in zip(usable, answers):
        gt_boxes, gt_masks = reference_targets(sample, mask_size, processor.pad_to_square,
                                               getattr(module, "text_boxes", True))
        dataset = str(sample.meta.get("dataset_name") or sample.meta.get("source") or "all")
        for i, gt_box in enumerate(gt_boxes):
            pred_box = boxes[i].float().clamp(0, 1) if i < len(boxes) else None
            pred = GroundingPrediction(sample, i, dataset, text, gt_box, pred_box, gt_masks[i])
            if pred_box is not None:
                pred.box_iou = float(paired_box_iou(pred_box.view(1, 4), gt_box.view(1, 4))[0])
            if gt_masks[i] is not None and is_perception_model(module):
                logits = masks[i] if i < len(masks) else None
                pred.pred_mask = (logits.sigmoid() > threshold) if logits is not None else \
                    torch.zeros_like(gt_masks[i])
                inter, union = mask_intersection_union(pred.pred_mask.unsqueeze(0), gt_masks[i].unsqueeze(0))
                pred.mask_iou = float(inter / union) if float(union) > 0 else 1.0
                pred.mask_box = mask_bounding_box(pred.pred_mask)
            predictions.append(pred)
    return predictions


def summarise(predictions: list[GroundingPrediction]) -> list[dict[str, Any]]:
    """Per-dataset rows (and "all"): n, acc@0.5 and box_iou of the box head, ciou and miou of the masks, and
    `mask_box_acc@0.5` / `mask_box_iou`: the same box scores for the bounding box of the predicted mask (a
    second, separately labelled reading of where the model thinks the object is)."""
    table, mask_boxes = DatasetTable(), DatasetTable()
    for p in predictions:
        pred_box = p.pred_box if p.pred_box is not None else torch.zeros(4)
        table.update(p.dataset, pred_box, p.gt_box, p.pred_mask, p.gt_mask if p.pred_mask is not None else None)
        if p.mask_box is not None:
            mask_boxes.update(p.dataset, p.mask_box, p.gt_box, None, None)
    extra = {row["dataset"]: row for row in mask_boxes.rows()}
    rows = table.rows()
    for row in rows:
        if row["dataset"] in extra:
            row["mask_box_acc@0.5"] = extra[row["dataset"]]["acc@0.5"]
            row["mask_box_iou"] = extra[row["dataset"]]["box_iou"]
    return rows


__all__ = ["GroundingPrediction", "ground_samples", "summarise", "parse_text_boxes", "reference_targets",
           "is_perception_model", "mask_bounding_box"]
