"""Training checkpoints of any strategy -> one consolidated VLM state dict (and from there an HF folder).

Formats, detected from what is on disk:
- `lightning`: one file (`.ckpt`) from DDP / single device / `save_distributed_checkpoint=False`;
- `dcp`: a torch distributed-checkpoint folder (`.metadata`, `*.distcp`, Lightning's `meta.pt`) written
  by `vlsafe.scale.FSDP2` / `ModelParallelStrategy` (weights under `state_dict.`) or by Lightning's
  FSDP with `state_dict_type: sharded` (weights under `model.`);
- `deepspeed`: a ZeRO-2/3 folder (`latest` + `<tag>/*_model_states.pt`, `*_optim_states.pt`), merged by
  DeepSpeed's own `zero_to_fp32`.

Everything loads with `torch.load(weights_only=True)` or DCP's tensor reader; DeepSpeed's files pickle a
few DeepSpeed enums, which are allow-listed by name instead of unpickling arbitrary objects.
The model is rebuilt from the checkpoint's own hyperparameters (the builder config vlsafe stores), LoRA
included, and every checkpoint key must land in it and vice versa.
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch

from vlsafe.builders import VLMBuilder
from vlsafe.core.lora import LoraSettings, apply_lora, is_peft
from vlsafe.core.vlm import VLM

FORMATS = ("lightning", "dcp", "deepspeed")
_DCP_PREFIXES = ("state_dict.", "model.")  # ModelParallelStrategy / Lightning FSDP (sharded)
_WRAPPER_PREFIX = "_forward_module."       # Lightning < 2.1 DeepSpeed wrapper


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the path and what is wrong."""


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_file():
        return "lightning"
    if not path.is_dir():
        raise ConversionError(f"{path}: no such checkpoint file or folder")
    if (path / ".metadata").is_file():
        return "dcp"
    if (path / "latest").is_file() or any(path.glob("*/*_model_states.pt")) or any(path.glob("*_model_states.pt")):
        return "deepspeed"
    raise ConversionError(f"{path}: a folder that is neither a distributed checkpoint (.metadata) nor a DeepSpeed "
                          "ZeRO checkpoint (latest, <tag>/*_model_states.pt)")


# ---------------------------------------------------------------------------------------------- safe loading
def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed pickles into its checkpoint files (enums and plain containers)."""
    import argparse
    import collections

    found: list[Any] = [collections.OrderedDict, argparse.Namespace]
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum
        found.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        found += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address
        found.append(fragment_address)
    return found


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Make third-party code's `torch.load(..., weights_only=False)` load with `weights_only=True`.

    DeepSpeed's `zero_to_fp32` asks for full unpickling; here it gets tensors, containers and the
    allow-listed DeepSpeed enums only, so a tampered checkpoint fails instead of running code.
    """
    original = torch.load

    def safe_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise ConversionError(f"{f}: refused to unpickle ({_unpickling_reason(e)}); only tensors, containers and "
                                  "DeepSpeed's own enums are loaded from DeepSpeed checkpoints") from e

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


def _unpickling_reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if "Unsupported global" in line]
    return lines[0].split(" was not")[0] if lines else str(error).splitlines()[0]


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file means the same to the user
        raise ConversionError(f"{path}: cannot be read as a weights-only torch checkpoint ({e.__class__.__name__}: "
                              f"{_unpickling_reason(e)})") from e


# ---------------------------------------------------------------------------------------------- hyperparameters
def _deepspeed_tag_dir(path: Path, tag: str | None) -> Path:
    if tag is None:
        latest = path / "latest"
        if not latest.is_file():
            raise ConversionError(f"{path}: no 'latest' file; pass the tag (the sub-folder name) explicitly")
        tag = latest.read_text().strip()
    folder = path / tag
    if not folder.is_dir():
        raise ConversionError(f"{path}: tag folder {tag!r} does not exist")
    return folder


def read_hparams(path: str | Path, fmt: str | None = None, tag: str | None = None) -> dict[str, Any]:
    """The module hyperparameters stored with the checkpoint (must include vlsafe's `vlm` builder config)."""
    hparams = read_meta(path, fmt, tag).get("hyper_parameters") or {}
    if "vlm" not in hparams:
        raise ConversionError(f"{path}: not a vlsafe checkpoint (no 'vlm' builder in its hyper_parameters)")
    return hparams


