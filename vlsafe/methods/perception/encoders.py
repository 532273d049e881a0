"""Samples -> batches for PerceptionGPT: `<loc>` tokens in the text, their boxes and masks alongside.

Every `<loc>` in a sequence takes one box from `Sample.boxes`, in order: boxes in the user turns are
inputs (their encoding replaces the token embedding), boxes in assistant turns are targets (decoded from
the state before the token, and teacher-forced as inputs like the released code). Boxes are normalised
xyxy in the padded-square frame the image is shown in; masks are padded and resized to that frame.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlsafe.constants import IGNORE_INDEX
from vlsafe.data.encoding.encoders import (
    ConversationEncoder,
    ImageEncoding,
    split_reference,
    stack_images,
)
from vlsafe.data.encoding.processor import VLMProcessor
from vlsafe.data.grounding import LOC_TOKEN, mask_to_frame, normalise_boxes, to_loc_text
from vlsafe.data.schema import Sample, SampleError


def image_size_of(sample: Sample) -> tuple[int, int]:
    """(width, height) of the sample's first image, reading only its header."""
    if not sample.images:
        raise SampleError(sample.id, "images", "boxes refer to the first image, but the sample has none")
    image = sample.images[0]
    try:
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else Path(image).open("rb")
        with Image.open(source) as img:
            return img.size
    except Exception as err:  # PIL raises many types for broken files
        raise SampleError(sample.id, "images[0]", f"cannot read the image size: {err}") from None


def loc_messages(sample: Sample, text_boxes: bool = True) -> list[dict[str, str]]:
    """The sample's messages with box placeholders (and text boxes) written as `<loc>`."""
    return [{"role": m["role"], "content": to_loc_text(m["content"], text_boxes)} for m in sample.messages]


class _Boxes(ImageEncoding):
    """Shared by both encoders: frame-normalised boxes and masks of a sample, checked against its `<loc>`s."""

    def __init__(self, processor: VLMProcessor, loc_token_id: int, mask_size: int, text_boxes: bool):
        self.processor, self.loc_token_id = processor, loc_token_id
        self.mask_size, self.text_boxes = mask_size, text_boxes

    def boxes(self, sample: Sample, count: int) -> torch.Tensor:
        boxes = sample.boxes or []
        if count > len(boxes):
            raise SampleError(sample.id, "boxes", f"the text has {count} {LOC_TOKEN}/box placeholder(s) but the sample "
                                                  f"has {len(boxes)} box(es)")
        if count == 0:
            return torch.zeros(0, 4)
        width, height = image_size_of(sample)
        return normalise_boxes(boxes[:count], width, height, self.processor.pad_to_square)

    def masks(self, sample: Sample, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(indices), S, S) masks in the frame and a validity flag (False where the sample has none)."""
        out = torch.zeros(len(indices), self.mask_size, self.mask_size)
        valid = torch.zeros(len(indices), dtype=torch.bool)
        if sample.masks:
            for row, index in enumerate(indices):
                if index < len(sample.masks):
                    try:
                        out[row] = mask_to_frame(sample.masks[index], self.mask_size, self.processor.pad_to_square)
                    except Exception as err:
                        raise SampleError(sample.id, f"masks[{index}]", f"does not decode: {err}") from None
                    valid[row] = True
        return out, valid

    def count_locs(self, ids: list[int]) -> int:
        return sum(1 for t in ids if t == self.loc_token_id)


class PerceptionEncoder(_Boxes):
    """Training / teacher-forced evaluation: whole conversation, right padding, every box of the text."""

    def encode(self, sample: Sample) -> dict[str, Any]:
        messages = loc_messages(sample, self.text_boxes)
        encoded = self.processor.encode_conversation(messages, sample.id)
        expected = sum(m["content"].count(LOC_TOKEN) for m in messages)
        found = self.count_locs(encoded.input_ids)
        if found != expected and not encoded.truncated:
            raise SampleError(sample.id, "messages", f"{expected} {LOC_TOKEN} in the text became {found} token(s); "
                                                     f"the tokenizer does not know {LOC_TOKEN} as one token")
        positions = [i for i, t in enumerate(encoded.input_ids) if t == self.loc_token_id]
        is_target = torch.tensor([encoded.labels[p] != IGNORE_INDEX for p in positions], dtype=torch.bool)
        boxes = self.boxes(sample, len(positions))
        target_indices = [i for i, t in enumerate(is_target.tolist()) if t]
        masks, valid = self.masks(sample, target_indices)
        return {"id": sample.id, "input_ids": encoded.input_ids, "labels": encoded.labels,
                "pixel_values": self.pixels(sample),
                "loc_boxes": boxes, "loc_is_target": is_target, "target_masks": masks, "target_mask_valid": valid,
                "dataset": str(sample.meta.get("dataset_name") or sample.meta.get("source") or "all"),
                "truncated": encoded.truncated}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = ConversationEncoder.collate(self, items)  # the SFT batch, plus the perception targets
        batch.update(collate_boxes(items, self.mask_size))
        return batch


def first_image_indices(items: list[dict[str, Any]]) -> list[int]:
    """Index in the stacked `pixel_values` of each item's first image (-1 for text-only items)."""
    out, cursor = [], 0
    for item in items:
        count = item["pixel_values"].shape[0]
        out.append(cursor if count else -1)
        cursor += count
    return out


