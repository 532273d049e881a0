"""Recipes log to CSV + TensorBoard with throughput out of the box; W&B / MLflow are one extra --config away."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from vlsafe.reliability.recipe_overlays import config_chain
from vlsafe.tools.plan import load_recipe

ROOT = Path(__file__).resolve().parents[2]
# the recipes this change equipped; new recipes should copy their logger/callback block
RECIPES = ["sft", "sft_lora", "sft_from_llava_hf", "bpo", "bpo_lora", "dpo", "demo/sft", "demo/bpo", "demo/dpo",
           "lrv", "perception", "vlguard_mixed", "vlguard_mixed_lora", "vlguard_posthoc", "vlguard_posthoc_lora",
           "demo/vlguard", "demo/lrv", "demo/perception", "protector_detector", "protector_detoxifier",
           "demo/protector_detector", "demo/protector_detoxifier"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_logs_csv_and_tensorboard_and_throughput(name):
    recipe = load_recipe([str(path) for path in config_chain(ROOT / f"recipes/{name}.yaml")])  # overlay on its base
    trainer = recipe["trainer"]
    loggers = [entry["class_path"] for entry in trainer["logger"]]
    assert loggers == ["lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger"], \
        "CSV first: its folder is trainer.log_dir, where config.yaml and the eval JSONs land for tools/report.py"
    save_dirs = {entry["init_args"]["save_dir"] for entry in trainer["logger"]}
    assert save_dirs == {trainer["default_root_dir"]}
    callbacks = [entry["class_path"] for entry in trainer["callbacks"]]
    assert "vlsafe.monitoring.throughput.VLMThroughputMonitor" in callbacks
    assert "lightning.pytorch.callbacks.LearningRateMonitor" in callbacks


@pytest.mark.parametrize("snippet, logger", [("wandb", "WandbLogger"), ("mlflow", "MLFlowLogger")])
def test_logger_snippet_appends_to_a_recipe_without_the_package_installed(snippet, logger, capsys, monkeypatch):
    from vlsafe.cli import main

    monkeypatch.setattr(sys, "argv", ["tools/fit.py"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "recipes/demo/dpo.yaml"), "--config",
              str(ROOT / f"recipes/loggers/{snippet}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert [entry["class_path"].rsplit(".", 1)[1] for entry in config["trainer"]["logger"]] == \
        ["CSVLogger", "TensorBoardLogger", logger]
    assert config["trainer"]["logger"][2]["init_args"]["log_model"] is False