def read_meta(path: str | Path, fmt: str | None = None, tag: str | None = None) -> dict[str, Any]:
    """The checkpoint's non-weight record (hyper_parameters, epoch, global_step, the method vlsafe recorded);
    for a single-file checkpoint the whole file, memory-mapped."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt == "lightning":
        meta = _load(path)
    elif fmt == "dcp":
        if not (path / "meta.pt").is_file():
            raise ConversionError(f"{path}: distributed checkpoint without Lightning's meta.pt (hyperparameters)")
        meta = _load(path / "meta.pt")
    else:
        folder = _deepspeed_tag_dir(path, tag)
        files = sorted(folder.glob("*mp_rank_00_model_states.pt"))
        if not files:
            raise ConversionError(f"{folder}: no *mp_rank_00_model_states.pt file")
        with weights_only_torch_load():
            meta = torch.load(files[-1], map_location="cpu")
    return meta


def build_core(hparams: dict[str, Any]) -> tuple[VLM, Any]:
    """Rebuild the VLM (with its LoRA adapter, if it trained one) and its processor from hyperparameters."""

    vlm, processor = VLMBuilder.from_config(hparams["vlm"]).build()
    if hparams.get("lora"):
        apply_lora(vlm, LoraSettings(**hparams["lora"]))
    return vlm.eval(), processor


# ---------------------------------------------------------------------------------------------- weights
def _strict(path: Path, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise ConversionError(f"{path}: weights do not match the model rebuilt from its hyperparameters "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")


def _vlm_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("vlm."):]: v for k, v in state.items() if k.startswith("vlm.")}


def _load_dcp(vlm: VLM, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    stored = set(metadata.state_dict_metadata)
    prefix = next((p for p in _DCP_PREFIXES if any(k.startswith(p + "vlm.") for k in stored)), None)
    if prefix is None:
        raise ConversionError(f"{path}: no vlm.* weights under {_DCP_PREFIXES} in this distributed checkpoint")
    target = {f"vlm.{k}": v for k, v in vlm.state_dict().items()}
    stored_vlm = {k[len(prefix):] for k in stored if k.startswith(prefix + "vlm.")}
    _strict(path, sorted(set(target) - stored_vlm), sorted(stored_vlm - set(target)))
    # DCP reads each tensor straight into the model's own storage (single process, no process group).
    dcp.load({prefix.rstrip("."): target}, checkpoint_id=str(path))


def _load_deepspeed(vlm: VLM, path: Path, tag: str | None) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_torch_load():
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    state = {k.removeprefix(_WRAPPER_PREFIX): v for k, v in state.items()}
    _load_into(vlm, _vlm_keys(state), path)


def _load_into(vlm: VLM, state: dict[str, torch.Tensor], path: Path) -> None:
    missing, unexpected = vlm.load_state_dict(state, strict=False)
    _strict(path, list(missing), list(unexpected))


def load_vlm(path: str | Path, fmt: str | None = None, tag: str | None = None) -> tuple[VLM, Any, dict[str, Any]]:
    """(VLM with the checkpoint's weights, processor, hyperparameters) from any supported checkpoint."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ConversionError(f"unknown checkpoint format {fmt!r}; use one of {FORMATS}")
    hparams = read_hparams(path, fmt, tag)
    vlm, processor = build_core(hparams)
    if fmt == "lightning":
        _load_into(vlm, _vlm_keys(_load(path)["state_dict"]), path)
    elif fmt == "dcp":
        _load_dcp(vlm, path)
    else:
        _load_deepspeed(vlm, path, tag)
    return vlm.eval(), processor, hparams


def consolidated_state_dict(vlm: VLM) -> dict[str, torch.Tensor]:
    """`vlm.*` tensors, contiguous and unshared, ready for safetensors."""
    return {f"vlm.{k}": v.detach().cpu().contiguous().clone() for k, v in vlm.state_dict().items()}


# ---------------------------------------------------------------------------------------------- LoRA adapter
def save_llava_adapter(vlm: VLM, out_dir: str | Path) -> Path:
    """Write the LLM's LoRA adapter as a peft adapter for the exported `LlavaForConditionalGeneration`.

    Keys and target modules are moved from the standalone causal LM (`model.layers...`) to where the LLM
    lives inside transformers' LLaVA (`model.language_model.layers...`), and targeting is restricted to
    the language model so the CLIP tower's same-named projections are never touched.
    """
    import json

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file


    llm = vlm.llm
    if not is_peft(llm):
        raise ConversionError("the model has no LoRA adapter to save")
    config = llm.peft_config["default"]
    if config.modules_to_save:
        raise ConversionError(f"LoRA modules_to_save={sorted(config.modules_to_save)} cannot be expressed as an "
                              "adapter for LlavaForConditionalGeneration; export with the adapter merged")
    state = get_peft_model_state_dict(llm)
    renamed = {}
    for key, value in state.items():
        if not key.startswith("base_model.model.model."):
            raise ConversionError(f"unexpected LoRA weight {key!r} outside the decoder (only decoder LoRA exports)")
        renamed["base_model.model.model.language_model." + key[len("base_model.model.model."):]] = \
            value.detach().cpu().contiguous()
    if isinstance(config.target_modules, str):
        raise ConversionError(f"LoRA target_modules={config.target_modules!r} is a pattern; export with the adapter merged")
    names = sorted({name.rsplit(".", 1)[-1] for name in config.target_modules})  # peft may store full paths
    settings = config.to_dict()
    settings.update(target_modules=rf".*language_model.*\.({'|'.join(names)})", base_model_name_or_path=None,
                    task_type=None)
    settings = {k: (sorted(v) if isinstance(v, set) else v) for k, v in settings.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(renamed, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(settings, indent=2, default=str))
    return out


def without_lora(vlm: VLM) -> VLM:
    """A copy of `vlm` whose LLM is the base model with the adapter removed, not merged."""
    import copy


    if not is_peft(vlm.llm):
        return vlm
    llm = vlm.llm
    vlm.llm = None
    try:
        plain = copy.deepcopy(vlm)
    finally:
        vlm.llm = llm
    plain.llm = copy.deepcopy(llm).unload()
    return plain
