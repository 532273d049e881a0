"""Per-sample encoders shared by methods: supervised conversations and generation prompts.

An encoder is the picklable object the data pipeline runs in its workers: `encode(sample)` makes
tensors-to-be for one sample, `collate(items)` pads them into a batch.
"""
from __future__ import annotations

from typing import Any

import torch

from vlsafe.data.encoding.processor import VLMProcessor
from vlsafe.data.schema import Sample


def stack_images(items: list[dict[str, Any]], processor: VLMProcessor, normalized: bool = True) -> torch.Tensor:
    """Concatenate per-sample image stacks in sample order (the order `VLM.embed` consumes them)."""
    stacks = [item["pixel_values"] for item in items if item["pixel_values"].shape[0]]
    if not stacks:
        dtype = torch.float32 if normalized else torch.uint8
        return torch.zeros(0, 3, processor.image_size, processor.image_size, dtype=dtype)
    return torch.cat(stacks)


class ImageEncoding:
    """`normalize_images`: True (default) gives normalised float32 `pixel_values`; `ShardDataModule` turns it
    off in its loader workers, ships uint8 (a quarter of the bytes) and normalises after the device transfer."""

    normalize_images: bool = True
    processor: VLMProcessor

    def pixels(self, sample: Sample) -> torch.Tensor:
        return self.processor.preprocess_images(sample.images, sample.id, normalize=self.normalize_images)


class ConversationEncoder(ImageEncoding):
    """SFT: the whole conversation, labels on assistant replies only, right padding."""

    def __init__(self, processor: VLMProcessor):
        self.processor = processor

    def encode(self, sample: Sample) -> dict[str, Any]:
        encoded = self.processor.encode_conversation(sample.messages, sample.id)
        return {"id": sample.id, "input_ids": encoded.input_ids, "labels": encoded.labels,
                "pixel_values": self.pixels(sample),
                "truncated": encoded.truncated}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.processor.collate_text([i["input_ids"] for i in items], [i["labels"] for i in items], "right")
        batch["pixel_values"] = stack_images(items, self.processor, self.normalize_images)
        batch["ids"] = [i["id"] for i in items]
        batch["num_truncated"] = sum(bool(i["truncated"]) for i in items)
        return batch


def split_reference(sample: Sample) -> tuple[list[dict[str, str]], str | None]:
    """A prompt is the conversation up to its last user turn; a trailing assistant turn is the reference."""
    messages = list(sample.messages)
    reference = None
    if messages and messages[-1]["role"] == "assistant":
        reference = messages.pop()["content"]
    return messages, reference


class PromptEncoder(ImageEncoding):
    """Generation: the prompt up to `ASSISTANT:`, left padding, the reference answer kept aside."""

    def __init__(self, processor: VLMProcessor):
        self.processor = processor

    def encode(self, sample: Sample) -> dict[str, Any]:
        messages, reference = split_reference(sample)
        encoded = self.processor.encode_prompt(messages, sample.id)
        return {"id": sample.id, "input_ids": encoded.input_ids,
                "pixel_values": self.pixels(sample),
                "reference": reference if reference is not None else sample.meta.get("answer"),
                "meta": sample.meta}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.processor.collate_text([i["input_ids"] for i in items], None, "left")
        batch["pixel_values"] = stack_images(items, self.processor, self.normalize_images)
        batch["ids"] = [i["id"] for i in items]
        batch["references"] = [i["reference"] for i in items]
        batch["meta"] = [i["meta"] for i in items]
        return batch
