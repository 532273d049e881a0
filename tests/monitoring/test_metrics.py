"""Metric names are stable and documented, and each logged value is what its name promises."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torchmetrics import MeanMetric

from vlsafe.methods.preference.module import preference_metrics
from vlsafe.methods.sft import sft_metrics
from vlsafe.monitoring.metrics import TokenPerplexity, log_metrics, stage_metrics

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
THROUGHPUT_LEAVES = {"time", "batches", "samples", "lengths"}


def documented_method_metrics() -> dict[str, set[str]]:
    """{"SFT": {"train/loss", ...}, "preference": {...}} from the *Method metrics* table of docs/metrics.md."""
    section = DOCS.read_text().split("## Method metrics", 1)[1].split("\n## ", 1)[0]
    names: dict[str, set[str]] = {}
    for name, method, stages in re.findall(r"^\| `([^`]+)` \| ([^|]+?) \| ([^|]+?) \|", section, flags=re.M):
        family = "SFT" if method.startswith("SFT") else method.split()[0].rstrip(",")
        names.setdefault(family, set()).update(f"{stage.strip()}/{name}" for stage in stages.split(","))
    return names


def is_reserved(name: str) -> bool:
    """Names written by Lightning callbacks or the held-out evaluation callbacks, not by a method."""
    stage, _, leaf = name.partition("/")
    return (name.startswith(("lr-", "heldout/")) or stage in ("validate", "predict") or leaf in THROUGHPUT_LEAVES
            or leaf.startswith("device/") or leaf.endswith("_per_sec"))


def test_every_sft_and_preference_metric_is_documented():
    documented = documented_method_metrics()
    sft = {f"{stage}/{name}" for stage in ("train", "val", "test") for name in sft_metrics()}
    preference = {f"{stage}/{name}" for stage in ("train", "val") for name in preference_metrics(with_blind=True)}
    assert sft - documented["SFT"] == set(), "add these SFT metrics to docs/metrics.md"
    assert preference - documented["preference"] == set(), "add these preference metrics to docs/metrics.md"


@pytest.mark.parametrize("run_name, family", [("sft_run", "SFT"), ("bpo_run", "preference")])
def test_every_column_a_real_run_logs_is_declared_and_documented(run_name, family, request):
    run = request.getfixturevalue(run_name)
    columns = {c for c in run.csv_columns() if not is_reserved(c)}
    declared = {*run.module.train_metrics.keys(), *run.module.val_metrics.keys()}
    assert columns and columns <= declared, f"logged but not declared: {columns - declared}"
    assert columns <= documented_method_metrics()[family]
    assert {"train/loss", "val/loss"} <= columns


def test_sft_train_metrics_are_the_logged_step_values(sft_run):
    columns = sft_run.csv_columns()
    losses = columns["train/loss"]
    assert len(losses) == len(sft_run.recorder.losses), "log_every_n_steps=1: one row per step"
    for step, value in losses:
        assert value == pytest.approx(sft_run.recorder.losses[step], rel=1e-6)
    for (_, loss), (_, perplexity) in zip(losses, columns["train/perplexity"]):
        assert perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    assert all(0.0 <= v <= 1.0 for _, v in columns["train/token_acc"])


def test_sft_val_metrics_are_token_weighted_over_the_whole_set(sft_run):
    """The last validation ran on the final weights: recompute it directly and compare with the logged row."""
    module, total_nll, total_correct, total_tokens = sft_run.module.eval(), 0.0, 0, 0
    with torch.no_grad():
        for batch in sft_run.data.val_dataloader():
            loss, correct, n_tokens = module._loss(batch)
            total_nll += float(loss) * n_tokens
            total_correct += int(correct)
            total_tokens += n_tokens
    columns = sft_run.csv_columns()
    assert columns["val/supervised_tokens"][-1][1] == total_tokens
    assert columns["val/loss"][-1][1] == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert columns["val/token_acc"][-1][1] == pytest.approx(total_correct / total_tokens, rel=1e-5)
    assert columns["val/perplexity"][-1][1] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    assert len(columns["val/loss"]) == 2, "validation every 12 of 24 steps"


def test_preference_rewards_are_consistent(bpo_run):
    columns = bpo_run.csv_columns()
    for stage in ("train", "val"):
        rows = zip(columns[f"{stage}/rewards/margins"], columns[f"{stage}/rewards/chosen"],
                   columns[f"{stage}/rewards/rejected"])
        for (_, margin), (_, chosen), (_, rejected) in rows:
            assert margin == pytest.approx(chosen - rejected, abs=1e-5)
        assert all(0.0 <= v <= 1.0 for _, v in columns[f"{stage}/rewards/blind_accuracies"])


def test_log_metrics_refuses_an_undeclared_name():
    stages = stage_metrics({"loss": MeanMetric()}, ("train",))
    assert list(stages["train"].keys()) == ["train/loss"]
    with pytest.raises(KeyError, match="train/typo is not declared"):
        log_metrics(None, stages["train"], {"typo": torch.tensor(1.0)}, on_step=True)


def test_token_perplexity_is_exp_of_the_token_weighted_mean_nll():
    metric = TokenPerplexity()
    metric.update(torch.tensor(1.0), weight=30)
    metric.update(torch.tensor(3.0), weight=10)
    torch.testing.assert_close(metric.compute(), torch.exp(torch.tensor(1.5)))  # not mean(e^1, e^3)
