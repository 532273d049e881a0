"""Signals sent to the whole process group, as SLURM and `kill -- -PGID` send them, and what a requeue resumes.

scancel, SLURM preemption and `#SBATCH --signal` signal every process of the job, dataloader workers included
(the tests in test_ops_resume.py signal the main process only). Each run here is a real `python tools/fit.py`
subprocess in its own session (its own process group, as a job step is) with 2 dataloader workers; the test
signals the group with `os.killpg`. Under SLURM the environment is faked and a fake `scontrol` on PATH logs
its calls.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import ops_harness as h
import pytest
import torch

pytestmark = pytest.mark.slow
STEPS = 10  # one epoch of the harness recipe


def saved_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The harness's synthetic shards, written once here so the subprocesses only read them."""
    from vlsafe.data.synthetic.module import SyntheticWorld

    root = tmp_path_factory.mktemp("group_world") / "world"
    SyntheticWorld(root=str(root), kinds=["qa"], train_samples=40, val_samples=8).prepare_data()
    return root


class GroupSignalledRun:
    """A run started in its own process group whose group gets `signum` once it has trained step 2."""

    def __init__(self, folder: Path, world: Path, signum: int, slurm: bool):
        self.run, self.signum = folder / "run", signum
        recipe = h.write_recipe(self.run, world, max_steps=STEPS)
        bin_dir, self.calls = h.fake_scontrol(folder)
        env = h.subprocess_env(PATH=h.path_with(bin_dir), **(h.SLURM_ENV if slurm else {}))
        self.proc = h.start_fit(recipe, env=env, throttle=0.2, new_session=True)

        self.signalled = False

    def signal_after_step_2(self) -> bool:
        """Signal the group if step 2 is done (pgid == pid: the whole job, workers included); True once sent."""
        steps = self.run / "steps.jsonl"
        if not self.signalled and steps.exists() and any(r["step"] >= 2 for r in h.read_steps(steps)):
            os.killpg(self.proc.pid, self.signum)
            self.signalled = True
        assert self.signalled or self.proc.poll() is None, f"exited before step 2:\n{h.output(self.proc)}"
        return self.signalled

    def wait(self) -> "GroupSignalledRun":
        self.code = h.finish(self.proc)
        self.log = h.output(self.proc)
        self.group_gone = h.group_gone(self.proc.pid)
        return self


@pytest.fixture(scope="module")
def runs(tmp_path_factory, world) -> dict[str, GroupSignalledRun]:
    """Both runs at once (they share the machine's cores and start-up time): SIGTERM outside SLURM, SIGUSR1 under
    SLURM."""
    started = {"term": GroupSignalledRun(tmp_path_factory.mktemp("term"), world, signal.SIGTERM, slurm=False),
               "usr1": GroupSignalledRun(tmp_path_factory.mktemp("usr1"), world, signal.SIGUSR1, slurm=True)}
    try:
        deadline = time.monotonic() + 120
        while not all([run.signal_after_step_2() for run in started.values()]):
            assert time.monotonic() < deadline, "step 2 not reached in 120 s"
            time.sleep(0.02)
        return {name: run.wait() for name, run in started.items()}
    finally:
        for run in started.values():
            if run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGKILL)


def test_sigterm_to_the_process_group_saves_at_the_real_step_and_exits_0(runs):
    """Before: the workers died of the SIGTERM first ("DataLoader worker ... killed by signal: Terminated"),
    training stopped with that RuntimeError, exit 1, no checkpoint."""
    term = runs["term"]
    run, calls, code, log = term.run, term.calls, term.code, term.log
    assert code == 0, log
    assert term.group_gone, "no dataloader worker outlives the run"
    assert "killed by signal" not in log and "Traceback" not in log, log
    assert sorted(p.name for p in run.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    step = saved_step(run / "hpc_ckpt_1.ckpt")
    assert [r["step"] for r in h.read_steps(run / "steps.jsonl")] == list(range(1, step + 1)), "saved the last step"
    assert 2 <= step < STEPS
    assert f"SIGTERM -> saved {run / 'hpc_ckpt_1.ckpt'} at step {step}" in log
    assert not calls.exists(), "no requeue outside SLURM"


def test_sigusr1_to_the_process_group_under_slurm_requeues_once_with_one_checkpoint(runs):
    """Before: every worker also ran Lightning's SLURM handler: 3 `scontrol requeue` calls and extra hpc
    checkpoints saved from the workers' stale trainer copies at global_step 0."""
    usr1 = runs["usr1"]
    run, calls, code, log = usr1.run, usr1.calls, usr1.code, usr1.log
    assert code == 0, log
    assert usr1.group_gone, "no dataloader worker outlives the run"
    assert calls.read_text().splitlines() == ["requeue 4242"], "exactly one requeue, by rank 0's main process"
    assert sorted(p.name for p in run.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    step = saved_step(run / "hpc_ckpt_1.ckpt")
    assert [r["step"] for r in h.read_steps(run / "steps.jsonl")] == list(range(1, step + 1)), "the real step"
    assert 2 <= step < STEPS


def test_a_requeued_job_resumes_from_the_newest_state_and_retires_the_stale_hpc_checkpoint(runs, monkeypatch):
    """Before: with `hpc_ckpt_1.ckpt` (step s) and a newer `last.ckpt` (step 10), a job re-run under SLURM
    restored step s, trained steps s+1..10 again and overwrote `last.ckpt`."""
    run = runs["usr1"].run
    for name, value in h.SLURM_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", h.path_with(run.parent / "bin"))
    recipe = run / "recipe.yaml"
    hpc = run / "hpc_ckpt_1.ckpt"
    stale = saved_step(hpc)

    h.fit_in_process(recipe)  # the requeued job: resumes from hpc_ckpt_1 (the newest) and finishes the epoch
    assert [r["step"] for r in h.read_steps(run / "steps.jsonl")] == list(range(1, STEPS + 1))
    last = run / "checkpoints/last.ckpt"
    assert saved_step(last) == STEPS and saved_step(hpc) == stale < STEPS, "a stale hpc checkpoint and a newer last"

    done = len(h.read_steps(run / "steps.jsonl"))
    h.fit_in_process(recipe, "--trainer.max_steps", str(STEPS + 3))  # requeued again (say, after a node failure)
    assert [r["step"] for r in h.read_steps(run / "steps.jsonl")[done:]] == [STEPS + 1, STEPS + 2, STEPS + 3], (
        "resumed from last.ckpt (the newest by global step), not from the stale hpc checkpoint")
    assert not list(run.glob("hpc_ckpt_*.ckpt")), "the superseded hpc checkpoint no longer competes"
    retired = run / "superseded_hpc" / f"hpc_ckpt_1-step{stale}.ckpt"
    assert saved_step(retired) == stale, "moved aside, not deleted"
    shutil.rmtree(run / "superseded_hpc")
