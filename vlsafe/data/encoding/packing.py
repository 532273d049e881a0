"""Padding-free SFT batches: the samples of one batch packed into fewer rows (issue 19 §3).

A padded batch of B conversations costs B x (longest sample) tokens of compute; LLaVA-665k lengths run from
a few dozen to over a thousand tokens (plus 576 image tokens each), so much of that is padding. Packing
concatenates whole samples into rows, restarts the position ids at every sample start, and the model
(`vlsafe.core.vlm.VLM.forward(position_ids=...)`) keeps attention inside each sample, so every token sees
exactly what it sees in the padded batch: same loss, same gradients, fewer tokens.

Packing happens *inside* one batch of B samples (the collate step), never across batches. That keeps what
the data pipeline promises: `len()` of a `ShardStream` is exact, resume positions are `batches x B` samples,
and DDP ranks run the same number of steps. The cost of that choice: a step still trains exactly B samples,
so the saving is compute per step (B samples in fewer, fuller rows), not more samples per step; greedy
packing to a token budget across batches would fill rows further but makes the number of steps depend on
the lengths of the samples drawn (not computable before the epoch is read), which breaks both promises.
"""
from __future__ import annotations

from typing import Any

import torch

from vlsafe.constants import IGNORE_INDEX
from vlsafe.data.encoding.encoders import ConversationEncoder, stack_images
from vlsafe.data.encoding.processor import VLMProcessor


def plan_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing, each row's total length <= `capacity` (a sample longer
    than `capacity` gets a row of its own). Deterministic; each row keeps its samples in batch order."""
    if capacity < 1:
        raise ValueError(f"packing capacity must be a positive number of tokens, got {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        for row, free in enumerate(room):
            if length <= free:
                rows[row].append(index)
                room[row] -= length
                break
        else:
            rows.append([index])
            room.append(capacity - length)
    return [sorted(row) for row in rows]


class PackedConversationEncoder(ConversationEncoder):
    """SFT conversations, each batch packed into rows of at most `max_tokens` tokens (image tokens included).

    `max_tokens` None (default): the processor's `max_length`, the longest a sample can be; a row is never
    shorter than the batch's longest sample. With SDPA/eager attention a row's attention is computed over the
    whole row (the mask is dense, only its result is block-diagonal), so fewer, longer rows trade linear-layer
    work (saved) against attention work (spent); at LLM widths the linear layers dominate (attention is about
    row length / (6 x hidden) of them: 8% for a 2,048-token row of a 4,096-wide 7B), and with flash attention
    (varlen) a long row costs nothing extra. `max_tokens=1` keeps rows as short as the longest sample.

    Batch keys: `input_ids`, `labels` (each sample's first label ignored, as in its own row: nothing predicts
    it), `attention_mask` (1 on real tokens), `position_ids` (0.. at every sample start; the right padding of a
    row counts 0.. too, a segment of its own), `pixel_values` and `ids` in packed order (the order the model
    splices image features in), `num_truncated`.
    """

    def __init__(self, processor: VLMProcessor, max_tokens: int | None = None):
        super().__init__(processor)
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"packing max_tokens must be a positive number of tokens or None, got {max_tokens}")
        self.max_tokens = max_tokens

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(item["input_ids"]) for item in items]
        if not lengths or min(lengths) == 0:
            raise ValueError("cannot pack an empty batch or a sample with no tokens")
        capacity = max(self.max_tokens or self.processor.max_length, max(lengths))
        rows = plan_rows(lengths, capacity)
        width = max(sum(lengths[i] for i in row) for row in rows)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.processor.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for index in row:
                end = start + lengths[index]
                input_ids[r, start:end] = torch.tensor(items[index]["input_ids"], dtype=torch.long)
                labels[r, start:end] = torch.tensor(items[index]["labels"], dtype=torch.long)
                labels[r, start] = IGNORE_INDEX  # the previous sample's last token must not learn to predict it
                attention_mask[r, start:end] = 1
                position_ids[r, start:end] = torch.arange(lengths[index])
                start = end
            position_ids[r, start:] = torch.arange(width - start)
        order = [items[i] for row in rows for i in row]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "position_ids": position_ids,
                "pixel_values": stack_images(order, self.processor, self.normalize_images),
                "ids": [item["id"] for item in order],
                "num_truncated": sum(bool(item["truncated"]) for item in items)}
