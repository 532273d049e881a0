"""Strategy switching is a one-line change: snippets compose with any recipe as a second --config, or the
strategy is overridden on the command line, and the scale recipes resolve to the classes they name."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SNIPPETS = sorted((ROOT / "recipes" / "strategies").glob("*.yaml"))


def resolved_strategy(args: list[str], capsys, monkeypatch):
    from vlsafe.cli import main

    monkeypatch.setattr(sys, "argv", ["tools/fit.py"])
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    config = yaml.safe_load(out[out.index("seed_everything:"):])  # importing deepspeed logs a line first
    return config["trainer"]["strategy"], config


CASES = [("recipes/demo/sft.yaml", snippet) for snippet in SNIPPETS] + [
    # a recipe with its own class_path strategy and init_args, replaced by another class
    ("recipes/scale/sft_13b_deepspeed3.yaml", ROOT / "recipes" / "strategies" / "fsdp2.yaml")]


@pytest.mark.parametrize("recipe,snippet", CASES, ids=lambda x: Path(x).name)
def test_strategy_snippet_composes_with_a_recipe(snippet, recipe, capsys, monkeypatch):
    wanted = yaml.safe_load(snippet.read_text())["trainer"]["strategy"]
    strategy, config = resolved_strategy([str(ROOT / recipe), "--config", str(snippet)], capsys, monkeypatch)
    if isinstance(wanted, str):
        assert strategy == wanted
    else:
        assert strategy["class_path"] == wanted["class_path"]
        # every value the snippet sets wins; no init_args leak over from the recipe's own strategy
        assert wanted["init_args"].items() <= strategy["init_args"].items()
        assert "offload_optimizer" not in strategy["init_args"] or "deepspeed" in wanted["class_path"]
    assert config["model"]["class_path"].startswith("vlsafe.methods.")  # the rest of the recipe is untouched


def test_strategy_is_one_command_line_override(capsys, monkeypatch):
    strategy, _ = resolved_strategy(["recipes/scale/sft_7b_fsdp.yaml", "--trainer.strategy", "vlsafe.scale.fsdp2.FSDP2",
                                     "--trainer.strategy.reshard_after_forward", "false"], capsys, monkeypatch)
    assert strategy["class_path"] == "vlsafe.scale.fsdp2.FSDP2"
    assert strategy["init_args"]["reshard_after_forward"] is False
    strategy, _ = resolved_strategy(["recipes/scale/sft_7b_fsdp.yaml", "--trainer.strategy", "deepspeed_stage_3"],
                                    capsys, monkeypatch)
    assert strategy == "deepspeed_stage_3"


@pytest.mark.parametrize("recipe,size,strategy", [
    ("sft_7b_fsdp.yaml", "7b", "vlsafe.scale.fsdp.FSDP"), ("sft_7b_fsdp2.yaml", "7b", "vlsafe.scale.fsdp2.FSDP2"),
    ("sft_13b_deepspeed3.yaml", "13b", "vlsafe.scale.deepspeed.DeepSpeed"),
    ("sft_13b_lora_fsdp.yaml", "13b", "vlsafe.scale.fsdp.FSDP"),
    ("bpo_7b_deepspeed2.yaml", "7b", "vlsafe.scale.deepspeed.DeepSpeed"),
    ("bpo_13b_deepspeed3.yaml", "13b", "vlsafe.scale.deepspeed.DeepSpeed")])
def test_scale_recipes_name_their_size_and_strategy(recipe, size, strategy):
    """(tests/test_cli.py parses every recipe against its classes; this checks what each one promises.)"""
    text = (ROOT / "recipes" / "scale" / recipe).read_text()
    config = yaml.safe_load(text)
    assert config["trainer"]["strategy"]["class_path"] == strategy
    assert size in str(config["model"]["init_args"]["vlm"]["init_args"])
    assert text.count("Not run on a GPU yet") == 1
