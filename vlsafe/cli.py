"""The command line: LightningCLI over vlsafe method modules and data modules.

`python tools/fit.py recipes/x.yaml [overrides]` is shorthand for `python tools/fit.py fit --config
recipes/x.yaml [overrides]`; every LightningCLI subcommand (fit/validate/test/predict) and flag
(`--print_config`, `--trainer.max_steps 10`, ...) works as documented by Lightning.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from lightning.pytorch.cli import LightningCLI

from vlsafe.data.datamodule import ShardDataModule
from vlsafe.methods.base import VLMModule

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def expand_recipe_shorthand(argv: list[str]) -> list[str]:
    """`recipe.yaml ...` -> `fit --config recipe.yaml ...`; anything else is passed through."""
    if argv and argv[0].endswith((".yaml", ".yml")):
        return ["fit", "--config", argv[0], *argv[1:]]
    return argv


class VLSafeCLI(LightningCLI):
    """LightningCLI with vlsafe's base classes, so recipes choose any method/data module by class_path."""

    def __init__(self, args: list[str] | None = None, **kwargs):
        super().__init__(VLMModule, ShardDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         save_config_kwargs={"overwrite": True}, args=args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """With `--ckpt_path`, the model is rebuilt from the checkpoint's hyperparameters.

        vlsafe stores hyperparameters as plain data (the builder's class_path/init_args, LoRA and optimiser
        settings), so they slot under the recipe's model class; the checkpoint wins over the recipe.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters") or {}
        if "vlm" not in hparams:
            return super()._parse_ckpt_path()
        class_path = self.config[subcommand]["model"]["class_path"]
        update = {subcommand: {"model": {"class_path": class_path, "init_args": dict(hparams)}}}
        self.config = self.parser.parse_object(update, self.config)


def main(argv: list[str] | None = None) -> None:
    argv = expand_recipe_shorthand(list(sys.argv[1:] if argv is None else argv))
    VLSafeCLI(args=argv)


if __name__ == "__main__":
    main()
