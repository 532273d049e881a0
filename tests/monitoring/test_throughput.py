"""Throughput: samples and tokens are counted the vlsafe way, FLOPs are the real step's, MFU needs a peak."""
from __future__ import annotations

import pytest
import torch
from lightning.fabric.utilities.throughput import measure_flops

from vlsafe.data.synthetic.world import generate
from vlsafe.monitoring.throughput import (
    VLMThroughputMonitor,
    batch_samples,
    batch_tokens,
)


def test_samples_and_tokens_are_counted_per_sample_not_per_response_row(bpo_run):
    encoder = bpo_run.module.data_encoder("fit")
    batch = encoder.collate([encoder.encode(s) for s in generate(3, seed=5, kinds=["preference"])])
    assert batch["input_ids"].shape[0] == 9, "chosen, rejected and blind rows"
    assert batch_samples(batch) == 3
    assert batch_tokens(batch) == int(batch["attention_mask"].sum()) < batch["input_ids"].numel()
    with pytest.raises(ValueError, match="expects a vlsafe batch dict"):
        batch_samples(torch.zeros(2, 3))


def test_logged_totals_match_what_the_training_loop_saw(sft_run):
    columns = sft_run.csv_columns()
    assert columns["train/samples"][-1][1] == sum(sft_run.recorder.samples)
    assert columns["train/lengths"][-1][1] == sum(sft_run.recorder.tokens), "tokens = non-padding positions"
    tokens_per_sec = dict(columns["train/device/items_per_sec"])
    samples_per_sec = dict(columns["train/device/samples_per_sec"])
    assert tokens_per_sec and set(tokens_per_sec) == set(samples_per_sec)
    mean_tokens = sum(sft_run.recorder.tokens) / sum(sft_run.recorder.samples)
    for step, rate in tokens_per_sec.items():  # over the same window, tokens/s = samples/s x tokens per sample
        assert rate / samples_per_sec[step] == pytest.approx(mean_tokens, rel=0.25)


def test_measured_flops_equal_lightning_measure_flops_of_the_same_step(sft_run):
    """The step counted inside the Trainer (forward + backward) = measure_flops on the same batch, run again."""
    batch, module = sft_run.recorder.first_batch, sft_run.module.train()
    expected = measure_flops(module, lambda: module._loss(batch)[0], loss_fn=lambda loss: loss)
    module.zero_grad(set_to_none=True)
    assert sft_run.monitor.measured == {"flops": expected, "tokens": batch_tokens(batch)}
    forward_only = measure_flops(module, lambda: module._loss(batch)[0])
    assert 2 * forward_only < expected < 4 * forward_only, "backward of the trained LLM, not of the frozen tower"


def test_mfu_is_flops_per_second_over_the_peak_and_absent_without_one(sft_run, bpo_run):
    columns = sft_run.csv_columns()
    flops = dict(columns["train/device/flops_per_sec"])
    mfu = dict(columns["train/device/mfu"])
    assert mfu and set(mfu) == set(flops)
    for step, value in mfu.items():
        assert value == pytest.approx(flops[step] / sft_run.monitor.peak_flops, rel=1e-9)
    bpo = bpo_run.csv_columns()
    assert "train/device/flops_per_sec" in bpo and "train/device/mfu" not in bpo, "CPU peak unknown: no MFU"
    assert not any(name.startswith("validate/device/flops") for name in columns), "no FLOPs outside training"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown flops mode"):
        VLMThroughputMonitor(flops="analytic")
    with pytest.raises(ValueError, match="peak_flops must be positive"):
        VLMThroughputMonitor(peak_flops=0)
