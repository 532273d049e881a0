"""Load a trained harm detector / detoxifier: a vlsafe training checkpoint or a standalone (merged) HF folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlsafe.methods.protector.builders import ensure_pad_token, resolve_dtype
from vlsafe.methods.protector.presets import LEGACY_PRESET, get_preset
from vlsafe.ops.checkpoint_guard import read_checkpoint

#: written next to a merged model by tools/merge_adapter.py: the preset (and prompt) it was trained with
SETTINGS_FILE = "vlsafe_protector.json"


def load_text_module(path: str | Path, module_class: type) -> Any:
    """Rebuild `module_class` (HarmDetectorModule / DetoxifierModule) from a vlsafe `.ckpt`.

    Hyperparameters are plain data (`torch.load(weights_only=True)`); they are the constructor arguments.
    """

    checkpoint = read_checkpoint(path)  # torch.load(weights_only=True); bad files raise a named error
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "model" not in hparams:
        raise ValueError(f"{path} is not a vlsafe text-model checkpoint (no 'model' hyperparameters)")
    for key in [k for k in hparams if k.startswith("_")]:  # LightningCLI bookkeeping
        hparams.pop(key)
    hparams.setdefault("preset", LEGACY_PRESET)  # checkpoints from before presets were trained on vlsafe's format
    module = module_class(**hparams)
    missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    missing = [k for k in missing if "metrics" not in k and "category_counts" not in k and "means" not in k]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the rebuilt {module_class.__name__} (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return module.eval()


def load_hf_folder(path: str | Path, head: str, torch_dtype: str | None = None) -> tuple[torch.nn.Module, Any]:
    """A standalone model folder (e.g. written by tools/merge_adapter.py): safetensors weights + tokenizer."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

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


def recorded_settings(path: str | Path) -> dict[str, Any]:
    """What tools/merge_adapter.py recorded about a merged model ({} for other folders, e.g. released weights)."""
    import json

    file = Path(path) / SETTINGS_FILE
    if not file.is_file():
        return {}
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: malformed JSON at line {err.lineno} ({err.msg})") from None
    if not isinstance(settings, dict) or "preset" not in settings:
        raise ValueError(f"{file}: expected a JSON object with a 'preset'")
    get_preset(settings["preset"])  # an unknown name is an error here, not a silent default
    return settings


def recorded_preset(path: str | Path) -> str | None:
    return recorded_settings(path).get("preset")
