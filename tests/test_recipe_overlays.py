"""Overlay recipes (vlsafe.reliability.recipe_overlays) resolve to exactly the config they stand for.

A recipe that differs from another in a few keys holds only those keys and runs as
`vlsafe fit --config BASE --config OVERLAY`. For each overlay, the config LightningCLI's own parser resolves from
that command must equal the base recipe with the differences listed below (read from the standalone file the
overlay replaced) and nothing else: a list jsonargparse replaces instead of merging, a key that silently keeps
the base's value, or a class spec merged wrongly all show up as a difference. Nothing is instantiated.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlsafe.cli import VLSafeCLI, check_recipes, main
from vlsafe.reliability.recipe_overlays import config_chain, overlay_base

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def _run_dir(folder: str) -> dict[str, Any]:
    """The run folder appears three times in a recipe: default_root_dir and both loggers' save_dir."""
    return {"trainer.default_root_dir": folder, "trainer.logger.0.init_args.save_dir": folder,
            "trainer.logger.1.init_args.save_dir": folder}


LLAVA_LORA = {"model.init_args.lora": {"r": 128, "alpha": 256, "dropout": 0.05, "target_modules": "all-linear"},
              "model.init_args.optim.lr": 2e-4, "model.init_args.optim.projector_lr": 2e-5}

# overlay -> (its base, the keys in which the standalone recipe it replaced differed from that base)
DIFFERENCES: dict[str, tuple[str, dict[str, Any]]] = {
    "bpo_lora.yaml": ("bpo.yaml", {
        **_run_dir("runs/llava-1.5-7b-bpo-lora"), "trainer.strategy": "ddp",
        "model.init_args.lora": {"r": 256, "alpha": 512, "dropout": 0.0, "target_modules": "all-linear"},
        "model.init_args.reference": "adapter", "model.init_args.optim.lr": 1e-5}),
    "dpo.yaml": ("bpo.yaml", {
        **_run_dir("runs/llava-1.5-7b-dpo"), "model.init_args.blind": "off",
        "data.init_args.train": [{"path": "/path/to/shards/mmsafe_po"}]}),
    "sft_lora.yaml": ("sft.yaml", {
        **_run_dir("runs/llava-1.5-7b-sft-lora"), **LLAVA_LORA}),
    "vlguard_mixed_lora.yaml": ("vlguard_mixed.yaml", {**_run_dir("runs/llava-1.5-7b-vlguard-mixed-lora"),
                                                       **LLAVA_LORA}),
    "vlguard_posthoc_lora.yaml": ("vlguard_posthoc.yaml", {**_run_dir("runs/llava-1.5-7b-vlguard-posthoc-lora"),
                                                           **LLAVA_LORA}),
}


class _ParserReady(Exception):
    pass


class _ParserOnly(VLSafeCLI):
    """VLSafeCLI up to its finished parser (subcommands, forced callbacks and all), then stop."""

    def parse_arguments(self, parser, args):
        raise _ParserReady(parser)


@pytest.fixture(scope="module")
def parser():
    with pytest.raises(_ParserReady) as ready:
        _ParserOnly(args=["fit"])
    return ready.value.args[0]


def _resolve(parser, *configs: Path) -> dict[str, Any]:
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    resolved = parser.parse_args(args).clone().as_dict()["fit"]
    resolved.pop("config", None)  # the file names themselves
    return resolved


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted path: value} of a resolved config, list items by index, so a failure names the keys that differ."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) and tree else None
    if items is None:
        return {prefix[:-1]: tree}
    return {key: value for name, child in items for key, value in _flat(child, f"{prefix}{name}.").items()}


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree[int(part)] if isinstance(tree, list) else tree.setdefault(part, {})
    tree[int(last) if isinstance(tree, list) else last] = copy.deepcopy(value)


def _leaves(tree: Any, prefix: str = "") -> list[str]:
    """Dotted paths of an overlay's settings; a list is one setting (jsonargparse replaces lists whole)."""
    if isinstance(tree, dict):
        return [leaf for key, value in tree.items() for leaf in _leaves(value, f"{prefix}{key}.")]
    return [prefix[:-1]]


def _related(key: str, listed: str) -> bool:
    """`key` is the listed difference, inside it (`lora.r` in `lora`), or a list holding it (`trainer.logger`)."""
    return key == listed or key.startswith(f"{listed}.") or listed.startswith(f"{key}.")


def test_every_overlay_is_listed_here():
    overlays = {path.name for path in RECIPES.glob("*.yaml") if overlay_base(path) is not None}
    assert overlays == set(DIFFERENCES)


@pytest.mark.parametrize("overlay", sorted(DIFFERENCES))
def test_overlay_resolves_to_its_base_plus_the_listed_differences(parser, overlay, tmp_path):
    base, differences = DIFFERENCES[overlay]
    assert config_chain(RECIPES / overlay) == [RECIPES / base, RECIPES / overlay]
    header = (RECIPES / overlay).read_text(encoding="utf-8").split("\n", 3)[1]
    assert re.search(rf"vlsafe fit --config recipes/{base} --config recipes/{overlay}$", header), \
        f"{overlay}: line 2 should show the command the test runs"

    expected_yaml = yaml.safe_load((RECIPES / base).read_text(encoding="utf-8"))
    for dotted, value in differences.items():
        _set(expected_yaml, dotted, value)
    (tmp_path / "expected.yaml").write_text(yaml.safe_dump(expected_yaml), encoding="utf-8")

    composed = _flat(_resolve(parser, RECIPES / base, RECIPES / overlay))
    expected = _flat(_resolve(parser, tmp_path / "expected.yaml"))
    differing = sorted(key for key in composed.keys() | expected.keys()
                       if composed.get(key, "-") != expected.get(key, "-"))
    assert not differing, f"{overlay} on {base} resolves differently from the listed differences at: " + ", ".join(
        f"{key} = {composed.get(key, '-')!r} (expected {expected.get(key, '-')!r})" for key in differing)

    # ... and the overlay holds only what differs: each of its keys is one of the listed differences
    overlay_yaml = yaml.safe_load((RECIPES / overlay).read_text(encoding="utf-8"))
    extra = [key for key in _leaves(overlay_yaml) if not any(_related(key, listed) for listed in differences)]
    assert not extra, f"{overlay} repeats keys of its base: {extra}"


def test_fit_shorthand_composes_base_and_overlay(capsys, monkeypatch):
    """`python tools/fit.py recipes/bpo.yaml --config recipes/bpo_lora.yaml`, as the overlay's header says."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["recipes/bpo.yaml", "--config", "recipes/bpo_lora.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["lora"]["r"] == 256  # from the overlay
    assert config["model"]["init_args"]["response_format"] == "released"  # from the base
    assert [entry["init_args"]["save_dir"] for entry in config["trainer"]["logger"]] == \
        ["runs/llava-1.5-7b-bpo-lora"] * 2  # the overlay's list replaced the base's


def test_an_overlay_without_its_base_names_the_command_to_run(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        check_recipes(["fit", "--config", "recipes/bpo_lora.yaml"])
    assert exit_info.value.code == 2
    assert "vlsafe fit --config recipes/bpo.yaml --config recipes/bpo_lora.yaml" in capsys.readouterr().err
    check_recipes(["fit", "--config", "recipes/bpo.yaml", "--config", "recipes/bpo_lora.yaml"])  # no error
