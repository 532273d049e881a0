"""The command line: LightningCLI over vlsafe method modules and data modules.

`python tools/fit.py recipes/x.yaml [overrides]` is shorthand for `python tools/fit.py fit --config
recipes/x.yaml [overrides]`; every LightningCLI subcommand (fit/validate/test/predict) and flag
(`--print_config`, `--trainer.max_steps 10`, ...) works as documented by Lightning.
"""
from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from vlsafe.cli_sections import FORCED_CALLBACKS
from vlsafe.data.datamodule import ShardDataModule
from vlsafe.methods.base import MethodModule
from vlsafe.ops.checkpoint_guard import (
    CheckpointGuard,
    CheckpointLoadError,
    check_resume,
    is_remote,
    read_checkpoint,
    report_ignored,
)
from vlsafe.ops.checkpoint_io import use_atomic_checkpoint_io
from vlsafe.ops.resume import newest_resume_checkpoint
from vlsafe.reliability.recipe_keys import RecipeKeyError, check_recipe_keys
from vlsafe.reliability.recipe_overlays import missing_base

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def expand_recipe_shorthand(argv: list[str]) -> list[str]:
    """`recipe.yaml ...` -> `fit --config recipe.yaml ...`; anything else is passed through."""
    if argv and argv[0].endswith((".yaml", ".yml")):
        return ["fit", "--config", argv[0], *argv[1:]]
    return argv


class VLSafeCLI(LightningCLI):
    """LightningCLI with vlsafe's base classes, so recipes choose any method/data module by class_path.

    Every run also gets what exact resume and preemption need (vlsafe.ops): RNG states in checkpoints, a
    checkpoint + SLURM requeue + clean exit on SIGUSR1/SIGTERM (configurable under `preemption:`, e.g.
    `--preemption.exit_code 143`), and atomic checkpoint writes (unless the recipe picks a checkpoint IO);
    and a NaN/Inf guard that skips non-finite steps and stops with a checkpoint when they persist
    (`nonfinite:`, e.g. `--nonfinite.max_consecutive 10`).
    """

    def __init__(self, args: list[str] | None = None, **kwargs):
        super().__init__(MethodModule, ShardDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         save_config_kwargs={"overwrite": True}, args=args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # Lightning's "forced callbacks": always added, configurable under their own key.
        for key, callback in FORCED_CALLBACKS.items():
            parser.add_lightning_class_args(callback, key)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer)
        trainer.callbacks.append(CheckpointGuard())  # method recorded at save, checked at resume; folders writable
        return trainer

    def before_fit(self) -> None:
        """`--ckpt_path hpc|last` and a requeued SLURM job resume from the newest state by global step."""
        config = self.config_init["fit"]
        config["ckpt_path"] = newest_resume_checkpoint(self.trainer, config.get("ckpt_path"))

    def _parse_ckpt_path(self) -> None:
        """With `--ckpt_path`, the model is rebuilt from the checkpoint's hyperparameters.

        vlsafe stores hyperparameters as plain data (the builder's class_path/init_args, LoRA and optimiser
        settings), so they slot under the recipe's model class; the checkpoint wins over the recipe. The file
        or URL is read with `weights_only=True` (`checkpoint_guard.read_checkpoint`); a checkpoint of another
        method or model is refused, and recipe settings the checkpoint overrides are reported.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if self.config[subcommand].get("weights_only") is False:
            raise CheckpointLoadError(f"{ckpt_path}: --weights_only false is refused: vlsafe never unpickles code "
                                      f"from a checkpoint")
        self.config[subcommand]["weights_only"] = True  # also for a recipe's own checkpoint IO or strategy
        if not ckpt_path or not (is_remote(ckpt_path) or Path(str(ckpt_path)).is_file()):
            return
        checkpoint = read_checkpoint(ckpt_path)
        hparams = checkpoint.get("hyper_parameters") or {}
        if "vlm" not in hparams and "model" not in hparams:  # "model": text-only modules (vlsafe.methods.protector)
            return super()._parse_ckpt_path() if not is_remote(ckpt_path) else None
        class_path = self.config[subcommand]["model"]["class_path"]
        recipe_hparams = self.config[subcommand]["model"].get("init_args") or {}
        report_ignored(ckpt_path, check_resume(checkpoint, ckpt_path, class_path, recipe_hparams, subcommand))
        update = {subcommand: {"model": {"class_path": class_path, "init_args": dict(hparams)}}}
        self.config = self.parser.parse_object(update, self.config)


def check_recipes(argv: list[str]) -> None:
    """Name every unknown key of every `--config`/`-c` file at once, with the closest valid key, before parsing;
    and an overlay recipe given without its base (vlsafe.reliability.recipe_overlays), with the command to run.

    jsonargparse would stop at the first one with a long type explanation; a typo in a recipe should cost
    one glance.
    """
    configs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--config", "-c")]
    configs += [arg.split("=", 1)[1] for arg in argv if arg.startswith(("--config=", "-c="))]
    for path in configs:
        if Path(path).is_file():
            try:
                check_recipe_keys(path, raise_error=True)
            except RecipeKeyError as err:
                print(f"error: {err}", file=sys.stderr)
                raise SystemExit(2) from None
    problem = missing_base(configs)  # an overlay alone would fail with jsonargparse's long type explanation
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    argv = expand_recipe_shorthand(list(sys.argv[1:] if argv is None else argv))
    check_recipes(argv)
    VLSafeCLI(args=argv)


if __name__ == "__main__":
    main()
