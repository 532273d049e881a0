"""Epoch planning: which samples each (rank, dataloader worker) reads, computed from shard counts alone.

Every process computes the same plan from the shard index, the seed and the epoch, so no coordination
is needed. The plan
1. allots each source `round(weight * size)` samples (or `num_samples`): whole passes over the source
   plus a seeded random subset for the fractional part, which is how safety data is mixed into
   instruction data at a chosen ratio;
2. lays each source's reads out in one (optionally shuffled) sequence of shard pieces;
3. splits *every* source across all `world_size * num_workers` slots in proportion (each slot gets
   `allotment / num_slots` of each source, within one sample), as one contiguous run of that source's
   sequence, so shards are still read front to back; slot sizes differ by at most one sample and each
   sample is read exactly once per epoch;
4. interleaves a slot's sources by weight over its whole epoch (`SlotPlan.schedule`, seeded): a source that
   is 0.3% of the mix is 0.3% of every slot, spread from the slot's first batch to its last.

Before steps 3 and 4, the plan shuffled whole shard pieces of all sources together and cut them into
contiguous slots, which put a 2-shard safety set into 2 of 32 worker streams (docs/data_performance.md).

Training additionally pads every worker to the same multiple of the batch size (by repeating samples it
already read), because DDP ranks must run the same number of steps.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator

from vlsafe.data.shards import ShardInfo

# Warn when padding (samples repeated so every worker yields whole, equal batches) exceeds this share of an epoch.
PADDING_WARN_FRACTION = 0.05


@dataclass(frozen=True)
class PlannedSource:
    name: str
    shards: tuple[ShardInfo, ...]
    weight: float = 1.0
    num_samples: int | None = None

    def __post_init__(self) -> None:
        check_source_amounts(self.name, self.weight, self.num_samples)

    @property
    def size(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def allotment(self) -> int:
        """Samples this source contributes to one epoch."""
        if self.num_samples is not None:
            return int(self.num_samples)
        return int(round(self.weight * self.size))


def check_source_amounts(where: str, weight: float, num_samples: int | None) -> None:
    """Refuse weights and counts that cannot size an epoch (NaN, inf, negative, fractional counts), naming the
    source: otherwise `round(nan * n)` fails later with a bare ValueError/OverflowError."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"source {where}: field 'weight' must be a number >= 0, got {weight!r}")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"source {where}: field 'weight' must be a finite number >= 0, got {weight!r}")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 0):
        raise ValueError(f"source {where}: field 'num_samples' must be a whole number >= 0, got {num_samples!r}")


@dataclass(frozen=True)
class ReadPiece:
    """Read `positions` (in order) from one shard of one source."""

    source: str
    url: str
    positions: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class SlotPlan:
    """One (rank, worker) slot's epoch: per source, the pieces it reads (`streams[i]`, in read order, one
    contiguous run of source i's sequence), and the seeded order in which it takes samples from them.

    Iterating gives all pieces, source by source. A reader keeps one open stream per source and follows
    `schedule()`, so the interleave costs no extra shard reads.
    """

    streams: tuple[tuple[ReadPiece, ...], ...]
    interleave_seed: str | None = None  # None: the sources one after another (evaluation order)

    def __iter__(self) -> Iterator[ReadPiece]:
        return (piece for stream in self.streams for piece in stream)

    def stream_sizes(self) -> list[int]:
        return [sum(len(piece) for piece in stream) for stream in self.streams]

    @property
    def size(self) -> int:
        return sum(self.stream_sizes())

    def schedule(self) -> list[int]:
        """The stream index of each planned read, in the order the slot yields them.

        Stratified by weight: the k-th of a stream's n reads lands at a random point of the k-th n-th of the
        slot's epoch, so every source runs through the whole epoch at its share, never in a block."""
        sizes = self.stream_sizes()
        if self.interleave_seed is None or sum(1 for n in sizes if n) <= 1:
            return [i for i, n in enumerate(sizes) for _ in range(n)]
        rng = random.Random(self.interleave_seed)
        keyed = [((k + rng.random()) / n, i) for i, n in enumerate(sizes) for k in range(n)]
        keyed.sort()
        return [i for _, i in keyed]


