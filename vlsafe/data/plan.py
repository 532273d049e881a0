"""Epoch planning: which samples each (rank, dataloader worker) reads, computed from shard counts alone.

Every process computes the same plan from the shard index, the seed and the epoch, so no coordination
is needed. The plan
1. allots each source `round(weight * size)` samples (or `num_samples`): whole passes over the source
   plus a seeded random subset for the fractional part, which is how safety data is mixed into
   instruction data at a chosen ratio;
2. lays all reads out in one (optionally shuffled) sequence of shard pieces, and
3. cuts that sequence into `world_size * num_workers` contiguous slices whose sizes differ by at most
   one sample, so each sample is read exactly once per epoch and every shard is opened by at most a
   couple of slots.

Training additionally pads every worker to the same multiple of the batch size (by repeating samples it
already read), because DDP ranks must run the same number of steps.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from vlsafe.data.shards import ShardInfo


@dataclass(frozen=True)
class PlannedSource:
    name: str
    shards: tuple[ShardInfo, ...]
    weight: float = 1.0
    num_samples: int | None = None

    @property
    def size(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def allotment(self) -> int:
        """Samples this source contributes to one epoch."""
        if self.num_samples is not None:
            return int(self.num_samples)
        return int(round(self.weight * self.size))


@dataclass(frozen=True)
class ReadPiece:
    """Read `positions` (in order) from one shard of one source."""

    source: str
    url: str
    positions: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.positions)


def _source_pieces(source: PlannedSource, rng: random.Random) -> list[ReadPiece]:
    total = source.size
    if total == 0 or source.allotment == 0:
        return []
    passes, remainder = divmod(source.allotment, total)
    pieces = [ReadPiece(source.name, shard.url, tuple(range(shard.count)))
              for _ in range(passes) for shard in source.shards if shard.count]
    if remainder:
        chosen = sorted(rng.sample(range(total), remainder))
        offset, cursor = 0, 0
        for shard in source.shards:
            picked = []
            while cursor < len(chosen) and chosen[cursor] < offset + shard.count:
                picked.append(chosen[cursor] - offset)
                cursor += 1
            if picked:
                pieces.append(ReadPiece(source.name, shard.url, tuple(picked)))
            offset += shard.count
    return pieces


def plan_epoch(sources: list[PlannedSource], *, epoch: int, seed: int, num_slots: int,
               shuffle: bool) -> list[list[ReadPiece]]:
    """Return, for each slot (`rank * num_workers + worker`), the pieces it reads in order."""
    if num_slots < 1:
        raise ValueError("num_slots must be >= 1")
    rng = random.Random(f"plan-{seed}-{epoch}")
    pieces = [piece for source in sources for piece in _source_pieces(source, rng)]
    if shuffle:
        rng.shuffle(pieces)
    sizes = slot_sizes(sources, num_slots)
    slots: list[list[ReadPiece]] = [[] for _ in range(num_slots)]
    slot, room = 0, sizes[0] if sizes else 0
    for piece in pieces:
        positions = piece.positions
        while positions:
            while room == 0:
                slot += 1
                room = sizes[slot]
            take = positions[:room]
            slots[slot].append(ReadPiece(piece.source, piece.url, take))
            positions = positions[room:]
            room -= len(take)
    return slots


def slot_sizes(sources: list[PlannedSource], num_slots: int) -> list[int]:
    """Samples per slot; independent of epoch and shuffling, which is what makes `len()` stable."""
    total = sum(s.allotment for s in sources)
    return [total // num_slots + (1 if slot < total % num_slots else 0) for slot in range(num_slots)]


def padded_worker_quota(sources: list[PlannedSource], *, world_size: int, num_workers: int,
                        batch_size: int) -> int:
    """Samples every training worker yields: the largest slot rounded up to whole batches."""
    largest = max(slot_sizes(sources, world_size * num_workers))
    return max(1, math.ceil(largest / batch_size)) * batch_size
