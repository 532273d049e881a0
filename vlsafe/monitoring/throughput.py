"""Samples/s, tokens/s, FLOPs/s and MFU for vlsafe batches, through Lightning's `ThroughputMonitor`.

Lightning does the timing, windowing and logging (`train/device/samples_per_sec`, ... see docs/metrics.md);
this callback only tells it how to count our batch dicts and how many FLOPs a batch costs.

FLOPs are *measured*, not modelled: the first training batch runs under torch's `FlopCounterMode` (what
Lightning's `measure_flops` uses), which counts the matmul/conv/attention FLOPs of everything that really runs
in that step: forward and backward of the trainable parts, forward only through a frozen vision tower, the
reference model of preference methods, the LM head on supervised positions only, and activation-checkpointing
recomputation. That count divided by the batch's tokens gives FLOPs per token; every later batch is charged
FLOPs-per-token x its tokens. Measuring the real step avoids both a second (meta-device) copy of the model,
whose data-dependent ops (image-token splicing, supervised positions) do not run on meta tensors, and the
6·N·tokens rule, which is wrong for frozen towers, LoRA and reference models.

MFU = device FLOPs/s / peak FLOPs/s. Lightning knows the peak of common NVIDIA GPUs and TPUs; on CPUs and
unknown devices set `peak_flops` (per device, for the compute dtype) to get `train/device/mfu`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.flop_counter import FlopCounterMode

FlopsMode = Literal["measured", "off"]
FLOPS_MODES: tuple[str, ...] = get_args(FlopsMode)


def _batch_dict(batch: Any) -> Mapping[str, Any]:
    if not isinstance(batch, Mapping) or ("ids" not in batch and "input_ids" not in batch):
        keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"VLMThroughputMonitor expects a vlsafe batch dict with 'ids' or 'input_ids'; got {keys}")
    return batch


def batch_samples(batch: Any) -> int:
    """Samples in a batch: one per entry of `ids` (a preference sample counts once, whatever its response rows)."""
    batch = _batch_dict(batch)
    return len(batch["ids"]) if "ids" in batch else int(batch["input_ids"].shape[0])


def batch_tokens(batch: Any) -> int:
    """Tokens the model processed: non-padding positions of every row (image positions and all responses too)."""
    batch = _batch_dict(batch)
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


class VLMThroughputMonitor(ThroughputMonitor):
    """Lightning's `ThroughputMonitor` for vlsafe batches, with measured FLOPs and an optional peak for MFU.

    - `window_size`: batches in the rolling average; rates appear once the window is full.
    - `peak_flops`: peak FLOP/s of one device for the compute dtype (e.g. 312e12 for an A100 in bf16); overrides
      Lightning's lookup, which knows common GPUs/TPUs and returns nothing on CPUs.
    - `flops`: `measured` (count the first training batch, see the module docstring) or `off`. A module that
      defines its own `flops_per_batch` keeps it.
    """

    def __init__(self, window_size: int = 50, peak_flops: float | None = None, flops: FlopsMode = "measured"):
        if flops not in FLOPS_MODES:
            raise ValueError(f"unknown flops mode {flops!r}; choose one of {FLOPS_MODES}")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops must be positive FLOP/s per device, got {peak_flops}")
        super().__init__(batch_size_fn=batch_samples, length_fn=batch_tokens, window_size=window_size)
        self.peak_flops, self.flops_mode = peak_flops, flops
        self.flops_per_token: float | None = None
        self.measured: dict[str, int] | None = None  # {"flops": ..., "tokens": ...} of the measured batch
        self._counter: FlopCounterMode | None = None
        self._module_owns_flops: bool | None = None
        self._last_count = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops:
            self.available_flops = self.peak_flops
            for throughput in self._throughputs.values():
                throughput.available_flops = self.peak_flops

    def _we_set_flops(self, pl_module: L.LightningModule) -> bool:
        if self._module_owns_flops is None:  # decided before we ever set the attribute
            self._module_owns_flops = hasattr(pl_module, "flops_per_batch")
        return not self._module_owns_flops

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if (self._we_set_flops(pl_module) and self.flops_mode == "measured" and self.flops_per_token is None
                and trainer.is_global_zero and self._counter is None):
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._counter is not None:
            self._stop_counting()
            tokens = batch_tokens(batch)
            flops = self._last_count
            self.measured = {"flops": flops, "tokens": tokens}
            self.flops_per_token = flops / max(tokens, 1)
            rank_zero_info(f"vlsafe: measured {flops / 1e9:.3g} GFLOPs on the first training batch ({tokens} tokens): "
                           f"{self.flops_per_token / 1e6:.3g} MFLOPs per token")
        if self._we_set_flops(pl_module):
            pl_module.flops_per_batch = (None if self.flops_per_token is None
                                         else int(self.flops_per_token * batch_tokens(batch)))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _stop_counting(self) -> None:
        counter, self._counter = self._counter, None
        counter.__exit__(None, None, None)
        self._last_count = int(counter.get_total_flops())

    def _no_flops_outside_training(self, pl_module: L.LightningModule) -> None:
        # evaluation runs forward only, so the training FLOPs per token would overstate it
        if self._we_set_flops(pl_module):
            pl_module.flops_per_batch = None

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any,
                                  **kwargs: Any) -> None:
        self._no_flops_outside_training(pl_module)

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any,
                            **kwargs: Any) -> None:
        self._no_flops_outside_training(pl_module)

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any,
                               **kwargs: Any) -> None:
        self._no_flops_outside_training(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._counter is not None:  # never leave the counting mode active after a failed step
            self._stop_counting()
