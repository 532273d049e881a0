"""`vlsafe plan`: its figures against what real runs allocate, and its output on the paper recipes.

The validation run is real: tests/scale/plan_job.py trains one step with FSDP2 on 2 CPU processes (gloo) and
one with DDP, and records each rank's local parameter, gradient and AdamW-state bytes; the planner, fed the
same recipe file, must be within 10% of every rank.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tests.scale.conftest import ROOT, run_job
from vlsafe.scale.plan import PlanError, Strategy, cheapest_fix, plan_memory, single_changes
from vlsafe.tools.plan import load_recipe, main, named_strategy, render, setup_from_recipe

TINY = {"hidden_size": 128, "intermediate_size": 256, "num_layers": 2, "num_heads": 4, "max_length": 128}


def tiny_recipe(folder: Path, tokenizer: str, **model_args) -> Path:
    recipe = {"trainer": {"accelerator": "cpu", "devices": 2, "precision": "32-true",
                          "strategy": {"class_path": "vlsafe.scale.fsdp2.FSDP2",
                                       "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}},
              "model": {"class_path": "vlsafe.methods.sft.SFTModule",
                        "init_args": {"vlm": {"class_path": "vlsafe.builders.TinyVLM",
                                              "init_args": {**TINY, "tokenizer": tokenizer}},
                                      "train_vision": False,
                                      "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"}, **model_args}},
              "data": {"class_path": "vlsafe.data.datamodule.ShardDataModule",
                       "init_args": {"train": "unused", "batch_size": 2}}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow  # a 2-process launch
def test_parameter_gradient_optimizer_bytes_match_a_real_fsdp2_and_ddp_run(tmp_path, tiny_tokenizer_dir):
    recipe = tiny_recipe(tmp_path, tiny_tokenizer_dir)
    run_job("plan_job.py", ["--recipe", str(recipe), "--out", str(tmp_path)])
    measured = json.loads((tmp_path / "measured.json").read_text())
    setup, _ = setup_from_recipe(load_recipe([str(recipe)]))
    assert setup.strategy.kind == "fsdp2" and setup.workload.gpus == 2
    assert 0 < setup.model.trainable < setup.model.total  # the frozen tower is counted, not trained
    plans = {"fsdp2": plan_memory(setup, 80),
             "ddp": plan_memory(replace(setup, strategy=named_strategy("ddp", setup.strategy)), 80)}
    for strategy, ranks in measured.items():
        assert len(ranks) == 2
        for rank, held in enumerate(ranks):
            for row in ("parameters", "gradients", "optimizer"):
                predicted = plans[strategy].rows[row]
                assert abs(predicted - held[row]) <= 0.10 * held[row], (strategy, rank, row, predicted, held[row])
    # sharding is real: each FSDP2 rank holds about half of what a DDP rank holds
    assert measured["fsdp2"][0]["parameters"] < 0.6 * measured["ddp"][0]["parameters"]


def test_meta_counts_equal_the_real_model_with_lora_and_the_reference_copy(tiny_tokenizer_dir):
    """Trainable/frozen follow the recipe (LoRA via peft, frozen tower); a DPO copy costs what the module holds."""
    from vlsafe.builders import TinyVLM
    from vlsafe.core.lora import count_parameters
    from vlsafe.methods.preference.module import PreferenceModule
    from vlsafe.scale.model_size import count_recipe_model
    from vlsafe.scale.plan import Setup, Workload

    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    real = PreferenceModule(vlm=TinyVLM(**TINY, tokenizer=tiny_tokenizer_dir), lora=lora, train_vision=False,
                            reference="copy")
    counted = count_recipe_model(TinyVLM(**TINY, tokenizer=tiny_tokenizer_dir), lora=lora, train_vision=False)
    assert (counted.trainable, counted.total) == count_parameters(real.vlm) and counted.lora
    assert counted.trainable < counted.parts["llm"].total // 10  # adapters only, the base stays frozen
    held = sum(p.numel() * p.element_size() for name, p in real.reference_vlm.named_parameters()
               if not name.startswith("vision."))  # the frozen tower is shared with the policy
    assert real.reference_vlm.vision is real.vlm.vision
    setup = Setup(counted, Strategy("ddp"), Workload(gpus=1, micro_batch=1, seq_len=128, reference="copy"))
    assert plan_memory(setup, 80).rows["reference"] == held
    for mode in ("precomputed", "none"):
        assert plan_memory(replace(setup, workload=replace(setup.workload, reference=mode)), 80).rows["reference"] == 0


def test_the_7b_and_13b_paper_recipes_print_a_table_with_exact_counts(capsys):
    assert main([str(ROOT / "recipes/scale/sft_7b_fsdp2.yaml"), "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    # LLaVA-1.5-7B: open_clip ViT-L/14-336 (304.3M incl. its unused 0.79M CLIP projection) + mlp2x_gelu projector
    # (21.0M) + Vicuna-7B (6.74B)
    assert "7.06B parameters (7,063,689,216" in out and "vision 304.3M, projector 21.0M, llm 6.74B" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("per GPU, GiB"))
    for name in ("recipe: FSDP2", "DDP", "FSDP", "ZeRO-2", "ZeRO-3", "ZeRO-3 offload"):
        assert name in header
    total = next(line for line in lines if line.startswith("total")).split()[1:]
    assert len(total) == 6 and all(float(x) > 0 for x in total)
    assert "verdict: fits" in out

    assert main(["--config", str(ROOT / "recipes/scale/bpo_13b_deepspeed3.yaml"), "--gpu-memory", "40", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["total_parameters"] == 13_351_625_728  # LLaVA-1.5-13B, same tower and projector layout
    assert report["workload"]["reference"] == "copy" and report["plan"]["per_gpu_gib"]["reference"] > 0
    assert report["plan"]["strategy"] == "ZeRO-3"


def test_an_overlay_changes_the_strategy_and_a_plan_that_does_not_fit_gets_the_cheapest_fix():
    recipe = load_recipe([str(ROOT / "recipes/scale/bpo_7b_deepspeed2.yaml"), str(ROOT / "recipes/strategies/ddp.yaml")])
    setup, _ = setup_from_recipe(recipe, with_lora_option=True)
    assert setup.strategy.kind == "ddp" and setup.workload.reference == "copy"
    plan = plan_memory(setup, 40)
    assert not plan.fits
    fix = cheapest_fix(setup, 40)
    assert fix is not None and fix.plan.fits
    cost = sum(c.cost for c in fix.changes)
    # computed, not listed: no single change that is cheaper than the chosen set fits on its own
    assert all(not alone.plan.fits for alone in single_changes(setup, 40) if alone.changes[0].cost < cost)
    out = render("bpo_7b + ddp", "LlavaOriginal", setup, 40)
    assert "does NOT fit (DDP)" in out and f"cheapest change that fits: {fix.description}" in out


@pytest.mark.parametrize("recipe, overlay, args, message", [
    ("recipes/scale/sft_7b_fsdp.yaml", {"trainer": {"strategy": "horovod"}}, [], "unknown strategy 'horovod'"),
    (None, {"trainer": {"devices": 8}, "data": {"init_args": {"batch_size": 4}}}, [], "has no model to plan"),
    ("recipes/scale/sft_7b_fsdp.yaml", {}, ["--gpu-memory", "0"], "--gpu-memory must be a positive number of GiB"),
])
def test_bad_settings_are_named(tmp_path, capsys, recipe, overlay, args, message):
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    configs = ([str(ROOT / recipe)] if recipe else []) + [str(tmp_path / "overlay.yaml")]
    code = main([arg for path in configs for arg in ("--config", path)] + args)
    assert code == 2 and message in capsys.readouterr().err


def toy_count(total: int = 1000, trainable: int = 1000):
    from vlsafe.scale.model_size import ModelCount, PartCount

    part = PartCount(total, trainable, 4 * total, 4 * trainable)
    empty = PartCount(0, 0, 0, 0)
    return ModelCount(total=total, trainable=trainable, bytes=4 * total, trainable_bytes=4 * trainable,
                      parts={"vision": empty, "projector": empty, "llm": part}, largest_block=100, output_embedding=0,
                      llm_hidden=8, llm_intermediate=16, llm_layers=2, vocab_size=32, vision_hidden=8,
                      vision_layers=2, image_tokens=4, lora=False, source="toy")


def test_the_strategy_table_by_hand_and_named_errors():
    """1000 fp32 parameters (all trainable) on 2 GPUs, the docstring's table worked by hand."""
    from vlsafe.scale.plan import Setup, Workload

    setup = Setup(toy_count(), Strategy("fsdp2"), Workload(gpus=2, micro_batch=1, seq_len=8, precision="32-true"))
    rows = plan_memory(setup, 1).rows
    assert (rows["parameters"], rows["gradients"], rows["optimizer"]) == (2000, 2000, 4000)
    rows = plan_memory(replace(setup, strategy=Strategy("ddp")), 1).rows
    assert (rows["parameters"], rows["gradients"], rows["optimizer"]) == (4000, 4000, 8000)
    bf16 = replace(setup, workload=replace(setup.workload, precision="bf16-mixed"))
    rows = plan_memory(replace(bf16, strategy=Strategy("zero3")), 1).rows
    assert (rows["parameters"], rows["gradients"], rows["optimizer"]) == (1000, 1000, 6000)
    offload = plan_memory(replace(bf16, strategy=Strategy("zero3", offload_optimizer=True, offload_parameters=True)), 1)
    assert (offload.rows["parameters"], offload.rows["optimizer"], offload.host_bytes) == (0, 0, 7000)
    with pytest.raises(PlanError, match="GPU memory must be a positive number of GiB, got 0"):
        plan_memory(setup, 0)
    with pytest.raises(PlanError, match="unknown strategy 'zero1'"):
        Strategy("zero1")
