"""A LightningDataModule over WebDataset shards: plan, read, encode and batch inside workers.

The model decides how a sample becomes tensors (`LightningModule.data_encoder(stage)`); this module
decides which samples each rank and worker reads (`vlsafe.data.plan`) and turns them into batches.
Batches are built in the workers, so `len()` is exact per rank and DDP ranks always agree on the number
of training steps.
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlsafe.data.plan import PlannedSource, ReadPiece, padded_worker_quota, plan_epoch, slot_sizes
from vlsafe.data.schema import Sample, SampleError
from vlsafe.data.shards import iter_shard, load_index
from vlsafe.ops.workers import ShardTracker

log = logging.getLogger(__name__)
STAGES = ("fit", "validate", "test", "predict")


class SampleEncoder(Protocol):
    """What a method gives the data pipeline: per-sample encoding and batch collation (picklable)."""

    def encode(self, sample: Sample) -> dict[str, Any]: ...

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]: ...


@dataclass
class Source:
    """One shard set in a mixture.

    `weight` scales how many of its samples an epoch draws: 1.0 = each sample once, 0.5 = a random half,
    2.0 = twice. `num_samples` sets the count directly (VLGuard's "post-hoc" N-sample subset).
    """

    path: str
    weight: float = 1.0
    num_samples: int | None = None
    name: str | None = None

    def planned(self) -> PlannedSource:
        if self.weight < 0 or (self.num_samples is not None and self.num_samples < 0):
            raise ValueError(f"source {self.path}: weight and num_samples must be >= 0")
        index = load_index(self.path)
        return PlannedSource(self.name or self.path, tuple(index.shards), self.weight, self.num_samples)


def as_sources(spec: str | Source | list[Source] | list[str] | None) -> list[Source]:
    if spec is None:
        return []
    if isinstance(spec, (str, Source)):
        spec = [spec]
    out = []
    for item in spec:
        if isinstance(item, str):
            item = Source(item)
        elif isinstance(item, dict):
            item = Source(**item)
        out.append(item)
    return out


class ShardStream(IterableDataset):
    """Yields collated batches for one rank; each worker reads its own slice of the epoch plan."""

    def __init__(self, sources: list[PlannedSource], encoder: SampleEncoder, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle: bool = False,
                 shuffle_buffer: int = 0, pad_to_equal: bool = False, on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        total = sum(s.allotment for s in sources) if sources else 0
        if total == 0:
            raise ValueError("the shard list is empty: no samples to read")
        if pad_to_equal and total < world_size * max(1, num_workers):
            raise ValueError(f"{total} training sample(s) cannot be split over {world_size} rank(s) x "
                             f"{max(1, num_workers)} dataloader worker(s); use fewer workers or more data")
        self.sources = sources
        self.encoder = encoder
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, num_workers)
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.pad_to_equal = pad_to_equal
        self.on_error = on_error
        self.epoch = 0
        self.skip_batches = 0
        self.tracker: ShardTracker | None = None  # set by the loader: names the shard if a worker dies

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Position the next iteration: `batches_done` batches of `epoch` were already trained on.

        The DataLoader hands out worker batches round-robin, so worker w skips its share of them; skipped
        samples are read (the shuffle must replay identically) but not decoded or tokenised.
        """
        self.epoch = epoch
        self.skip_batches = batches_done

    # ------------------------------------------------------------------ sizes
    def _worker_sizes(self) -> list[int]:
        sizes = slot_sizes(self.sources, self.world_size * self.num_workers)
        return sizes[self.rank * self.num_workers:(self.rank + 1) * self.num_workers]

    def _quota(self) -> int:
        return padded_worker_quota(self.sources, world_size=self.world_size, num_workers=self.num_workers,
                                   batch_size=self.batch_size)

    def __len__(self) -> int:
        """Exact number of batches this rank yields per epoch."""
        if self.pad_to_equal:
            return self.num_workers * self._quota() // self.batch_size
        return sum(math.ceil(n / self.batch_size) for n in self._worker_sizes())

    @property
    def num_samples(self) -> int:
        return sum(self._worker_sizes())

    # ------------------------------------------------------------------ iteration
    def _pieces(self, worker: int) -> list[ReadPiece]:
        plan = plan_epoch(self.sources, epoch=self.epoch, seed=self.seed,
                          num_slots=self.world_size * self.num_workers, shuffle=self.shuffle)
        return plan[self.rank * self.num_workers + worker]

    def _skip(self, err: SampleError) -> None:
        if self.on_error == "raise":
            raise err
        self._skipped += 1
        self._pending_skips.append(skip_row(err))
        log.warning("skipping unusable sample (%d skipped so far in this worker): %s", self._skipped, err)

    def _skip_shard_rest(self, url: str, missing: int, err: Exception) -> None:
        """on_error='skip': a shard that cannot be read (missing, truncated) loses its remaining samples."""
        if self.on_error == "raise":
            raise err
        self._skipped += missing
        self._pending_skips.extend([{"id": "?", "field": "shard", "error": str(err), "where": url}] * missing)
        log.error("skipping the %d unread planned sample(s) of shard %s: %s", missing, url, err)

    def _raw_samples(self, pieces: list[ReadPiece]) -> Iterator[Sample]:
        for piece in pieces:
            if self.tracker is not None:
                self.tracker.reading(piece.url)
            wanted = set(piece.positions)
            produced = 0

            def count_error(err: SampleError) -> None:
                nonlocal produced
                produced += 1
                self._skip(err)

            try:
                for _, sample in iter_shard(piece.url, keep=wanted.__contains__, on_sample_error=count_error):
                    produced += 1
                    yield sample
                if produced != len(piece.positions):
                    raise IOError(f"shard {piece.url} yielded {produced} of the {len(piece.positions)} planned "
                                  f"samples; it is shorter than its index says (truncated or replaced?)")
            except OSError as err:
                self._skip_shard_rest(piece.url, len(piece.positions) - produced, err)

    def _shuffled(self, samples: Iterator[Sample], rng: random.Random) -> Iterator[Sample]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[Sample] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _encoded(self, samples: Iterator[Sample]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            if self.tracker is not None:
                self.tracker.encoding(sample.id)
            try:
                yield self.encoder.encode(sample)
            except SampleError as err:
                self._skip(err)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        # A fresh DataLoader asks its worker 0 first, but after a mid-epoch resume the next batch in round-robin
        # order belongs to slot `skip_batches % num_workers`: rotate the slots so the batch order continues.
        worker = ((info.id if info is not None else 0) + self.skip_batches) % self.num_workers
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"ShardStream was planned for {self.num_workers} workers but the DataLoader "
                               f"runs {info.num_workers}")
        self._skipped = 0
        self._pending_skips: list[dict[str, str]] = []
        rng = random.Random(f"shuffle-{self.seed}-{self.epoch}-{self.rank}-{worker}")
        raw = self._shuffled(self._raw_samples(self._pieces(worker)), rng)
        head = list(itertools.islice(raw, self.batch_size))  # kept to pad the epoch with, if needed
        stream: Iterator[Sample] = itertools.chain(head, raw)
        skipped = max(0, math.ceil((self.skip_batches - worker) / self.num_workers)) * self.batch_size
        if skipped:
            stream = itertools.islice(stream, skipped, None)
        quota = self._quota() if self.pad_to_equal else None
        yield from self._batches(self._encoded(stream), quota, skipped, lambda: list(self._encoded(iter(head))))

    def _batches(self, items: Iterator[dict[str, Any]], quota: int | None, already: int,
                 padding: Callable[[], list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        """Full batches; with a quota, stop at it or top up to it by repeating the worker's first samples
        (so every DDP rank runs the same number of steps)."""
        if quota is not None:
            budget = max(0, quota - already)  # samples this worker still owes the epoch
            counted = _Counted(itertools.islice(items, budget), keep=self.batch_size)
            items = itertools.chain(counted, _padding(counted, budget, padding))
        batch: list[dict[str, Any]] = []
        full: list[dict[str, Any]] | None = None  # held until the next item is read, so skips met while
        for item in items:                         # reading it (e.g. at the very end) ride on this batch
            if full is not None:
                yield self._collate(full)
                full = None
            batch.append(item)
            if len(batch) == self.batch_size:
                full, batch = batch, []
        if full is not None:
            yield self._collate(full)
        if batch:
            yield self._collate(batch)
        if self._pending_skips:
            log.warning("%d skipped sample(s) at the end of this worker's data are not in the run summary: %s",
                        len(self._pending_skips), self._pending_skips[:3])

    def _collate(self, items: list[Any]) -> Any:
        """Collate, attaching the samples skipped since the previous batch (`SKIPPED_KEY`) for the run summary."""
        batch = self.encoder.collate(items)
        if self._pending_skips and isinstance(batch, dict):
            batch[SKIPPED_KEY] = self._pending_skips
            self._pending_skips = []
        return batch


SKIPPED_KEY = "skipped_samples"


def skip_row(err: SampleError) -> dict[str, str]:
    return {"id": err.sample_id, "field": err.field_name, "error": err.problem, "where": err.where or ""}


class SkipReport:
    """Run-level account of samples skipped under `on_error: skip`, per stage (train/validate/...)."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, str]]] = {}

    def add(self, stage: str, rows: list[dict[str, str]]) -> None:
        self.rows.setdefault(stage, []).extend(rows)

    @property
    def total(self) -> int:
        return sum(len(rows) for rows in self.rows.values())

    def summary(self, examples: int = 3) -> str:
        """One line per stage: count, counts by field, and the first few samples with their errors."""
        from collections import Counter

        lines = []
        for stage, rows in self.rows.items():
            by_field = Counter(row["field"] for row in rows)
            fields = ", ".join(f"{name}: {n}" for name, n in by_field.most_common())
            lines.append(f"{stage}: skipped {len(rows)} unusable sample(s) ({fields})")
            lines += [f"  {row['id']} [{row['field']}] {row['error']}" + (f" ({row['where']})" if row['where'] else "")
                      for row in rows[:examples]]
        return "\n".join(lines)


class _Counted:
    """Iterator wrapper that counts the items going through and keeps the first `keep` of them."""

    def __init__(self, items: Iterator[Any], keep: int):
        self.items, self.count, self.keep, self.first = items, 0, keep, []

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            self.count += 1
            if len(self.first) < self.keep:
                self.first.append(item)
            yield item


def _padding(counted: _Counted, needed: int, head: Callable[[], list[Any]]) -> Iterator[Any]:
    """After `counted` is exhausted, repeat the epoch's first samples (`head()`, the same whether or not the
    run resumed mid-epoch; or, if none of those encode, the first items that did) until `needed` items."""
    missing = needed - counted.count
    if missing <= 0:
        return
    samples = head() or counted.first
    if not samples:
        raise RuntimeError("this dataloader worker has no usable samples to pad its epoch with")
    for i in range(missing):
        yield samples[i % len(samples)]


class EpochAwareLoader(DataLoader):
    """A DataLoader that positions its stream before workers fork: the epoch (Lightning only tells
    samplers, and an IterableDataset has none) and, after a mid-epoch resume, the batches already done."""

    def __init__(self, dataset: ShardStream, position_fn, **kwargs: Any):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._position_fn = position_fn

    def __iter__(self):
        self.dataset.resume_at(*self._position_fn())
        return super().__iter__()

    # Lightning treats loaders with these two methods as resumable (and then does not warn that a mid-epoch
    # resume replays data). The position itself comes from the trainer's progress counters, so the state
    # is informational.
    def state_dict(self) -> dict[str, int]:
        epoch, done = self._position_fn()
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


class ShardDataModule(L.LightningDataModule):
    """Shards in, batches out. `train`/`val`/`test`/`predict` take a shard directory or a list of
    `Source`s (weighted mixing); the attached LightningModule supplies the encoder."""

    def __init__(self, train: str | list[Source] | None = None, val: str | list[Source] | None = None,
                 test: str | list[Source] | None = None, predict: str | list[Source] | None = None,
                 batch_size: int = 8, eval_batch_size: int | None = None, num_workers: int = 2,
                 shuffle_buffer: int = 1000, seed: int = 0, on_error: str = "raise"):
        super().__init__()
        self.sources = {"fit": as_sources(train), "validate": as_sources(val), "test": as_sources(test),
                        "predict": as_sources(predict)}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.on_error = on_error
        self._encoders: dict[str, SampleEncoder] = {}
        self._normalize_pixels: Callable[[torch.Tensor], torch.Tensor] | None = None  # set by _shipping_encoder
        self._rank: tuple[int, int] | None = None
        self._trackers: dict[str, ShardTracker] = {}
        self.skip_report = SkipReport()
        self.last_skip_report = SkipReport()  # the finished stage's report, kept after teardown

    def connect(self, encoders: dict[str, SampleEncoder] | SampleEncoder, rank: int = 0, world_size: int = 1) -> None:
        """Attach encoders explicitly (standalone use, tests); under a Trainer `setup` does this."""
        self._encoders = encoders if isinstance(encoders, dict) else {stage: encoders for stage in STAGES}
        self._rank = (rank, world_size)

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            module = self.trainer.lightning_module
            if not hasattr(module, "data_encoder"):
                raise TypeError(f"{type(module).__name__} has no data_encoder(stage); vlsafe data modules need a "
                                f"vlsafe method module")
            self._encoders = {s: module.data_encoder(s) for s in STAGES}
            self._rank = (self.trainer.global_rank, self.trainer.world_size)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Take the skipped-sample rows off the batch (the model never sees them) into the run's report."""
        if isinstance(batch, dict) and SKIPPED_KEY in batch:
            rows = batch.pop(SKIPPED_KEY)
            stage = self.trainer.state.stage.value if self.trainer is not None and self.trainer.state.stage else "data"
            self.skip_report.add(str(stage), rows)
        return batch

    def _shipping_encoder(self, stage: str) -> SampleEncoder:
        """The stage's encoder, set to emit uint8 images when it can: workers pickle every batch to the main
        process, and float32 pixels are 4x the bytes (~1 ms per 224-px image on 2 CPU cores, against ~0.35 ms
        for uint8). `on_after_batch_transfer` normalises them on the device, so steps see the usual floats."""
        encoder = self._encoders[stage]
        if getattr(encoder, "normalize_images", False) and hasattr(encoder, "processor"):
            encoder = copy.copy(encoder)  # the caller's encoder keeps returning floats
            encoder.normalize_images = False
            self._normalize_pixels = encoder.processor.normalize
        return encoder

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise uint8 `pixel_values` shipped by the workers, on the device the batch now lives on."""
        return self.normalize_batch(batch)

    def normalize_batch(self, batch: Any) -> Any:
        """Normalised float32 `pixel_values` for a batch from this module's loaders (a no-op for float ones);
        Lightning calls it after the device transfer; call it yourself when iterating a loader directly."""
        if isinstance(batch, dict):
            pixels = batch.get("pixel_values")
            if isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8:
                if self._normalize_pixels is None:
                    raise RuntimeError("uint8 pixel_values from a loader this data module did not build")
                batch["pixel_values"] = self._normalize_pixels(pixels)
        return batch

    def teardown(self, stage: str) -> None:
        """Print the run-level summary of skipped samples (each rank reads, and reports, its own slice)."""
        if self.skip_report.total:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            log.warning("rank %d: %s", rank, self.skip_report.summary())
        self.last_skip_report, self.skip_report = self.skip_report, SkipReport()

    def _position(self) -> tuple[int, int]:
        """(epoch, batches of it already trained): non-zero batches only when resuming mid-epoch."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        # `processed` counts batches whose training step ran; a checkpoint written in on_train_batch_end
        # has not yet bumped `completed`, and Lightning resumes after the processed batches.
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if trainer.training and progress.is_last_batch:
            # The epoch's last batch is done (resuming from a checkpoint written at it): the next batch is the
            # first of the next epoch. Lightning asks for the iterator before it advances `current_epoch` and
            # resets the batch counters, so count epochs started instead.
            return trainer.fit_loop.epoch_progress.current.started, 0
        done = progress.current.processed if trainer.training else 0
        return trainer.current_epoch, done

    def stream(self, stage: str) -> ShardStream:
        sources = self.sources[stage]
        if not sources:
            raise ValueError(f"no {stage!r} data configured: set data.{_ARG_FOR_STAGE[stage]} in the recipe")
        if stage not in self._encoders or self._rank is None:
            raise RuntimeError("call ShardDataModule.connect(encoder) (or run under a Trainer) before loading data")
        rank, world_size = self._rank
        training = stage == "fit"
        return ShardStream([s.planned() for s in sources], self._shipping_encoder(stage),
                           batch_size=self.batch_size if training else self.eval_batch_size, rank=rank,
                           world_size=world_size, num_workers=self.num_workers, seed=self.seed, shuffle=training,
                           shuffle_buffer=self.shuffle_buffer, pad_to_equal=training, on_error=self.on_error)

    def _loader(self, stage: str) -> DataLoader:
        position = self._position if stage == "fit" else (lambda: (self._position()[0], 0))
        stream = self.stream(stage)
        if self.num_workers:
            stream.tracker = self._trackers[stage] = ShardTracker(self.num_workers)
        # A private generator: worker seeds never draw from the global RNG, so a new epoch or a validation
        # run does not shift the dropout stream of training (exact resume, see vlsafe.ops.rng).
        return EpochAwareLoader(stream, position, num_workers=self.num_workers, persistent_workers=False,
                                generator=torch.Generator().manual_seed(self.seed))

    def on_exception(self, exception: BaseException) -> None:
        """A dataloader worker died or timed out: name the shard it was reading (vlsafe.ops.workers)."""
        for tracker in self._trackers.values():
            if tracker.annotate(exception):
                break

    def train_dataloader(self) -> DataLoader:
        return self._loader("fit")

    def val_dataloader(self) -> DataLoader:
        return self._loader("validate") if self.sources["validate"] else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


_ARG_FOR_STAGE = {"fit": "train", "validate": "val", "test": "test", "predict": "predict"}