def collate_boxes(items: list[dict[str, Any]], mask_size: int) -> dict[str, Any]:
    """Concatenate per-item boxes in batch-major order and tag every target with its image and dataset."""
    images = first_image_indices(items)
    target_image, target_dataset, target_sample = [], [], []
    for row, item in enumerate(items):
        n = int(item["loc_is_target"].sum())
        target_image += [images[row]] * n
        target_dataset += [item["dataset"]] * n
        target_sample += [row] * n
    return {"loc_boxes": torch.cat([i["loc_boxes"] for i in items]).reshape(-1, 4),
            "loc_is_target": torch.cat([i["loc_is_target"] for i in items]).reshape(-1),
            "target_masks": torch.cat([i["target_masks"] for i in items]).reshape(-1, mask_size, mask_size),
            "target_mask_valid": torch.cat([i["target_mask_valid"] for i in items]).reshape(-1),
            "target_image": torch.tensor(target_image, dtype=torch.long),
            "target_sample": torch.tensor(target_sample, dtype=torch.long),
            "target_dataset": target_dataset, "datasets": [i["dataset"] for i in items]}


class PerceptionPromptEncoder(_Boxes):
    """Generation: the prompt up to `ASSISTANT:` (left padding) with its input boxes; the reference
    answer's boxes and masks are kept aside as targets for scoring."""

    def encode(self, sample: Sample) -> dict[str, Any]:
        messages, reference = split_reference(sample)
        messages = [{"role": m["role"], "content": to_loc_text(m["content"], self.text_boxes)} for m in messages]
        encoded = self.processor.encode_prompt(messages, sample.id)
        n_inputs = self.count_locs(encoded.input_ids)
        n_targets = to_loc_text(reference, self.text_boxes).count(LOC_TOKEN) if reference else 0
        all_boxes = self.boxes(sample, n_inputs + n_targets)
        masks, valid = self.masks(sample, list(range(n_inputs, n_inputs + n_targets)))
        return {"id": sample.id, "input_ids": encoded.input_ids,
                "pixel_values": self.pixels(sample),
                "loc_boxes": all_boxes[:n_inputs], "loc_is_target": torch.zeros(n_inputs, dtype=torch.bool),
                "reference_boxes": all_boxes[n_inputs:], "reference_masks": masks, "reference_mask_valid": valid,
                "reference": reference, "meta": sample.meta,
                "dataset": str(sample.meta.get("dataset_name") or sample.meta.get("source") or "all")}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.processor.collate_text([i["input_ids"] for i in items], None, "left")
        batch["pixel_values"] = stack_images(items, self.processor, self.normalize_images)
        batch["ids"] = [i["id"] for i in items]
        batch["loc_boxes"] = torch.cat([i["loc_boxes"] for i in items]).reshape(-1, 4)
        batch["image_index"] = torch.tensor(first_image_indices(items), dtype=torch.long)
        for key in ("reference_boxes", "reference_masks", "reference_mask_valid", "reference", "meta", "dataset"):
            batch[key] = [i[key] for i in items]
        batch["references"] = batch["reference"]
        return batch
