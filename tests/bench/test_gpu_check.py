"""`tools/gpu_check.py` must work the first time a GPU is available: its tiny size runs the same code paths on a
CPU (FSDP2 with bf16 compute, SDPA, TRL's DPOTrainer, the padded vocabulary), here, in the suite."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlsafe.bench.gpu_check import (
    PHASES,
    GpuCheckConfig,
    lightning_stopper,
    trl_stopper,
)

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ("steps", "samples", "tokens", "seconds", "samples_per_s", "tokens_per_s", "median_step_seconds",
           "model_flops", "achieved_flops_per_s", "mfu", "mfu_vs_matmul", "peak_memory_bytes", "first_loss")


def test_tiny_gpu_check_measures_every_phase_and_writes_finite_figures(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--tiny", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    cfg = GpuCheckConfig.tiny()
    assert report["ok"] is True and list(report["phases"]) == list(PHASES)
    assert report["device"]["peak_flops"] > 0 and report["device"]["matmul_peak_flops"] > 0
    for name, phase in report["phases"].items():
        assert phase["status"] == "ok", (name, phase.get("error"))
        for field in FIGURES:
            assert isinstance(phase[field], (int, float)) and math.isfinite(phase[field]), (name, field)
            assert phase[field] > 0, (name, field)
        # warm-up excluded: exactly the timed steps, each of a full batch
        per_step = cfg.batch_size if name.startswith("sft") else cfg.dpo_batch_size
        assert phase["steps"] == cfg.timed_steps and phase["samples"] == cfg.timed_steps * per_step
        assert phase["samples_per_s"] == pytest.approx(phase["samples"] / phase["seconds"])
        assert phase["mfu"] == pytest.approx(phase["achieved_flops_per_s"] / report["device"]["peak_flops"])
        assert f"{name:<18} ok" in proc.stdout  # the printed table has the row, with its n beside the figures
    ours, trl = report["phases"]["dpo/vlsafe_fsdp2"], report["phases"]["dpo/trl"]
    # the same DPO problem on both sides: policy == reference at the first step, so both losses are log 2
    assert ours["first_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert trl["first_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert ours["tokens"] == trl["tokens"] and ours["model_flops"] == trl["model_flops"]  # same batches
    # a random LM's first loss is log(vocabulary): the LM head really has the padded 1088 rows
    assert report["phases"]["sft/vlsafe_fsdp2"]["first_loss"] == pytest.approx(math.log(cfg.llm_vocab_size), abs=0.1)
    ratios = report["ratios"]
    assert ratios["dpo_samples_per_s_vlsafe_over_trl"] == pytest.approx(ours["samples_per_s"] / trl["samples_per_s"])
    assert ratios["dpo_tokens_per_s_vlsafe_over_trl"] == pytest.approx(ours["tokens_per_s"] / trl["tokens_per_s"])
    assert ratios["dpo_peak_memory_trl_over_vlsafe"] == pytest.approx(
        trl["peak_memory_bytes"] / ours["peak_memory_bytes"])
    assert "dpo_samples_per_s_vlsafe_over_trl:" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_full_gpu_check_without_cuda_stops_with_a_clear_message(tmp_path, capsys):
    from vlsafe.tools.gpu_check import main

    out = tmp_path / "check.json"
    assert main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--tiny" in err
    assert not out.exists()


def test_a_phase_that_runs_out_of_memory_is_recorded_freed_and_the_next_phase_still_runs(tmp_path, monkeypatch):
    import gc

    from vlsafe.bench.gpu_check import run_check
    from vlsafe.core.vlm import VLM
    from vlsafe.methods.sft import SFTModule

    def out_of_memory(self, batch, batch_idx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")

    monkeypatch.setattr(SFTModule, "training_step", out_of_memory)
    report = run_check(GpuCheckConfig.tiny(), tmp_path, torch.device("cpu"), 300,
                       phases=("sft/vlsafe_fsdp2", "dpo/vlsafe_fsdp2"))
    sft, dpo = report["phases"]["sft/vlsafe_fsdp2"], report["phases"]["dpo/vlsafe_fsdp2"]
    assert sft["status"] == "oom" and "Tried to allocate 2.00 GiB" in sft["error"]
    assert dpo["status"] == "ok" and dpo["steps"] == GpuCheckConfig.tiny().timed_steps
    assert report["ok"] is False and report["ratios"]["dpo_samples_per_s_vlsafe_over_trl"] is None  # no TRL phase
    gc.collect()
    assert not [o for o in gc.get_objects() if issubclass(type(o), VLM)], "a phase's model outlived it"


def test_time_budget_stops_a_phase_after_the_step_that_crosses_its_deadline_not_before_the_minimum():
    passed = 0.0  # a deadline long gone
    lightning = lightning_stopper(passed, min_steps=3)
    trainer = SimpleNamespace(should_stop=False)
    lightning.on_train_batch_end(trainer, None, None, None, batch_idx=1)
    assert trainer.should_stop is False  # two steps done: fewer than warm-up + 2 timed steps
    lightning.on_train_batch_end(trainer, None, None, None, batch_idx=2)
    assert trainer.should_stop is True and type(lightning).stopped

    hf = trl_stopper(passed, min_steps=3)
    control = SimpleNamespace(should_training_stop=False)
    hf.on_step_end(None, SimpleNamespace(global_step=2), control)
    assert control.should_training_stop is False
    hf.on_step_end(None, SimpleNamespace(global_step=3), control)
    assert control.should_training_stop is True

    future = lightning_stopper(float("inf"), min_steps=1)
    trainer = SimpleNamespace(should_stop=False)
    future.on_train_batch_end(trainer, None, None, None, batch_idx=50)
    assert trainer.should_stop is False
