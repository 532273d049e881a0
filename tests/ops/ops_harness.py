"""Shared by the ops tests and the training subprocesses they start (on PYTHONPATH there).

A tiny LoRA SFT run on the synthetic world: LoRA dropout 0.1 makes the run consume the torch RNG every
step, so only a resume that restores the RNG states reproduces it; 40 samples / batch 4 / 2 workers make a
10-step epoch, so 20 steps cross an epoch boundary and a checkpoint every 5 steps lands on it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MAX_STEPS = 20
EVERY = 5

RECIPE = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: {max_steps}
  precision: 32-true
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  limit_val_batches: 1
  default_root_dir: {run}
  callbacks:
    - class_path: vlsafe.ops.steplog.StepLog
      init_args: {{path: {run}/steps.jsonl}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {run}/checkpoints, every_n_train_steps: {every}, save_last: true, save_top_k: -1}}
model:
  class_path: vlsafe.methods.sft.SFTModule
  init_args:
    vlm:
      class_path: vlsafe.builders.TinyVLM
      init_args: {{hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 4}}
    lora: {{r: 4, alpha: 8, dropout: 0.1}}
    optim: {{lr: 3.0e-3, warmup_steps: 3}}
data:
  class_path: vlsafe.data.synthetic.module.SyntheticWorld
  init_args: {{root: {world}, kinds: [qa], train_samples: 40, val_samples: 8, batch_size: 4, num_workers: 2,
              shuffle_buffer: 16}}
"""

SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "vlsafe-test", "SLURM_NTASKS": "1",
             "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "node001", "SLURM_JOB_NUM_NODES": "1"}


class Throttle(L.Callback):
    """Sleep after every step so a test can signal or kill a subprocess at a chosen step."""

    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


class SignalAt(L.Callback):
    """Send this process `signal` at the end of step `step` (a signal from outside, without a subprocess)."""

    def __init__(self, step: int, signal: str = "SIGTERM"):
        self.step, self.signal = step, signal

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))


def write_recipe(run: Path, world: Path, max_steps: int = MAX_STEPS) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / "recipe.yaml"
    path.write_text(RECIPE.format(run=run, world=world, max_steps=max_steps, every=EVERY))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])})
    env.update(extra)
    return env


def start_fit(recipe: Path, *args: str, env: dict[str, str] | None = None, throttle: float = 0.05,
              new_session: bool = False) -> subprocess.Popen:
    """`python tools/fit.py recipe ...` as a user runs it, slowed down by `Throttle`.

    `new_session`: in its own session and process group (pgid == pid), as a SLURM job step or a shell job is, so
    a test can signal the whole group, dataloader workers included, with `os.killpg(proc.pid, ...)`.
    """
    command = [sys.executable, "tools/fit.py", str(recipe), "--trainer.callbacks+=ops_harness.Throttle",
               f"--trainer.callbacks.seconds={throttle}", *args]
    log_path = recipe.parent / f"fit-{time.monotonic_ns()}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env or subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=new_session)
    proc.log_path = log_path
    return proc


def wait_for_step(proc: subprocess.Popen, steps_file: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if steps_file.exists() and any(r["step"] >= step for r in read_steps(steps_file)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before step {step}:\n{output(proc)}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"step {step} not reached within {timeout} s:\n{output(proc)}")


def output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()[-6000:]


def finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        raise


def fake_scontrol(folder: Path) -> tuple[Path, Path]:
    """A `scontrol` that appends its arguments to `folder/scontrol_calls.txt`: (its bin folder, the log)."""
    bin_dir, calls = folder / "bin", folder / "scontrol_calls.txt"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    script.chmod(0o755)
    return bin_dir, calls


def path_with(bin_dir: Path) -> str:
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def group_gone(pgid: int, timeout: float = 10) -> bool:
    """True once no process of group `pgid` is left (dataloader workers included)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def read_steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(path: Path) -> dict[int, float]:
    """Last logged loss of each step (a step redone after a crash is logged again)."""
    return {r["step"]: r["loss"] for r in read_steps(path)}


def fit_in_process(recipe: Path, *args: str) -> None:
    """The same CLI in this process (no interpreter start-up): for runs nobody signals."""
    from unittest import mock

    from vlsafe.cli import main

    with mock.patch.object(sys, "argv", ["tools/fit.py"]):
        main([str(recipe), *args])


def trained_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return {k: v for k, v in state["state_dict"].items() if v.dtype.is_floating_point}


def max_weight_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
