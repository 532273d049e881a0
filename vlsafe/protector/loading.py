"""Load a trained harm detector / detoxifier: a vlsafe training checkpoint or a standalone (merged) HF folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlsafe.protector.builders import ensure_pad_token, resolve_dtype


def load_text_module(path: str | Path, module_class: type) -> Any:
    """Rebuild `module_class` (HarmDetectorModule / DetoxifierModule) from a vlsafe `.ckpt`.

    Hyperparameters are plain data (`torch.load(weights_only=True)`); they are the constructor arguments.
    """
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "model" not in hparams:
        raise ValueError(f"{path} is not a vlsafe text-model checkpoint (no 'model' hyperparameters)")
    for key in [k for k in hparams if k.startswith("_")]:  # LightningCLI bookkeeping
        hparams.pop(key)
    module = module_class(**hparams)
    missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    missing = [k for k in missing if "metrics" not in k and "category_counts" not in k and "means" not in k]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the rebuilt {module_class.__name__} (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return module.eval()


def load_hf_folder(path: str | Path, head: str, torch_dtype: str | None = None) -> tuple[torch.nn.Module, Any]:
    """A standalone model folder (e.g. written by tools/merge_adapter.py): safetensors weights + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if torch_dtype:
        kwargs["dtype"] = resolve_dtype(torch_dtype)
    if head == "classifier":
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    ensure_pad_token(tokenizer, model)
    return model.eval(), tokenizer
