"""Load the model an evaluation runs on: a vlsafe checkpoint of any method, or a LLaVA folder.

vlsafe checkpoints hold plain data (the builder's class_path/init_args, LoRA and optimiser settings) and
load with `torch.load(weights_only=True)` (`vlsafe.ops.checkpoint_guard.read_checkpoint`, which names a
bad file), as `vlsafe/cli.py` relies on. A checkpoint does not record
which method module wrote it, and evaluation only needs the core (vision tower, projector, LLM) plus
`generate_batch`, so by default the core is rebuilt through `FromCheckpoint` (LoRA merged) inside an
`SFTModule`. Modules with extra parts (detection heads, ...) are rebuilt whole with `model_class`,
exactly like `tools/fit.py --ckpt_path` does: the checkpoint's hyperparameters go to that class.
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch

from vlsafe.builders import FromCheckpoint, LlavaHF, LlavaOriginal, resolve_dtype
from vlsafe.data.encoding.templates import get_template
from vlsafe.methods.base import VLMModule
from vlsafe.methods.sft import SFTModule
from vlsafe.moved import import_vlsafe_class
from vlsafe.ops.checkpoint_guard import read_checkpoint

log = logging.getLogger(__name__)

MODEL_TYPES = ("ckpt", "llava-hf", "llava-original")


def resolve_module_class(class_path: str) -> type:
    """A vlsafe `VLMModule` subclass by dotted path; anything else is refused (no arbitrary imports)."""
    return import_vlsafe_class(class_path, VLMModule, "model class")


def _accepted_arguments(cls: type) -> set[str] | None:
    """Constructor keywords `cls` accepts, following `**kwargs` up the MRO; None = anything."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
        if klass.__module__.startswith("lightning."):
            return None
    return names


def checkpoint_hparams(path: str | Path, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain-data hyperparameters of a vlsafe checkpoint (read with `weights_only=True`)."""
    if checkpoint is None:
        checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if "vlm" not in hparams:
        raise ValueError(f"{path} is not a vlsafe checkpoint (no 'vlm' hyperparameters)")
    return dict(hparams)


def load_module(path: str | Path, *, model_type: str = "ckpt", model_class: str | None = None,
                template: str | None = None, device: str | torch.device = "cpu", dtype: str | None = None):
    """A frozen vlsafe LightningModule in eval mode, ready for `generate_batch`.

    - `model_type="ckpt"` (a vlsafe checkpoint): without `model_class`, the core is rebuilt with
      `FromCheckpoint` (LoRA merged) inside an `SFTModule`; with `model_class` (e.g.
      `vlsafe.methods.preference.module.PreferenceModule`), that class is built from the checkpoint's
      hyperparameters (those it does not accept are dropped, with a log line) and its whole state dict
      is loaded strictly.
    - `model_type="llava-hf"` / `"llava-original"`: a LLaVA folder through `LlavaHF` / `LlavaOriginal`.

    `template` overrides the chat template the builder chose; `dtype` (bf16, fp16, fp32) casts after loading.
    """

    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model type {model_type!r}; choose one of {MODEL_TYPES}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist")
    try:
        module = _build(path, model_type, model_class)
    except RuntimeError as err:  # e.g. torch's size mismatch when a chained FromCheckpoint file changed
        detail = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])
        raise ValueError(f"{path}: cannot rebuild the model: {detail} ... (a checkpoint whose builder is "
                         f"FromCheckpoint needs the checkpoint it names, unchanged)") from err
    if template:
        module.processor.template = get_template(template)
    torch_dtype = resolve_dtype(dtype)
    module = module.to(device=device, dtype=torch_dtype) if torch_dtype is not None else module.to(device)
    return module.eval().requires_grad_(False)


def _build(path: Path, model_type: str, model_class: str | None):

    if model_type == "ckpt" and model_class:
        cls = resolve_module_class(model_class)
        checkpoint = read_checkpoint(path)
        hparams = checkpoint_hparams(path, checkpoint)
        accepted = _accepted_arguments(cls)
        dropped = sorted(k for k in hparams if accepted is not None and k not in accepted)
        if dropped:
            log.info("%s: hyperparameters not used by %s: %s", path, model_class, dropped)
        module = cls(**{k: v for k, v in hparams.items() if k not in dropped})
        missing, unexpected = module.load_state_dict(checkpoint.pop("state_dict"), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit {model_class} (missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}); is it the class that wrote this checkpoint?")
    else:
        builder = {"ckpt": FromCheckpoint, "llava-hf": LlavaHF, "llava-original": LlavaOriginal}[model_type]
        module = SFTModule(vlm=builder(str(path)))
    return module


def file_identity(path: str | Path) -> dict[str, Any]:
    """What identifies a model file or folder for answer caches: absolute path, size and mtime."""
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size if path.is_file() else None, "mtime_ns": stat.st_mtime_ns}


class LazyModule:
    """Stands in for the model and loads it on first use, so a fully cached re-run never loads it.

    Attribute access (and `isinstance` through `__class__`) is forwarded to the loaded module.
    """

    def __init__(self, loader, identity: Any = None):
        object.__setattr__(self, "_loader", loader)
        object.__setattr__(self, "_module", None)
        object.__setattr__(self, "eval_identity", identity)  # for answer caches; read without loading

    @property
    def loaded(self) -> bool:
        return object.__getattribute__(self, "_module") is not None

    def get(self):
        module = object.__getattribute__(self, "_module")
        if module is None:
            module = object.__getattribute__(self, "_loader")()
            object.__setattr__(self, "_module", module)
        return module

    @property
    def __class__(self):  # noqa: D105 - isinstance(lazy, SFTModule) is True once loaded
        return type(self.get())

    def __getattr__(self, name: str):
        return getattr(self.get(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.get(), name, value)

    def __call__(self, *args, **kwargs):
        return self.get()(*args, **kwargs)
