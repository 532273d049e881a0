"""LLaVA's `group_by_modality_length`, for a stream: batches of one modality and of similar length.

LLaVA-1.5's trainer (`llava/train/llava_trainer.py`, `get_modality_length_grouped_indices`, switched on by
`--group_by_modality_length True` in `scripts/v1_5/finetune.sh`) splits the whole dataset into image and
text-only samples, cuts each (randomly permuted) into megabatches of `world_size * batch_size`, sorts every
megabatch by length (words in the conversation) and shuffles the megabatches; the odd ends of both
modalities form the last, mixed, megabatch. Batches then pad less and never mix text-only with image
samples.

vlsafe reads shards as streams, so it does the same within each dataloader worker's stream: samples gather
per modality until one has a megabatch, which is emitted sorted by length (longest first, as LLaVA);
what is left at the end of the epoch comes last, also sorted. The stream is only reordered (same samples,
same count), deterministically, so `len()`, exact resume and equal step counts are unaffected.
Differences from LLaVA, documented in docs/data_performance.md: megabatches form per worker (so the
ranks of one step are not forced onto the same modality), and in stream order instead of a fresh
permutation.
"""
from __future__ import annotations

from typing import Iterator

from vlsafe.data.schema import Sample


def conversation_length(sample: Sample) -> int:
    """LLaVA's `modality_lengths` measure: whitespace-separated words over all turns."""
    return sum(len(str(message.get("content", "")).split()) for message in sample.messages)


def group_by_modality_length(samples: Iterator[Sample], megabatch: int) -> Iterator[Sample]:
    """Reorder `samples` into single-modality megabatches of `megabatch`, each sorted by length, longest first."""
    if megabatch < 1:
        raise ValueError(f"megabatch must be >= 1, got {megabatch}")
    pools: dict[bool, list[Sample]] = {True: [], False: []}
    for sample in samples:
        pool = pools[bool(sample.images)]
        pool.append(sample)
        if len(pool) == megabatch:
            yield from sorted(pool, key=conversation_length, reverse=True)
            pool.clear()
    yield from sorted(pools[True] + pools[False], key=conversation_length, reverse=True)
