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

from vlsafe.data.grouping import group_by_modality_length
from vlsafe.data.plan import (
    PADDING_WARN_FRACTION,
    PlannedSource,
    ReadPiece,
    SlotPlan,
    check_source_amounts,
    padded_worker_quota,
    padding_report,
    plan_epoch,
    slot_sizes,
)
from vlsafe.data.remote import RemoteReadPolicy, as_policy
from vlsafe.data.schema import OnError, Sample, SampleError, SampleLeftOut
from vlsafe.data.shards import iter_shard, load_index
from vlsafe.ops.workers import (
    DEFAULT_WORKER_TIMEOUT,
    ShardTracker,
    start_workers,
    worker_loader_options,
)

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

    def planned(self, remote: RemoteReadPolicy | None = None) -> PlannedSource:
        """The source's shards and amounts; `remote` reads an `http(s)://`/`s3://` index (`vlsafe.data.remote`)."""
        check_source_amounts(self.path, self.weight, self.num_samples)
        index = load_index(self.path, remote)
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
                 shuffle_buffer: int = 0, pad_to_equal: bool = False, on_error: OnError = "raise",
                 group_by_modality_length: bool = False, remote: RemoteReadPolicy | None = None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not sources:
            raise ValueError("the shard list is empty: no samples to read")
        total = sum(s.allotment for s in sources)
        if total == 0:
            raise ValueError("no source contributes a sample to the epoch (every weight or num_samples is 0): "
                             + "; ".join(_describe_amount(s) for s in sources))
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
        self.group_by_modality_length = group_by_modality_length
        self.remote = as_policy(remote)  # timeouts and retries for http(s)/s3 shards
        self.epoch = 0
        self.skip_batches = 0
        self.tracker: ShardTracker | None = None  # set by the loader: names the shard if a worker dies
        if pad_to_equal and rank == 0:
            repeated, planned, why = padding_report(sources, world_size=world_size, num_workers=self.num_workers,
                                                    batch_size=batch_size)
            if repeated > PADDING_WARN_FRACTION * planned:
                log.warning("padding repeats more than %.0f%% of the training epoch: %s",
                            100 * PADDING_WARN_FRACTION, why)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Position the next iteration: `batches_done` batches of `epoch` were already trained on.

        The DataLoader hands out worker batches round-robin, so worker w skips its share of them; skipped
        samples are read (the shuffle must replay identically) but not decoded or tokenised. In training every
        planned sample fills exactly one place of its worker's batches (one that fails to encode under
        `on_error: skip` is replaced by a padding sample, see `_quota_items`), so `batches * batch_size` read
        samples is the exact position even when samples were skipped.
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
    def _slot_plan(self, worker: int) -> SlotPlan:
        plan = plan_epoch(self.sources, epoch=self.epoch, seed=self.seed,
                          num_slots=self.world_size * self.num_workers, shuffle=self.shuffle)
        return plan[self.rank * self.num_workers + worker]

    def _skip(self, err: SampleError) -> None:
        if self.on_error == "raise" and not isinstance(err, SampleLeftOut):  # left out by rule: counted, never fatal
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

    def _planned_reads(self, pieces: tuple[ReadPiece, ...]) -> Iterator[Sample | None]:
        """One item per planned read, in order: the sample, or None for one that could not be read (skipped
        under on_error='skip'), so a slot's interleave schedule stays aligned with its streams."""
        for piece in pieces:
            if self.tracker is not None:
                self.tracker.reading(piece.url)
            wanted = set(piece.positions)
            produced = failed = 0

            def count_error(err: SampleError) -> None:
                nonlocal failed
                failed += 1
                self._skip(err)

            try:
                for _, sample in iter_shard(piece.url, keep=wanted.__contains__, on_sample_error=count_error,
                                            remote=self.remote):
                    for _ in range(failed):
                        yield None
                    produced, failed = produced + failed + 1, 0
                    yield sample
                    if produced == len(piece.positions):
                        break  # the piece's last position: the rest of the shard belongs to other slots
                for _ in range(failed):
                    yield None
                produced, failed = produced + failed, 0
                if produced != len(piece.positions):
                    raise IOError(f"shard {piece.url} yielded {produced} of the {len(piece.positions)} planned "
                                  f"samples; it is shorter than its index says (truncated or replaced?)")
            except OSError as err:
                produced, missing = produced + failed, len(piece.positions) - produced - failed
                for _ in range(failed):
                    yield None
                self._skip_shard_rest(piece.url, missing, err)
                for _ in range(missing):
                    yield None

    def _raw_samples(self, plan: SlotPlan) -> Iterator[Sample]:
        """The slot's samples in its interleave order: one open reader per source, advanced as scheduled."""
        readers = [self._planned_reads(stream) for stream in plan.streams]
        for i in plan.schedule():
            sample = next(readers[i], _EXHAUSTED)
            if sample is _EXHAUSTED:
                raise RuntimeError(f"slot plan out of step: source {plan.streams[i][0].source} ran out of reads")
            if sample is not None:
                yield sample

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
        """Encoded samples; one that fails is skipped (on_error='skip') and leaves no gap (evaluation)."""
        for sample in samples:
            item = self._encode_or_skip(sample)
            if item is not _FAILED:
                yield item

    def _encode_or_skip(self, sample: Sample) -> Any:
        if self.tracker is not None:
            self.tracker.encoding(sample.id)
        try:
            return self.encoder.encode(sample)
        except SampleError as err:
            self._skip(err)
            return _FAILED

    def _ordered(self, samples: Iterator[Sample], rng: random.Random) -> Iterator[Sample]:
        """Shuffle buffer, then (opt-in) LLaVA's modality/length grouping over `world_size * batch_size`."""
        samples = self._shuffled(samples, rng)
        if self.group_by_modality_length:
            samples = group_by_modality_length(samples, self.world_size * self.batch_size)
        return samples

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
        raw = self._ordered(self._raw_samples(self._slot_plan(worker)), rng)
        head = list(itertools.islice(raw, self.batch_size))  # kept to pad the epoch with, if needed
        stream: Iterator[Sample] = itertools.chain(head, raw)
        skipped = max(0, math.ceil((self.skip_batches - worker) / self.num_workers)) * self.batch_size
        if skipped:
            stream = itertools.islice(stream, skipped, None)
        if self.pad_to_equal:
            pool = _PaddingPool(head, self._quiet_encode, lambda: self._first_usable(worker), self.batch_size)
            yield from self._batches(self._quota_items(stream, skipped, pool))
        else:
            yield from self._batches(self._encoded(stream))

    def _quiet_encode(self, sample: Sample) -> Any:
        """Encode for the padding pool: a failure there is reported where the sample itself is trained."""
        try:
            return self.encoder.encode(sample)
        except SampleError:
            return _FAILED

    def _first_usable(self, worker: int) -> list[Any]:
        """The first `batch_size` samples of the worker's epoch that encode, read afresh (only needed when none
        of the first `batch_size` do); skips met on the way are not reported twice."""
        skipped, pending = self._skipped, list(self._pending_skips)
        try:
            rng = random.Random(f"shuffle-{self.seed}-{self.epoch}-{self.rank}-{worker}")
            encoded = map(self._quiet_encode, self._ordered(self._raw_samples(self._slot_plan(worker)), rng))
            return list(itertools.islice((x for x in encoded if x is not _FAILED), self.batch_size))
        finally:
            self._skipped, self._pending_skips = skipped, pending

    def _quota_items(self, samples: Iterator[Sample], position: int, pool: "_PaddingPool") -> Iterator[Any]:
        """Exactly `quota - position` items: each read sample in its own place (one that fails to encode under
        on_error='skip' gives its place to a padding sample, so the position stays `batches * batch_size`), then
        padding up to the quota, so every worker and DDP rank runs the same number of full batches."""
        quota = self._quota()
        for sample in samples:
            if position >= quota:
                break
            item = self._encode_or_skip(sample)
            yield pool.item(position) if item is _FAILED else item
            position += 1
        for extra in range(quota - position):  # the same repeats whether or not the run resumed
            yield pool.item(extra)

    def _batches(self, items: Iterator[Any]) -> Iterator[dict[str, Any]]:
        """Collated batches of `batch_size` (the last may be short outside training)."""
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