def _source_sequence(source: PlannedSource, rng: random.Random, shuffle: bool) -> list[ReadPiece]:
    """The source's reads for one epoch: whole passes, then a random subset for the fractional part;
    with `shuffle`, the pieces (whole shards or a shard's picked positions) in random order."""
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
    if shuffle:
        rng.shuffle(pieces)
    return pieces


def _cut(pieces: list[ReadPiece], sizes: list[int]) -> list[tuple[ReadPiece, ...]]:
    """Cut a sequence of pieces into consecutive runs of `sizes` reads (a piece may straddle two runs)."""
    runs: list[list[ReadPiece]] = [[] for _ in sizes]
    run, room = 0, sizes[0] if sizes else 0
    for piece in pieces:
        positions = piece.positions
        while positions:
            while room == 0:
                run += 1
                room = sizes[run]
            take = positions[:room]
            runs[run].append(ReadPiece(piece.source, piece.url, take))
            positions = positions[room:]
            room -= len(take)
    return [tuple(r) for r in runs]


def source_shares(sources: list[PlannedSource], num_slots: int) -> list[list[int]]:
    """`shares[i][slot]`: reads of source i in each slot. Each source splits evenly (to within one sample);
    the odd samples go round the slots cyclically, source after source, so each slot's total is
    exactly `slot_sizes(...)[slot]`."""
    shares, cursor = [], 0
    for source in sources:
        base, extra = divmod(source.allotment, num_slots)
        counts = [base] * num_slots
        for k in range(extra):
            counts[(cursor + k) % num_slots] += 1
        cursor = (cursor + extra) % num_slots
        shares.append(counts)
    return shares


def plan_epoch(sources: list[PlannedSource], *, epoch: int, seed: int, num_slots: int,
               shuffle: bool) -> list[SlotPlan]:
    """Return, for each slot (`rank * num_workers + worker`), what it reads and in which order."""
    if num_slots < 1:
        raise ValueError("num_slots must be >= 1")
    shares = source_shares(sources, num_slots)
    per_slot: list[list[tuple[ReadPiece, ...]]] = [[] for _ in range(num_slots)]
    for i, source in enumerate(sources):
        rng = random.Random(f"plan-{seed}-{epoch}" + (f"-{i}" if i else ""))  # a lone source: the same plan as ever
        for slot, run in enumerate(_cut(_source_sequence(source, rng, shuffle), shares[i])):
            per_slot[slot].append(run)
    return [SlotPlan(tuple(streams), f"interleave-{seed}-{epoch}-{slot}" if shuffle else None)
            for slot, streams in enumerate(per_slot)]


def slot_sizes(sources: list[PlannedSource], num_slots: int) -> list[int]:
    """Samples per slot; independent of epoch and shuffling, which is what makes `len()` stable."""
    total = sum(s.allotment for s in sources)
    return [total // num_slots + (1 if slot < total % num_slots else 0) for slot in range(num_slots)]


def padded_worker_quota(sources: list[PlannedSource], *, world_size: int, num_workers: int,
                        batch_size: int) -> int:
    """Samples every training worker yields: the largest slot rounded up to whole batches."""
    largest = max(slot_sizes(sources, world_size * num_workers))
    return max(1, math.ceil(largest / batch_size)) * batch_size


def padding_report(sources: list[PlannedSource], *, world_size: int, num_workers: int,
                   batch_size: int) -> tuple[int, int, str]:
    """(repeated samples per epoch, planned samples, explanation): how much of an epoch padding repeats."""
    slots = world_size * num_workers
    total = sum(s.allotment for s in sources)
    quota = padded_worker_quota(sources, world_size=world_size, num_workers=num_workers, batch_size=batch_size)
    repeated = quota * slots - total
    why = (f"{world_size} rank(s) x {num_workers} dataloader worker(s) = {slots} slot(s) of at most "
           f"{max(slot_sizes(sources, slots))} of the epoch's {total} sample(s); each must yield whole batches "
           f"of {batch_size}, so each yields {quota}: {repeated} repeated sample(s) per epoch "
           f"({repeated / max(1, total):.0%} of it). Use a smaller batch_size, fewer workers or more data")
    return repeated, total, why
