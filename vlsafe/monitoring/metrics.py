"""One torchmetrics `MetricCollection` per stage, logged under stable `<stage>/<name>` keys.

Every method module builds its metrics once (`stage_metrics`) and logs them with `log_metrics`, so train,
val and test use the same names and the same weighting. docs/metrics.md lists every name.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Union

import lightning as L
import torch
from torchmetrics import MeanMetric, Metric, MetricCollection

Value = Union[torch.Tensor, float, tuple]


class TokenPerplexity(MeanMetric):
    """exp of the token-weighted mean NLL: feed it the batch's mean NLL with `weight=n_tokens`.

    A perplexity must be exp(mean NLL over all tokens), not the mean of per-batch perplexities; keeping the NLL
    mean as state and exponentiating at `compute` gives exactly that, without keeping logits around.
    """

    def compute(self) -> torch.Tensor:
        return torch.exp(super().compute())


def stage_metrics(metrics: Mapping[str, Metric], stages: tuple[str, ...] = ("train", "val")
                  ) -> dict[str, MetricCollection]:
    """Independent copies of `metrics` as one `MetricCollection` per stage, prefixed `<stage>/` (`train/loss`).

    Compute groups are off: each metric is fed its own value, so torchmetrics must not merge metrics whose states
    merely look alike after the first update.
    """
    base = MetricCollection(dict(metrics), compute_groups=False)
    return {stage: base.clone(prefix=f"{stage}/") for stage in stages}


def log_metrics(module: L.LightningModule, collection: MetricCollection, values: Mapping[str, Value], *,
                on_step: bool, prog_bar: Collection[str] = ()) -> None:
    """Update each named metric with its value (or `(value, weight)`) and log it as `<prefix><name>`.

    `on_step=True` (training) logs this batch's value and keeps the running state; `on_step=False` (evaluation)
    logs the epoch aggregate, which Lightning computes, syncs across ranks and resets at epoch end. A name that is
    not in the collection is a KeyError: new metrics must be declared (and documented) first.
    """
    for name, value in values.items():
        try:
            metric = collection[name]
        except KeyError:
            raise KeyError(f"metric {collection.prefix}{name} is not declared (declared: {sorted(collection.keys())}); "
                           "add it to the module's metrics and to docs/metrics.md") from None
        args = value if isinstance(value, tuple) else (value,)
        if on_step:
            metric(*args)
        else:
            metric.update(*args)
        module.log(collection.prefix + name, metric, on_step=on_step, on_epoch=not on_step,
                   prog_bar=name in prog_bar)