_FAILED = object()  # an encode that failed under on_error='skip'
_EXHAUSTED = object()


def _describe_amount(source: PlannedSource) -> str:
    if source.num_samples is not None:
        return f"{source.name}: num_samples {source.num_samples}"
    return f"{source.name}: weight {source.weight:g} x {source.size} sample(s)"


class _PaddingPool:
    """The samples a training worker repeats: to top its epoch up to whole, equal batches, and in the place of
    a sample that fails to encode. They are the epoch's first `batch_size` samples that encode (looked for
    further only if none of the first `batch_size` do), the same whether or not the run resumed mid-epoch; a
    failed sample at place `p` of the worker's epoch is always replaced by the same one."""

    def __init__(self, head: list[Sample], encode: Callable[[Sample], Any], first_usable: Callable[[], list[Any]],
                 size: int):
        self.head, self.encode, self.first_usable, self.size = head, encode, first_usable, size
        self.items: list[Any] | None = None

    def item(self, position: int) -> Any:
        if self.items is None:
            self.items = [x for x in map(self.encode, self.head) if x is not _FAILED] or self.first_usable()
            if not self.items:
                raise RuntimeError("this dataloader worker has no usable samples to pad its epoch with")
        return self.items[position % len(self.items)]


class EpochAwareLoader(DataLoader):
    """A DataLoader that positions its stream before workers fork: the epoch (Lightning only tells
    samplers, and an IterableDataset has none) and, after a mid-epoch resume, the batches already done."""

    def __init__(self, dataset: ShardStream, position_fn, **kwargs: Any):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._position_fn = position_fn

    def __iter__(self):
        self.dataset.resume_at(*self._position_fn())
        return start_workers(super().__iter__, self.timeout, self.dataset.tracker)  # signals, stuck workers

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
    `Source`s (weighted mixing); the attached LightningModule supplies the encoder.

    `group_by_modality_length` (training only, off by default) is LLaVA's grouped batching: single-modality
    batches of similar length, per dataloader worker (`vlsafe.data.grouping`); LLaVA-1.5's recipes turn it on.

    A shard directory may be an `http(s)://` or `s3://` url (object storage); `remote` (a `RemoteReadPolicy`,
    recipe key `data.init_args.remote`) bounds its waits and retries, see docs/data_performance.md."""

    def __init__(self, train: str | list[Source] | None = None, val: str | list[Source] | None = None,
                 test: str | list[Source] | None = None, predict: str | list[Source] | None = None,
                 batch_size: int = 8, eval_batch_size: int | None = None, num_workers: int = 2,
                 shuffle_buffer: int = 1000, seed: int = 0, on_error: OnError = "raise",
                 group_by_modality_length: bool = False, worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
                 remote: RemoteReadPolicy | None = None):
        super().__init__()
        self.sources = {"fit": as_sources(train), "validate": as_sources(val), "test": as_sources(test),
                        "predict": as_sources(predict)}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.worker_timeout = worker_timeout  # seconds without a batch before WorkerTimeoutError; 0 = forever
        self.remote = as_policy(remote)  # http(s)/s3 shards: timeouts, retries, S3 endpoint (vlsafe.data.remote)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.on_error = on_error
        self.group_by_modality_length = group_by_modality_length
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
        return ShardStream([s.planned(self.remote) for s in sources], self._shipping_encoder(stage),
                           batch_size=self.batch_size if training else self.eval_batch_size, rank=rank,
                           world_size=world_size, num_workers=self.num_workers, seed=self.seed, shuffle=training,
                           shuffle_buffer=self.shuffle_buffer, pad_to_equal=training, on_error=self.on_error,
                           group_by_modality_length=training and self.group_by_modality_length,
                           remote=self.remote)

    def _loader(self, stage: str) -> DataLoader:
        position = self._position if stage == "fit" else (lambda: (self._position()[0], 0))
        stream = self.stream(stage)
        if self.num_workers:
            stream.tracker = self._trackers[stage] = ShardTracker(self.num_workers)
        # A private generator: worker seeds never draw from the global RNG, so a new epoch or a validation
        # run does not shift the dropout stream of training (exact resume, see vlsafe.ops.rng).
        return EpochAwareLoader(stream, position, num_workers=self.num_workers, persistent_workers=False,
                                generator=torch.Generator().manual_seed(self.seed),
                                **worker_loader_options(self.num_workers, self.worker_timeout))

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
