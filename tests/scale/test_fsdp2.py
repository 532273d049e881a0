"""Real sharded training on CPU: 2 processes (gloo), FSDP2 under Lightning's ModelParallelStrategy.

One launch (tests/scale/fsdp2_job.py) trains, saves a distributed checkpoint, resumes from it in a fresh
module and Trainer, trains a LoRA variant, and writes the sharded model's logits; the tests read its report
and convert its checkpoints to transformers.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from tests.scale.conftest import export, hf_logits

pytestmark = pytest.mark.slow  # one 2-process launch shared by the module


def test_parameters_are_sharded_over_both_processes(fsdp2_run):
    _, report = fsdp2_run
    assert report["world_size"] == 2 and report["omp"] == "1"
    assert report["embed_local_rows"] == (report["embed_global_rows"] + 1) // 2  # dim-0 shard, not a replica


def test_loss_falls_and_resume_continues_from_the_distributed_checkpoint(fsdp2_run):
    out, report = fsdp2_run
    first, second = report["phase1_losses"], report["phase2_losses"]
    assert len(first) == len(second) == 4
    assert first[-1] < first[0] - 0.5, first
    assert report["resumed_global_step"] == 8
    # the resumed run starts where the first stopped (not from the initial loss) and keeps falling
    assert second[0] < first[0] - 0.5 and abs(second[0] - first[-1]) < 0.5, (first, second)
    assert second[-1] < second[0], second
    written = {p.name for p in (out / "phase1").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"} <= written


def test_frozen_tower_stays_put_and_only_trainable_parameters_are_optimised(fsdp2_run):
    _, report = fsdp2_run
    assert report["vision_max_change"] == 0.0
    assert report["llm_max_change"] > 1e-3
    assert report["optimizer_params"] == report["trainable_params"] > 0


def test_a_trainable_head_outside_the_vlm_stays_identical_across_ranks(fsdp2_run):
    """Perception-style heads are not FSDP2 units; their gradients are averaged like DDP's."""
    _, report = fsdp2_run
    assert report["head_change"] > 1e-3  # it trained, on different data per rank ...
    assert report["head_rank_difference"] == 0.0  # ... and both ranks hold the same weights


def test_dpo_with_a_reference_copy_trains_under_fsdp2(fsdp2_run):
    _, report = fsdp2_run
    assert report["dpo_shared_tower"]  # the frozen tower is shared with the reference, sharded once
    assert report["dpo_reference_max_change"] == 0.0
    losses = report["dpo_losses"]
    assert abs(losses[0] - 0.6931) < 1e-3  # policy == reference at the start: -log sigmoid(0)
    assert min(losses[1:]) < losses[0] - 0.1, losses


def test_lora_under_fsdp2_trains_adapters_only(fsdp2_run):
    _, report = fsdp2_run
    assert report["lora_base_max_change"] == 0.0  # frozen base weights share units with the adapters
    assert report["lora_adapter_max_change"] > 1e-4
    assert report["lora_losses"][-1] < report["lora_losses"][0]


def _reload(folder) -> LlavaForConditionalGeneration:
    model, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    return model.float().eval()


def test_distributed_checkpoint_exports_to_transformers_with_identical_logits(fsdp2_run, tmp_path):
    out, _ = fsdp2_run
    assert export([str(out / "phase2"), "--out", str(tmp_path / "hf")]) == 0
    expected = torch.load(out / "logits.pt", weights_only=True)  # computed by the sharded model
    theirs = hf_logits(_reload(tmp_path / "hf"), expected)[..., :expected["logits"].shape[-1]]
    assert (theirs - expected["logits"]).abs().max() < 1e-5
    assert expected["logits"].abs().max() > 0.1


def test_consolidated_safetensors_reloads_into_vlsafe(fsdp2_run, tmp_path):
    import json

    from vlsafe.scale.convert import build_core

    out, _ = fsdp2_run
    assert export([str(out / "phase2"), "--out", str(tmp_path / "st"), "--format", "safetensors"]) == 0
    state = load_file(str(tmp_path / "st" / "model.safetensors"))
    hparams = json.loads((tmp_path / "st" / "vlsafe_hparams.json").read_text())
    vlm, _ = build_core(hparams)
    missing, unexpected = vlm.load_state_dict({k[len("vlm."):]: v for k, v in state.items()}, strict=True)
    expected = torch.load(out / "logits.pt", weights_only=True)
    with torch.no_grad():
        ours = vlm.eval()(expected["input_ids"], torch.ones_like(expected["input_ids"]),
                          pixel_values=expected["pixel_values"]).logits
    assert (ours - expected["logits"]).abs().max() < 1e-5


@pytest.mark.parametrize("lora", ["merge", "adapter"])
def test_lora_distributed_checkpoint_exports_merged_or_as_peft_adapter(fsdp2_run, tmp_path, lora):
    from peft import PeftModel

    out, _ = fsdp2_run
    assert export([str(out / "lora"), "--out", str(tmp_path / "hf"), "--lora", lora]) == 0
    batch = torch.load(out / "logits.pt", weights_only=True)
    expected = torch.load(out / "lora_logits.pt", weights_only=True)["logits"]
    model = _reload(tmp_path / "hf")
    if lora == "adapter":
        assert not (tmp_path / "hf" / "adapter" / "adapter_model.safetensors").stat().st_size == 0
        base = hf_logits(model, batch)[..., :expected.shape[-1]]
        assert (base - expected).abs().max() > 1e-4  # the folder alone is the base model, not the tuned one
        model = PeftModel.from_pretrained(model, tmp_path / "hf" / "adapter").eval()
        targeted = {name.split(".lora_A")[0] for name, _ in model.named_parameters() if ".lora_A" in name}
        assert targeted and all("language_model" in name for name in targeted)  # never the CLIP tower
    theirs = hf_logits(model, batch)[..., :expected.shape[-1]]
    assert (theirs - expected).abs().max() < 1e-5
