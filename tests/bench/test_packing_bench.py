"""The packing benchmark compares equal work: every side trains the same weights on the same samples."""
import statistics

import pytest

from vlsafe.bench.packing import LLAVA_IMAGE_TOKENS, TEXT_MAX, llava_like_lengths, sft_packed_vs_padded
from vlsafe.bench.setup import BenchConfig


def test_lengths_follow_llava_665k_shape():
    lengths = llava_like_lengths(4000, scale=1.0, seed=0)
    text = [t for t, _ in lengths]
    assert 130 <= statistics.median(text) <= 170 and max(text) == TEXT_MAX, "median ~150, long tail clipped"
    assert 0.87 <= sum(image for _, image in lengths) / len(lengths) <= 0.93
    scaled = llava_like_lengths(4000, scale=LLAVA_IMAGE_TOKENS / 144, seed=0)
    assert statistics.median(t for t, _ in scaled) == pytest.approx(statistics.median(text) / 4, abs=1)


def test_packed_and_padded_sides_train_to_the_same_losses(tmp_path):
    cfg = BenchConfig.tiny()
    report = sft_packed_vs_padded(cfg, tmp_path)
    padded, short_rows = report["companions"]["sft/padded"], report["companions"]["sft/packed_longest"]
    assert len(report["losses"]) == cfg.warmup_steps + cfg.timed_steps
    assert report["losses"] == pytest.approx(padded["losses"], abs=1e-5)
    assert short_rows["losses"] == pytest.approx(padded["losses"], abs=1e-5)
    assert report["work_per_step"]["tokens"] == padded["work_per_step"]["tokens"], "the same real tokens"
    assert report["work_per_step"]["computed_tokens"] <= padded["work_per_step"]["computed_tokens"]
