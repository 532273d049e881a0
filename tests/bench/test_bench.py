"""The benchmark is only fair if the baselines do the same work: same loss on the same batch, same weights.

No timing is asserted here (timings belong to `tools/bench.py`, printed side by side).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlsafe.bench.contenders import (_sft_batches, _sft_module, preference_batches, preference_module,
                                     trl_dpo_trainer, trl_inputs)
from vlsafe.bench.setup import BenchConfig, export_hf, freeze_like_vlsafe, frozen_copy, hf_labels, to_hf_inputs

ROOT = Path(__file__).resolve().parents[2]
CFG = BenchConfig.tiny()


def test_plain_torch_baseline_computes_the_sft_loss_of_vlsafe(tmp_path):
    module = _sft_module(CFG).eval()
    batch = _sft_batches(CFG, module)[0]
    hf, _ = export_hf(module, tmp_path / "hf")
    with torch.no_grad():
        ours = module._loss(batch)[0]
        theirs = hf(**to_hf_inputs(batch, hf.config.image_token_index), labels=hf_labels(batch)).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-4)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def test_trl_dpo_trainer_computes_the_dpo_loss_of_vlsafe_after_the_policy_moved(tmp_path):
    module = preference_module(CFG, reference="copy").eval()
    _perturb(module.vlm, seed=1)  # the reference stays at the start: the loss is no longer log(2)
    batch = preference_batches(CFG, module)[0]
    policy, _ = export_hf(module, tmp_path / "hf")
    reference = export_hf(type("Ref", (), {"vlm": module.reference_vlm, "processor": module.processor})(),
                          tmp_path / "ref")[0]
    freeze_like_vlsafe(policy)
    trainer = trl_dpo_trainer(policy.eval(), frozen_copy(reference), [batch], CFG, tmp_path)
    with torch.no_grad():
        ours, _ = module.compute_loss(batch)
        theirs = trainer.compute_loss(trainer.model, trl_inputs(batch, policy.config.image_token_index))
    assert abs(float(ours) - 0.6931) > 1e-3, "the policy must have moved for this comparison to mean anything"
    assert float(ours) == pytest.approx(float(theirs), rel=1e-4)


@pytest.mark.slow
def test_bench_tool_runs_side_by_side_and_writes_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "tools/bench.py", "--tiny", "--scenarios", "sft", "peak", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SFT step: vlsafe vs plain PyTorch" in proc.stdout
    report = json.loads(out.read_text())
    rows = {r["comparison"]: r for r in report["comparisons"]}
    sft = rows["SFT step: vlsafe vs plain PyTorch + HF Llava"]
    assert sft["speed_ratio"] > 0 and sft["vlsafe_peak_mb"] > 0 and sft["baseline_peak_mb"] > 0
    contenders = report["contenders"]
    # both contenders started from the same weights and batch
    assert contenders["sft/vlsafe"]["first_loss"] == pytest.approx(contenders["sft/plain_torch"]["first_loss"], rel=1e-4)
    assert 0 < rows["Utilisation: SFT step FLOP/s vs dense matmul peak"]["speed_ratio"] < 1.5
