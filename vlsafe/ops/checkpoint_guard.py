"""Refuse checkpoints that do not belong to the run (reading itself is `checkpoint_read.read_checkpoint`,
re-exported here: `torch.load(weights_only=True)` only; the CLI forces `weights_only=True` for any other
checkpoint IO or strategy).

A checkpoint also carries the method that wrote it (`CheckpointGuard` records it at every save). Resuming
continues that run: its optimizer, schedule and data position come with the weights, and the CLI rebuilds
the model from the checkpoint's hyperparameters. So a checkpoint of another method or model is refused
with the differences named (start from its weights with `FromCheckpoint` instead), and recipe or
command-line settings that a resume cannot apply (optimizer, generation) are reported, never dropped
silently.
"""
from __future__ import annotations

from typing import Any

import lightning as L

from vlsafe.moved import current_class_path, current_class_paths
from vlsafe.ops.checkpoint_io import check_writable
from vlsafe.ops.checkpoint_read import (
    SAFE_GLOBALS,
    CheckpointLoadError,
    is_remote,
    read_checkpoint,
)

__all__ = ["SAFE_GLOBALS", "CheckpointLoadError", "CheckpointMismatchError", "CheckpointGuard", "check_resume",
           "is_remote", "read_checkpoint", "resume_differences", "report_ignored"]

METHOD_KEY = "vlsafe_method"
# Settings a resume restores from the checkpoint (optimizer/scheduler state, generation defaults): a
# different value in the recipe or on the command line is reported as ignored, not refused.
RESUME_RESTORES = ("optim", "generation", "gradient_checkpointing")
MAX_SHOWN = 24  # differences listed in a refusal (a method change lists every argument of the other method)
MODEL_KEYS = ("vlm", "lora", "model")  # "model": the text-only modules of vlsafe.methods.protector

class CheckpointMismatchError(ValueError):
    """A checkpoint was written by another method or model than the recipe's; names each difference."""


# ------------------------------------------------------------------------------------- which run
def class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def resume_differences(checkpoint_hparams: dict[str, Any], recipe_hparams: dict[str, Any]
                       ) -> tuple[list[str], list[str]]:
    """(method/model differences, settings a resume ignores) between a checkpoint and the recipe.

    A top-level key on one side only means another method, unless its value there is None: an argument a
    newer vlsafe added (or an older one dropped) at its default, so checkpoints of earlier versions still
    resume. A recipe value of None for a settings group (`optim: null`) means "the defaults" and is not
    compared; `vlm`/`lora` are always compared.
    """
    ckpt, recipe = _plain(checkpoint_hparams), _plain(recipe_hparams)  # dict(Namespace) would flatten keys
    ckpt.pop("_instantiator", None)
    recipe.pop("_instantiator", None)
    method: list[str] = []
    ignored: list[str] = []
    for key in sorted(set(ckpt) ^ set(recipe)):
        side = "the checkpoint" if key in ckpt else "the recipe"
        if (ckpt if key in ckpt else recipe)[key] is None:
            continue
        method.append(f"{key}: only {side} has it")
    for key in sorted(set(ckpt) & set(recipe)):
        if recipe[key] is None and key not in MODEL_KEYS:
            continue
        theirs, ours = _flatten(ckpt[key], key), _flatten(recipe[key], key)
        for name in sorted(set(theirs) | set(ours)):
            if theirs.get(name, "<absent>") != ours.get(name, "<absent>"):
                mine, saved = ours.get(name, "<absent>"), theirs.get(name, "<absent>")
                line = f"{name}: {mine!r} (recipe/CLI) vs {saved!r} (checkpoint)"
                (ignored if key in RESUME_RESTORES else method).append(line)
    return method, ignored


def check_resume(checkpoint: dict[str, Any], path: Any, recipe_class: str, recipe_hparams: dict[str, Any],
                 stage: str = "fit") -> list[str]:
    """Refuse (`CheckpointMismatchError`) a checkpoint of another method or model; return the ignored settings.

    `fit` resumes the run, so any method/model difference is refused; validate/test/predict only evaluate
    the checkpoint's model, so there only another method class is refused and the rest is reported.
    """
    # checkpoints written before the layout redesign name classes by their old paths
    written_by = checkpoint.get(METHOD_KEY)
    written_by = current_class_path(written_by) if isinstance(written_by, str) else written_by
    hparams = current_class_paths(checkpoint.get("hyper_parameters"))
    # without hyperparameters (a sharded checkpoint's shards, a foreign file) only the class can be compared
    method, ignored = resume_differences(hparams, recipe_hparams) if hparams else ([], [])
    wrong_class = written_by is not None and written_by != recipe_class
    if wrong_class or (stage == "fit" and method):
        who = f"was written by {written_by}" if wrong_class else "has other method/model hyperparameters"
        lines = ([f"method: {recipe_class} (recipe/CLI) vs {written_by} (checkpoint)"] if wrong_class else []) + method
        raise CheckpointMismatchError(
            f"{path} {who}, not by this recipe's {recipe_class} with its settings:\n  " + "\n  ".join(lines[:MAX_SHOWN])
            + ("\n  ..." if len(lines) > MAX_SHOWN else "")
            + f"\n--ckpt_path continues the run that wrote the checkpoint (its optimizer, schedule and data position "
              f"come with it). To start this recipe from its weights, drop --ckpt_path and set "
              f"model.init_args.vlm to "
              f"{{class_path: vlsafe.builders.FromCheckpoint, init_args: {{path: {path}}}}}")
    return ignored if stage == "fit" else ignored + method


def report_ignored(path: Any, ignored: list[str]) -> None:
    """Warn (rank zero) about each recipe/command-line setting the resumed checkpoint overrides."""
    if ignored:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"vlsafe: resuming from {path}: the checkpoint's values are used and these settings of the "
                       f"recipe/command line are IGNORED:\n  " + "\n  ".join(ignored)
                       + "\nTo train with new settings from these weights, start a new run with "
                         "model.init_args.vlm = FromCheckpoint(path) instead of --ckpt_path.")


class CheckpointGuard(L.Callback):
    """Records the method class in every checkpoint, checks a resumed one (also `last`/`hpc`) and checks at
    fit start, before step 1, that every checkpoint folder is writable."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[METHOD_KEY] = class_path(pl_module)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        path = trainer.ckpt_path
        report_ignored(path, check_resume(checkpoint, path, class_path(pl_module), dict(pl_module.hparams)))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folders = [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        check_writable([*folders, trainer.default_root_dir])
