"""Crashes and preemption cost at most one checkpoint interval, and the resumed run is the same run.

One uninterrupted 20-step LoRA SFT run (dropout on, WebDataset shards, 2 dataloader workers, an epoch
boundary at step 10) is the reference. Real training subprocesses, started with `python tools/fit.py` as a
user would, are then SIGKILLed or sent SLURM's SIGUSR1 (with a fake `scontrol` on PATH); a third run gets
SIGTERM. Each is resumed the way the README says and must reproduce the reference step by step: the same
samples, the same losses and the same final weights.
"""
from __future__ import annotations

import random
import signal
import stat
from pathlib import Path

import pytest
import torch

import ops_harness as h

pytestmark = pytest.mark.slow
TOLERANCE = 1e-6


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ops_world") / "world"


@pytest.fixture(scope="session")
def reference(tmp_path_factory, world) -> Path:
    """The uninterrupted run (in this process: nobody signals it)."""
    run = tmp_path_factory.mktemp("ops_reference")
    h.fit_in_process(h.write_recipe(run, world))
    return run


@pytest.fixture()
def fake_scontrol(tmp_path) -> tuple[Path, Path]:
    """An `scontrol` that records its arguments, first on PATH."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir, calls


def path_with(bin_dir: Path) -> str:
    import os
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def assert_same_run(reference: Path, run: Path) -> None:
    """Every step 1..20 trained on the same samples with the same loss; same final weights."""
    expected = {r["step"]: r for r in h.read_steps(reference / "steps.jsonl")}
    got = {r["step"]: r for r in h.read_steps(run / "steps.jsonl")}  # later lines (the resumed run) win
    assert sorted(got) == list(range(1, h.MAX_STEPS + 1))
    for step in expected:
        assert got[step]["ids"] == expected[step]["ids"], f"step {step} trained on different samples"
        assert abs(got[step]["loss"] - expected[step]["loss"]) <= TOLERANCE, f"step {step}: loss differs"
    difference = h.max_weight_difference(h.trained_weights(reference / "checkpoints/last.ckpt"),
                                         h.trained_weights(run / "checkpoints/last.ckpt"))
    assert difference <= TOLERANCE, f"final weights differ by {difference}"


def test_reference_run_draws_random_numbers_and_checkpoints_hold_their_state(reference):
    """Guards the comparisons below: with dropout on, only a resume that restores the RNGs can match.
    (Each interrupted run below trains its first steps independently of the reference, so matching it also
    shows that the run itself is reproducible.)"""
    state = torch.load(reference / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["lora"]["dropout"] > 0
    assert "torch" in state["callbacks"]["RNGStateCheckpoint"], "checkpoints carry the RNG states"


def test_sigkill_at_a_random_step_loses_at_most_one_interval_and_resumes_exactly(reference, world, tmp_path):
    run = tmp_path / "run"
    recipe = h.write_recipe(run, world)
    kill_after = random.randint(h.EVERY + 1, h.MAX_STEPS - h.EVERY - 1)
    proc = h.start_fit(recipe)
    h.wait_for_step(proc, run / "steps.jsonl", kill_after)
    proc.send_signal(signal.SIGKILL)
    assert h.finish(proc) == -signal.SIGKILL
    reached = max(r["step"] for r in h.read_steps(run / "steps.jsonl"))
    saved = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert reached < h.MAX_STEPS, "the kill must land before the run finished"
    assert 0 < saved <= reached and reached - saved <= h.EVERY, (kill_after, reached, saved)

    h.fit_in_process(recipe, "--ckpt_path", "last")
    redone = [r["step"] for r in h.read_steps(run / "steps.jsonl")]
    assert redone[reached] == saved + 1, "the resumed run starts right after the checkpoint, not at step 1"
    assert_same_run(reference, run)


def test_sigusr1_under_slurm_checkpoints_requeues_and_the_resubmitted_job_resumes(reference, world, tmp_path,
                                                                                 fake_scontrol, monkeypatch):
    bin_dir, calls = fake_scontrol
    run = tmp_path / "run"
    recipe = h.write_recipe(run, world)
    proc = h.start_fit(recipe, env=h.subprocess_env(**h.SLURM_ENV, PATH=path_with(bin_dir)))
    h.wait_for_step(proc, run / "steps.jsonl", 3)
    proc.send_signal(signal.SIGUSR1)
    assert h.finish(proc) == 0, h.output(proc)
    log = h.output(proc)
    assert calls.read_text().split() == ["requeue", "4242"], "rank 0 asks SLURM to requeue the job"
    checkpoint = run / "hpc_ckpt_1.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    assert f"SIGUSR1 -> saved {checkpoint} at step {saved}" in log
    steps = [r["step"] for r in h.read_steps(run / "steps.jsonl")]
    assert steps == list(range(1, saved + 1)), "it stopped right after the step it saved"
    assert 3 <= saved < h.MAX_STEPS

    # The requeued job: same command, same SLURM job; Lightning finds hpc_ckpt_1.ckpt by itself.
    for name, value in h.SLURM_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", path_with(bin_dir))
    h.fit_in_process(recipe)
    steps = [r["step"] for r in h.read_steps(run / "steps.jsonl")]
    assert steps == list(range(1, h.MAX_STEPS + 1)), "resumed at the saved step: nothing lost, nothing redone"
    assert_same_run(reference, run)


def test_sigterm_outside_slurm_checkpoints_exits_cleanly_and_resumes_with_ckpt_path_hpc(reference, world, tmp_path,
                                                                                       fake_scontrol, monkeypatch):
    """SIGTERM (Kubernetes, `kill`, `timeout`): the same save-and-exit, no requeue; `--ckpt_path hpc` resumes.
    This run is in-process (it signals itself at step 7): the subprocess tests above cover real delivery."""
    bin_dir, calls = fake_scontrol
    monkeypatch.setenv("PATH", path_with(bin_dir))
    run = tmp_path / "run"
    recipe = h.write_recipe(run, world)
    with pytest.raises(SystemExit) as exit_info:
        h.fit_in_process(recipe, "--trainer.callbacks+=ops_harness.SignalAt", f"--trainer.callbacks.step={h.EVERY + 2}")
    assert exit_info.value.code == 0
    assert not calls.exists(), "no requeue outside SLURM"
    saved = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert [r["step"] for r in h.read_steps(run / "steps.jsonl")] == list(range(1, saved + 1))
    assert h.EVERY + 2 <= saved < h.MAX_STEPS

    h.fit_in_process(recipe, "--ckpt_path", "hpc")
    assert [r["step"] for r in h.read_steps(run / "steps.jsonl")] == list(range(1, h.MAX_STEPS + 1))
    assert_same_run(reference, run)
