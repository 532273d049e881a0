"""The command line as users run it: recipes parse, fit/validate/predict work, DDP on 2 CPU processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# recipes/loggers/ holds snippets added with a second --config, not recipes (tests/monitoring parses them);
# recipes/eval/ holds tools/evaluate.py specs (tests/eval parses them); recipes/strategies/ holds strategy
# snippets for a second --config (tests/scale/test_strategy_recipes.py composes them with recipes)
RECIPES = sorted(p.relative_to(ROOT) for p in (ROOT / "recipes").rglob("*.yaml")
                 if p.parent.name not in ("loggers", "eval", "strategies"))


def run(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}  # two DDP processes on two cores: one thread each, no oversubscription
    proc = subprocess.run([sys.executable, "tools/fit.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-5000:]}"
    return proc


def demo_recipe(tmp_path: Path, name: str = "sft", **replace: str) -> str:
    """A demo recipe with its output paths moved under tmp_path (runs/ holds the user's own demo models)."""
    text = (ROOT / f"recipes/demo/{name}.yaml").read_text()
    for old, new in {f"runs/demo-{name}": str(tmp_path / "run"), f".cache/vlsafe/demo-{name}": str(tmp_path / "world"),
                     **replace}.items():
        text = text.replace(old, new)
    path = tmp_path / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def small_run_args(tmp_path: Path, steps: int = 4) -> list[str]:
    return ["--trainer.max_steps", str(steps), "--data.init_args.train_samples", "64",
            "--data.init_args.val_samples", "16", "--data.init_args.batch_size", "4",
            "--model.init_args.vlm.init_args.hidden_size", "32", "--model.init_args.vlm.init_args.intermediate_size", "64"]


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_every_recipe_parses_against_the_classes_it_names(recipe, capsys, monkeypatch):
    from vlsafe.cli import main
    from vlsafe.reliability.recipe_overlays import config_chain

    base, *overlays = config_chain(ROOT / recipe)  # an overlay (e.g. bpo_lora.yaml) runs on top of its base
    monkeypatch.setattr(sys, "argv", ["tools/fit.py"])
    with pytest.raises(SystemExit) as exit_info:
        main([str(base), *(arg for overlay in overlays for arg in ("--config", str(overlay))), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: vlsafe.methods." in printed and "trainer:" in printed


def test_unknown_recipe_key_is_rejected(tmp_path, capsys, monkeypatch):
    from vlsafe.cli import main

    monkeypatch.setattr(sys, "argv", ["tools/fit.py"])
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "recipes/demo/sft.yaml").read_text().replace("train_vision:", "train_vison:"))
    with pytest.raises(SystemExit) as exit_info:
        main([str(bad), "--print_config"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "train_vison" in err and "did you mean 'train_vision'" in err


@pytest.mark.slow
def test_fit_then_validate_predict_and_chain_bpo_from_the_checkpoint(tmp_path):
    recipe = demo_recipe(tmp_path)
    fit = run([recipe, *small_run_args(tmp_path)], tmp_path)
    assert "[held-out, before training] answer accuracy" in fit.stdout
    assert "[held-out, after training] answer accuracy" in fit.stdout
    ckpts = sorted((tmp_path / "run").rglob("last.ckpt"))
    assert ckpts, "fit must leave a checkpoint"
    state = torch.load(ckpts[0], weights_only=True, map_location="cpu")  # plain data, no pickled objects
    assert state["global_step"] == 4
    assert state["hyper_parameters"]["vlm"]["class_path"] == "vlsafe.builders.TinyVLM"

    common = ["--config", recipe, *small_run_args(tmp_path), "--ckpt_path", str(ckpts[0])]
    validate = run(["validate", *common], tmp_path)
    assert "val/loss" in validate.stdout
    out = tmp_path / "predictions.jsonl"
    run(["predict", *common, "--trainer.callbacks+=vlsafe.eval.writer.JsonlPredictionWriter",
         f"--trainer.callbacks.path={out}"], tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 16 and {"id", "response", "reference"} <= set(rows[0])

    # the BPO demo recipe chains from that SFT checkpoint
    bpo_dir = tmp_path / "bpo"
    bpo = demo_recipe(bpo_dir, "bpo", **{"runs/demo-sft/checkpoints/last.ckpt": str(ckpts[0]),
                                         ".cache/vlsafe/demo-preference": str(bpo_dir / "world"),
                                         "synthetic_samples: 200": "synthetic_samples: 12"})
    fit = run([bpo, "--trainer.max_steps", "3", "--data.init_args.train_samples", "32", "--data.init_args.batch_size",
               "4", "--trainer.log_every_n_steps", "1"], tmp_path)
    assert "[held-out, before training] safety rate" in fit.stdout and "[held-out, after training] safety rate" in fit.stdout
    metrics = next((bpo_dir / "run").rglob("metrics.csv")).read_text()
    assert "train/rewards/accuracies" in metrics and "train/rewards/blind_margins" in metrics


@pytest.mark.slow
def test_ddp_two_cpu_processes_run_sft_steps(tmp_path):
    run([demo_recipe(tmp_path), *small_run_args(tmp_path, steps=3), "--trainer.devices", "2",
         "--trainer.strategy", "ddp", "--trainer.callbacks", "[]", "--data.init_args.num_workers", "0",
         "--trainer.log_every_n_steps", "1"], tmp_path)
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert state["global_step"] == 3
    metrics = list((tmp_path / "run").rglob("metrics.csv"))
    assert metrics and "train/loss" in metrics[0].read_text()


def test_fit_dash_c_recipe_is_key_checked_too(tmp_path, capsys, monkeypatch):
    """Issue 16.15: `fit -c recipe.yaml` went straight to jsonargparse, skipping the recipe-key check."""
    from vlsafe.cli import main

    monkeypatch.setattr(sys, "argv", ["tools/fit.py"])
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "recipes/demo/sft.yaml").read_text().replace("train_vision:", "train_vison:"))
    for args in (["fit", "-c", str(bad)], ["fit", f"-c={bad}"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--print_config"])
        assert exit_info.value.code == 2
        assert "did you mean 'train_vision'" in capsys.readouterr().err


class _ParseOnly:
    """The vlsafe CLI up to `--ckpt_path` handling: no model, data or trainer is built."""

    @staticmethod
    def run(args: list[str]):
        from vlsafe.cli import VLSafeCLI

        class ParseOnly(VLSafeCLI):
            def instantiate_classes(self) -> None:
                pass

            def _run_subcommand(self, subcommand: str) -> None:
                pass

        return ParseOnly(args=args)


def test_a_checkpoint_of_another_method_is_refused_and_ignored_overrides_are_reported(tmp_path, monkeypatch):
    """Issue 16.6: an SFT checkpoint as `--ckpt_path` of a BPO recipe trained on with a random reference
    model and the SFT run's optimizer/schedule/data position; an `optim.lr` override on resume was dropped."""
    from vlsafe.cli import VLSafeCLI

    monkeypatch.setattr(sys, "argv", ["tools/fit.py"])
    sft_recipe = demo_recipe(tmp_path)
    sft = VLSafeCLI(args=["--config", sft_recipe, *small_run_args(tmp_path)], run=False).model
    ckpt = tmp_path / "sft.ckpt"  # an SFT checkpoint as the SFT run leaves it (older ones lack the method record)
    torch.save({"state_dict": sft.state_dict(), "hyper_parameters": dict(sft.hparams), "global_step": 4,
                "pytorch-lightning_version": "2.6.0"}, ckpt)

    bpo = demo_recipe(tmp_path / "bpo", "bpo", **{"runs/demo-sft/checkpoints/last.ckpt": str(ckpt),
                                                  ".cache/vlsafe/demo-preference": str(tmp_path / "bpo/world"),
                                                  "synthetic_samples: 200": "synthetic_samples: 4"})
    args = ["fit", "--config", bpo, "--ckpt_path", str(ckpt), "--trainer.max_steps", "1",
            "--data.init_args.train_samples", "8", "--data.init_args.batch_size", "4"]
    with pytest.raises(ValueError, match="has other method/model hyperparameters") as refused:
        _ParseOnly.run(args)
    message = str(refused.value)
    assert type(refused.value).__name__ == "CheckpointMismatchError"
    assert "beta: only the recipe has it" in message and "FromCheckpoint, init_args: {path: " + str(ckpt) in message
    assert "vlm.class_path: 'vlsafe.builders.FromCheckpoint' (recipe/CLI) vs 'vlsafe.builders.TinyVLM'" \
        in message

    # the same method: resumes, and says which command-line values the checkpoint overrides
    with pytest.warns(UserWarning, match=r"IGNORED:\n  optim.lr: 0.5 \(recipe/CLI\) vs 0.001 \(checkpoint\)"):
        cli = _ParseOnly.run(["fit", "--config", sft_recipe, *small_run_args(tmp_path), "--ckpt_path", str(ckpt),
                              "--model.init_args.optim.lr", "0.5"])
    assert cli.config.fit.model.init_args.optim["lr"] == 0.001 and cli.config.fit.weights_only is True
