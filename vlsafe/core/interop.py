"""LLaVA-1.5 checkpoint import/export: transformers' `LlavaForConditionalGeneration` folders and the
original haotian-liu/LLaVA layout, both mapped onto `VLM(VisionTower, projector, LLM)`.

Weights are read with safetensors or `torch.load(weights_only=True)` and renamed by ordered prefix
rules; every key must land somewhere, so a truncated or foreign checkpoint fails loudly with the file
and key names instead of leaving random weights behind.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .projector import build_projector, projector_kind
from .streaming import empty_parameters
from .vision import VisionTower, read_image_stats
from .vlm import VLM

Rules = Sequence[tuple[str, str]]

# Checked in order, first match wins, so longer prefixes come first.
LLAVA_HF_RULES: Rules = (
    ("model.vision_tower.vision_model.", "vision."),   # transformers 4.52-4.x
    ("model.vision_tower.", "vision."),                # transformers 5 in-memory names
    ("vision_tower.vision_model.", "vision."),         # llava-hf Hub checkpoints (transformers < 4.52)
    ("vision_tower.", "vision."),                      # transformers 5 save_pretrained
    ("model.multi_modal_projector.linear_1.", "projector.0."),
    ("model.multi_modal_projector.linear_2.", "projector.2."),
    ("multi_modal_projector.linear_1.", "projector.0."),
    ("multi_modal_projector.linear_2.", "projector.2."),
    ("model.language_model.", "llm.model."),
    ("language_model.model.", "llm.model."),
    ("language_model.lm_head.", "llm.lm_head."),
    ("lm_head.", "llm.lm_head."),
)
LLAVA_ORIGINAL_RULES: Rules = (
    ("model.vision_tower.vision_tower.vision_model.", "vision."),
    ("model.mm_projector.", "projector."),
    ("model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
)
# Buffers that old checkpoints persisted and current modules recompute.
_DROPPED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
# Keys of an original LLaVA config.json that are training options, not LLM config.
_LLAVA_ONLY_PREFIXES = ("mm_", "tune_", "freeze_", "unfreeze_")
_LLAVA_ONLY_KEYS = ("image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length",
                    "tokenizer_padding_side", "use_mm_proj", "vision_tower", "architectures", "model_type",
                    "transformers_version", "_name_or_path")


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete, inconsistent or uses an unsupported LLaVA variant."""


# ---------------------------------------------------------------------------------------------- reading
def _weight_files(folder: Path) -> list[Path]:
    """Weight files in preference order: safetensors (index, then files), then .bin (index, then files)."""
    from .streaming import StreamedLoadError, checkpoint_files
    try:
        return checkpoint_files(folder)
    except StreamedLoadError as e:
        raise CheckpointError(str(e)) from e


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: listed in the shard index but missing")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_state_dict(folder: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a checkpoint folder (never unpickles code) and a description of the source files."""
    folder = Path(folder)
    files = _weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        shard = _load_file(path)
        clash = state.keys() & shard.keys()
        if clash:
            raise CheckpointError(f"{path}: keys also present in another shard: {sorted(clash)[:5]}")
        state.update(shard)
    source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    return state, source


def _remap(state_dict: Mapping[str, torch.Tensor], rules: Rules) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename keys by the first matching prefix rule; return (renamed, keys no rule matched)."""
    renamed: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for key, value in state_dict.items():
        if key.endswith(_DROPPED_SUFFIXES):
            continue
        for src, dst in rules:
            if key.startswith(src):
                renamed[dst + key[len(src):]] = value
                break
        else:
            unmatched.append(key)
    return renamed, unmatched


def _take(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _short(keys: Iterable[str], n: int = 10) -> str:
    keys = sorted(keys)
    return f"{keys[:n]}{f' (+{len(keys) - n} more)' if len(keys) > n else ''}"


def _load_module(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, source: str,
                 allow_missing: Iterable[str] = ()) -> list[str]:
    """`load_state_dict` that names the file and keys on any mismatch; returns the allowed missing keys."""
    try:
        missing, unexpected = module.load_state_dict(dict(state), strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{source}: {what} weights do not fit the model built from config.json: {e}") from e
    bad_missing = set(missing) - set(allow_missing)
    if bad_missing or unexpected:
        raise CheckpointError(f"{source}: {what} weights do not match the config: missing {_short(bad_missing)}, "
                              f"unexpected {_short(unexpected)}")
    return list(missing)


# ---------------------------------------------------------------------------------------------- building
def _build_llm(text_config: Any, state: Mapping[str, torch.Tensor], source: str,
               dtype: torch.dtype | None, tie: bool) -> nn.Module:
    """CausalLM from its config with checkpoint weights; ties lm_head to the embeddings when the
    checkpoint omits it and the config says the two are shared."""
    from transformers import AutoModelForCausalLM
    llm = AutoModelForCausalLM.from_config(text_config, dtype=dtype or torch.float32)
    missing = _load_module(llm, state, "language-model", source,
                           allow_missing=("lm_head.weight",) if tie else ())
    if "lm_head.weight" in missing:
        llm.get_output_embeddings().weight = llm.get_input_embeddings().weight
        llm.config.tie_word_embeddings = True
    return llm


def _build_projector(kind: str, state: Mapping[str, torch.Tensor], vision_dim: int, llm_dim: int,
                     source: str) -> nn.Module:
    projector = build_projector(kind, vision_dim, llm_dim)
    _load_module(projector, state, f"{kind} projector", source)
    return projector


def _tower_from_hf(config: Any, state: Mapping[str, torch.Tensor], select_layer: int, source: str,
                   stats_folder: Path | None) -> VisionTower:
    mean, std = read_image_stats(stats_folder) if stats_folder is not None else (None, None)
    try:
        return VisionTower.from_hf_state_dict(config, state, select_layer, mean, std)
    except ValueError as e:
        raise CheckpointError(f"{source}: vision tower: {e}") from e


def _maybe_tokenizer(folder: Path) -> Any:
    """AutoTokenizer if the folder ships tokenizer files (no remote code), else None."""
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))


def _check_no_leftovers(unmatched: list[str], source: str, layout: str) -> None:
    if unmatched:
        raise CheckpointError(f"{source}: keys not recognised as {layout} weights: {_short(unmatched)}")


def _assemble(tower: VisionTower, projector: nn.Module, llm: nn.Module, dtype: torch.dtype | None) -> VLM:
    vlm = VLM(tower, projector, llm)
    if dtype is not None:
        vlm.to(dtype)
    return vlm.eval()


# ---------------------------------------------------------------------------------------------- HF layout
def _llava_hf_settings(config: Any, path: Path) -> int:
    """Validate the LlavaConfig features we implement; returns the vision select layer."""
    if config.model_type != "llava":
        raise CheckpointError(f"{path}: model_type={config.model_type!r}, expected 'llava' (LLaVA-1.5)")
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise CheckpointError(f"{path}: vision_feature_layer={layer!r}; only a single int layer is supported")
    if config.vision_feature_select_strategy != "default":
        raise CheckpointError(f"{path}: vision_feature_select_strategy={config.vision_feature_select_strategy!r}; "
                              "only 'default' (drop CLS) is supported")
    if config.projector_hidden_act != "gelu" or not getattr(config, "multimodal_projector_bias", True):
        raise CheckpointError(f"{path}: projector must be Linear-GELU-Linear with biases (LLaVA-1.5 mlp2x_gelu); "
                              f"got projector_hidden_act={config.projector_hidden_act!r}, "
                              f"multimodal_projector_bias={getattr(config, 'multimodal_projector_bias', None)}")
    return layer


def load_llava_hf(path: str | Path, torch_dtype: torch.dtype | None = None) -> tuple[VLM, Any]:
    """Load a transformers `LlavaForConditionalGeneration` folder (any key layout since transformers 4.4x).

    Returns the VLM in eval mode (float32 unless `torch_dtype`) and the folder's tokenizer or None.
    The HF image token id (`config.image_token_index`) is not used by `VLM`, which expects
    `IMAGE_TOKEN_INDEX` in input_ids.
    """
    from transformers import AutoConfig
    folder = Path(path)
    raw = json.loads((folder / "config.json").read_text())
    if "mm_vision_tower" in raw or "mm_projector_type" in raw:
        raise CheckpointError(f"{folder}: this is an original haotian-liu/LLaVA folder; use load_llava_original")
    config = AutoConfig.from_pretrained(str(folder))
    select_layer = _llava_hf_settings(config, folder)
    state, source = _read_state_dict(folder)
    renamed, unmatched = _remap(state, LLAVA_HF_RULES)
    _check_no_leftovers(unmatched, source, "LLaVA-HF")
    tower = _tower_from_hf(config.vision_config, _take(renamed, "vision."), select_layer, source, folder)
    text_config = config.text_config
    projector = _build_projector("mlp2x_gelu", _take(renamed, "projector."), tower.hidden_size,
                                 text_config.hidden_size, source)
    tie = bool(getattr(text_config, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
    llm = _build_llm(text_config, _take(renamed, "llm."), source, torch_dtype, tie)
    return _assemble(tower, projector, llm, torch_dtype), _maybe_tokenizer(folder)


# ---------------------------------------------------------------------------------------------- original layout
def _original_settings(raw: Mapping[str, Any], path: Path) -> tuple[str, int]:
    """Validate the mm_* options we implement; returns (projector kind, select layer)."""
    if "text_config" in raw or "vision_config" in raw:
        raise CheckpointError(f"{path}: this is a transformers LlavaForConditionalGeneration folder; "
                              "use load_llava_hf")
    if raw.get("mm_use_im_start_end"):
        raise CheckpointError(f"{path}: mm_use_im_start_end=True (<im_start>/<im_end> around images) "
                              "is not supported yet")
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise CheckpointError(f"{path}: mm_vision_select_feature={feature!r}; only 'patch' (drop CLS) is supported")
    if "mm_vision_select_layer" not in raw:
        raise CheckpointError(f"{path}: config.json has no mm_vision_select_layer (LLaVA-1.5 uses -2)")
    kind = raw.get("mm_projector_type", "linear")  # LLaVA's own default
    if kind not in ("linear", "mlp2x_gelu"):
        raise CheckpointError(f"{path}: mm_projector_type={kind!r}; supported: 'linear', 'mlp2x_gelu'")
    return kind, int(raw["mm_vision_select_layer"])


def _llama_config(raw: Mapping[str, Any]) -> Any:
    """`llava_llama` is unknown to AutoConfig: it is a Llama config plus mm_* fields, so drop those."""
    from transformers import LlamaConfig
    fields = {k: v for k, v in raw.items() if not k.startswith(_LLAVA_ONLY_PREFIXES) and k not in _LLAVA_ONLY_KEYS}
    return LlamaConfig(**fields)


def _resolve_vision_source(raw: Mapping[str, Any], vision_tower_path: str | Path | None, path: Path) -> Any:
    """Folder or loaded HF CLIP model for the tower: explicit path, local mm_vision_tower, then the Hub."""
    if vision_tower_path is not None:
        folder = Path(vision_tower_path)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"vision_tower_path={str(folder)!r} is not a folder with a CLIP config.json")
        return folder
    name = raw.get("mm_vision_tower") or raw.get("vision_tower")
    if name is None:
        raise CheckpointError(f"{path}: config.json names no mm_vision_tower; pass vision_tower_path=")
    if Path(name).is_dir():
        return Path(name)
    from transformers import CLIPVisionModel
    try:
        return CLIPVisionModel.from_pretrained(name)
    except Exception as e:  # offline, missing repo, bad path: all mean the same thing to the user
        raise CheckpointError(
            f"{path}: could not load the vision tower mm_vision_tower={name!r} ({e.__class__.__name__}: {e}); "
            "download it and pass vision_tower_path=<local CLIPVisionModel folder>") from e


def _original_tower(source: Any, tower_state: dict[str, torch.Tensor], select_layer: int,
                    weights_source: str) -> VisionTower:
    """Tower weights from the checkpoint if it saved them, else from the CLIP source."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    folder = source if isinstance(source, Path) else None
    if tower_state:
        config = CLIPVisionConfig.from_pretrained(str(folder)) if folder is not None else source.config
        return _tower_from_hf(config, tower_state, select_layer, weights_source, folder)
    model = CLIPVisionModel.from_pretrained(str(folder)) if folder is not None else source
    return _tower_from_hf(model.config, model.state_dict(), select_layer, str(folder or "CLIP tower"), folder)


def load_llava_original(path: str | Path, vision_tower_path: str | Path | None = None,
                        torch_dtype: torch.dtype | None = None) -> tuple[VLM, Any]:
    """Load a haotian-liu/LLaVA (`LlavaLlamaForCausalLM`) folder.

    Released LLaVA-1.5 folders do not include the CLIP tower: it comes from `vision_tower_path`, or from
    `mm_vision_tower` when that is a local folder (or reachable on the Hub). Returns the VLM in eval mode
    (float32 unless `torch_dtype`) and the folder's tokenizer or None.
    """
    folder = Path(path)
    raw = json.loads((folder / "config.json").read_text())
    kind, select_layer = _original_settings(raw, folder)
    text_config = _llama_config(raw)
    state, source = _read_state_dict(folder)
    renamed, unmatched = _remap(state, LLAVA_ORIGINAL_RULES)
    _check_no_leftovers(unmatched, source, "original LLaVA")
    vision_source = _resolve_vision_source(raw, vision_tower_path, folder)
    tower = _original_tower(vision_source, _take(renamed, "vision."), select_layer, source)
    mm_hidden = raw.get("mm_hidden_size", tower.hidden_size)
    if mm_hidden != tower.hidden_size:
        raise CheckpointError(f"{folder}: mm_hidden_size={mm_hidden} but the vision tower width is {tower.hidden_size}")
    projector = _build_projector(kind, _take(renamed, "projector."), tower.hidden_size, text_config.hidden_size,
                                 source)
    llm = _build_llm(text_config, _take(renamed, "llm."), source, torch_dtype,
                     bool(getattr(text_config, "tie_word_embeddings", False)))
    return _assemble(tower, projector, llm, torch_dtype), _maybe_tokenizer(folder)


# ---------------------------------------------------------------------------------------------- export
def _plain_llm(llm: nn.Module) -> nn.Module:
    """The CausalLM to export: LoRA adapters merged on a copy, so the live model keeps its adapters."""
    try:
        from peft import PeftModel
    except ImportError:
        return llm
    if isinstance(llm, PeftModel):
        return copy.deepcopy(llm).merge_and_unload()
    return llm


def _param_name(module: nn.Module, param: torch.Tensor) -> str:
    return next(name for name, p in module.named_parameters(remove_duplicate=False) if p is param)


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """New vocabulary rows = mean of the old ones (the HF LLaVA converter's choice, minus the noise)."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    return torch.cat([weight, weight.float().mean(0, keepdim=True).to(weight.dtype).expand(extra, -1)], dim=0)


def _llm_export_state(llm: nn.Module, rows: int) -> tuple[dict[str, torch.Tensor], bool]:
    """LLM weights with embedding/lm_head padded to `rows`; drops lm_head when tied (HF re-ties it)."""
    embed, head = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    tied = head is embed
    embed_name = _param_name(llm, embed)
    head_name = _param_name(llm, head) if not tied else None
    state = {k: v for k, v in llm.state_dict().items()}
    if tied:
        state = {k: v for k, v in state.items() if k == embed_name or v.data_ptr() != embed.data_ptr()}
    state[embed_name] = _pad_rows(state[embed_name], rows)
    if head_name is not None:
        state[head_name] = _pad_rows(state[head_name], rows)
    return state, tied


def _tokenizer_with_image_token(tokenizer: Any, image_token: str) -> tuple[Any, int | None]:
    """A copy of the tokenizer that knows `image_token`, and its id (None without a tokenizer)."""
    if tokenizer is None:
        return None, None
    tokenizer = copy.deepcopy(tokenizer)
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    return tokenizer, int(tokenizer.convert_tokens_to_ids(image_token))


IMAGE_PREPROCESS = ("crop", "pad", "resize")


def _image_processor(tower: VisionTower, image_preprocess: str) -> Any:
    """The transformers image processor for `image_preprocess`: "crop" (CLIP's shortest-edge resize and centre
    crop, the llava-hf default), "pad" (LLaVA's `expand2square` with the mean colour, then resize: vlsafe's
    `pad_to_square`) or "resize" (squash to a square, no crop: vlsafe's `pad_to_square=False`)."""
    from transformers import CLIPImageProcessor, LlavaImageProcessor
    size, stats = tower.image_size, {"image_mean": list(tower.image_mean), "image_std": list(tower.image_std)}
    if image_preprocess == "pad":
        return LlavaImageProcessor(do_pad=True, size={"shortest_edge": size},
                                   crop_size={"height": size, "width": size}, **stats)
    if image_preprocess == "resize":
        return CLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False,
                                  crop_size={"height": size, "width": size}, **stats)
    if image_preprocess == "crop":
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **stats)
    raise ValueError(f"image_preprocess must be one of {IMAGE_PREPROCESS}, got {image_preprocess!r}")


def _save_processor(tokenizer: Any, tower: VisionTower, image_token: str, out: Path, image_preprocess: str,
                    chat_template: str | None) -> None:
    """The image processor (+ a LlavaProcessor when there is a tokenizer) so AutoProcessor works."""
    from transformers import LlavaProcessor
    image_processor = _image_processor(tower, image_preprocess)
    if tokenizer is None:
        image_processor.save_pretrained(str(out))
        return
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=tower.patch_size,
                   vision_feature_select_strategy="default", image_token=image_token,
                   num_additional_image_tokens=1, chat_template=chat_template).save_pretrained(str(out))


def _adds_bos(tokenizer: Any) -> bool:
    """Whether `tokenizer(text)` (special tokens on, the transformers default) starts with the BOS id."""
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def _set_bos_behaviour(tokenizer: Any, add_bos: bool) -> None:
    """Make `tokenizer(text)` add the BOS exactly when the model was trained with one (the post-processor in
    tokenizer.json is rewritten only when it does otherwise)."""
    if _adds_bos(tokenizer) == add_bos:
        return
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError("export: the model was trained with a BOS token but the tokenizer has none")
    if not hasattr(type(tokenizer), "add_bos_token"):
        raise ValueError(f"export: cannot set the BOS behaviour of a {type(tokenizer).__name__} (needs a "
                         "transformers fast tokenizer)")
    tokenizer.add_bos_token = add_bos
    if _adds_bos(tokenizer) != add_bos:
        raise ValueError(f"export: setting add_bos_token={add_bos} did not change what the tokenizer adds")


def export_llava_hf(vlm: VLM, tokenizer: Any, out_dir: str | Path, image_token: str = "<image>", *,
                    chat_template: str | None = None, add_bos_token: bool | None = None,
                    image_preprocess: str = "crop", generation_config: dict[str, Any] | None = None) -> Path:
    """Write `vlm` as a `LlavaForConditionalGeneration` folder (safetensors, llava-hf key layout).

    The image token is added to a copy of the tokenizer if needed and embedding/lm_head rows are padded
    in the written weights only. Without a tokenizer the image token gets a new last row. LoRA adapters
    are merged. Requires an `mlp2x_gelu` projector: HF LLaVA has no single-linear variant.

    How the model is prompted travels with it when given: `chat_template` (Jinja) on the tokenizer and
    processor, `add_bos_token` (the tokenizer's own call adds a BOS iff True), `image_preprocess` ("crop",
    "pad" or "resize", see `_image_processor`) and `generation_config` (written as generation_config.json).
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import LlavaConfig
    if projector_kind(vlm.projector) != "mlp2x_gelu":
        raise ValueError("LLaVA-HF export needs an mlp2x_gelu projector; LlavaForConditionalGeneration has no "
                         "single-linear projector")
    tower = vlm.vision
    if not isinstance(tower, VisionTower):
        raise ValueError(f"LLaVA-HF export needs a VisionTower, got {tower.__class__.__name__}")
    vision_config = tower.hf_clip_config()  # raises early if the tower is not representable
    if image_preprocess not in IMAGE_PREPROCESS:
        raise ValueError(f"image_preprocess must be one of {IMAGE_PREPROCESS}, got {image_preprocess!r}")
    llm = _plain_llm(vlm.llm)
    vocab = llm.get_input_embeddings().weight.shape[0]
    tokenizer, image_token_index = _tokenizer_with_image_token(tokenizer, image_token)
    if tokenizer is not None:
        if add_bos_token is not None:
            _set_bos_behaviour(tokenizer, add_bos_token)
        if chat_template is not None:
            tokenizer.chat_template = chat_template
    if image_token_index is None:
        image_token_index = vocab
    rows = max(vocab, image_token_index + 1, len(tokenizer) if tokenizer is not None else 0)
    llm_state, tied = _llm_export_state(llm, rows)

    text_config = copy.deepcopy(llm.config)
    text_config.vocab_size = rows
    text_config.tie_word_embeddings = tied
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_index,
                         image_seq_length=tower.num_patches, vision_feature_layer=tower.select_layer,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         multimodal_projector_bias=True, tie_word_embeddings=tied)
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = llm.get_input_embeddings().weight.dtype

    state = {f"vision_tower.{k}": v for k, v in tower.hf_clip_state_dict().items()}
    state.update({f"multi_modal_projector.linear_{1 if k.startswith('0.') else 2}.{k[2:]}": v
                  for k, v in vlm.projector.state_dict().items()})
    state.update({f"language_model.{k}": v for k, v in llm_state.items()})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_torch_state_dict({k: v.detach().cpu() for k, v in state.items()}, out, metadata={"format": "pt"})
    if generation_config is not None:
        from transformers import GenerationConfig
        GenerationConfig(**generation_config).save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    try:
        _save_processor(tokenizer, tower, image_token, out, image_preprocess, chat_template)
    except (ImportError, TypeError, ValueError) as e:  # a convenience: the model folder is already complete
        warnings.warn(f"export_llava_hf: could not save an image processor ({e}); weights and config are saved")
    return out


# ---------------------------------------------------------------------------------------------- streamed (meta)
def _planned(shapes: Mapping[str, tuple[str, tuple[int, ...]]], plan: Mapping[str, tuple[str, list[str]]],
             prefix: str) -> dict[str, Any]:
    """`hf_clip_plan` output (names only) -> `TensorPlan`s with files and target shapes."""
    from .streaming import TensorPlan

    out = {}
    for name, (op, keys) in plan.items():
        parts = tuple((shapes[k][0], k) for k in keys)
        first = shapes[keys[0]][1]
        shape = ((sum(shapes[k][1][0] for k in keys), *first[1:]) if op == "cat0"
                 else tuple(reversed(first)) if op == "t" else first)
        out[prefix + name] = TensorPlan(parts, op, shape)
    return out


def tower_skeleton(config: Any, hf_keys: Mapping[str, str] | None,
                   shapes: Mapping[str, tuple[str, tuple[int, ...]]], select_layer: int, stats_folder: Path | None,
                   source: str) -> tuple[VisionTower, dict[str, Any]]:
    """The HF CLIP tower as `VisionTower.from_hf_state_dict` builds it, parameters on meta, and the plans that
    fill it. `hf_keys` maps CLIP-relative names (`encoder.layers.0...`) to checkpoint keys (None: shapes only,
    no plans). A missing `visual_projection` leaves open_clip's own random `proj` (unused by LLaVA features),
    as the eager load does."""
    from open_clip.model import _build_vision_tower

    from .vision import hf_clip_plan, open_clip_cfg_from_hf

    try:
        cfg, quick_gelu, embed_dim = open_clip_cfg_from_hf(config)
        names = hf_clip_plan(hf_keys.keys(), config.num_hidden_layers) if hf_keys is not None else None
    except ValueError as e:
        raise CheckpointError(f"{source}: vision tower: {e}") from e
    if names is not None and "proj" in names:
        embed_dim = shapes[hf_keys[names["proj"][1][0]]][1][0]
    with empty_parameters():
        visual = _build_vision_tower(embed_dim, cfg, quick_gelu=quick_gelu)
    if names is not None and "proj" not in names:
        width = visual.proj.shape[0]
        visual.proj = nn.Parameter(width ** -0.5 * torch.randn(tuple(visual.proj.shape)))
    mean, std = read_image_stats(stats_folder) if stats_folder is not None else (None, None)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    tower = VisionTower(visual, select_layer, mean or OPENAI_DATASET_MEAN, std or OPENAI_DATASET_STD, vision_cfg=cfg)
    if names is None:
        return tower, {}
    plan = {name: (op, [hf_keys[k] for k in keys]) for name, (op, keys) in names.items()}
    return tower, _planned(shapes, plan, "vision.visual.")


def llm_skeleton(text_config: Any, llm_keys: Iterable[str] | None, dtype: torch.dtype | None, tie: bool,
                 source: str) -> nn.Module:
    """The causal LM `_build_llm` makes, parameters on meta; tied to the embeddings when the checkpoint has no
    LM head and the config says they are shared (a missing head otherwise is an error)."""
    from transformers import AutoModelForCausalLM

    with empty_parameters():
        llm = AutoModelForCausalLM.from_config(text_config, dtype=dtype or torch.float32)
    llm.tie_weights()  # the meta context re-registers every parameter, which undoes the ties made inside it
    if llm_keys is not None and "lm_head.weight" not in set(llm_keys):
        if not tie:
            raise CheckpointError(f"{source}: language-model weights do not match the config: missing "
                                  f"['lm_head.weight'] and tie_word_embeddings is false")
        llm.get_output_embeddings().weight = llm.get_input_embeddings().weight
        llm.config.tie_word_embeddings = True
    return llm


def _checked(vlm: VLM, plans: Mapping[str, Any], description: str) -> Any:
    """The source for `vlm`, checked name by name and shape by shape before a byte is read."""
    from .streaming import StreamedLoadError, TensorSource

    source = TensorSource(plans, description)
    try:
        source.check_against(vlm)
    except StreamedLoadError as e:
        raise CheckpointError(str(e)) from e
    return source


def _skeleton_source(folder: Path, rules: Rules, layout: str) -> tuple[dict, dict[str, str], str]:
    from .streaming import StreamedLoadError, checkpoint_files, file_shapes

    try:
        files = checkpoint_files(folder)
        shapes = file_shapes(files)
    except StreamedLoadError as e:
        raise CheckpointError(str(e)) from e
    source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    renamed, unmatched = _remap({k: k for k in shapes}, rules)
    _check_no_leftovers(unmatched, source, layout)
    return shapes, renamed, source


def llava_hf_on_meta(path: str | Path, torch_dtype: torch.dtype | None = None, weights: bool = True
                     ) -> tuple[VLM, Any, Any]:
    """`load_llava_hf` without reading weights: the VLM with parameters on meta (buffers real), the
    `TensorSource` that `streaming.materialize` fills it from (None with `weights=False`: shapes only, from
    config.json alone), and the folder's tokenizer or None."""
    from transformers import AutoConfig
    folder = Path(path)
    raw = json.loads((folder / "config.json").read_text())
    if "mm_vision_tower" in raw or "mm_projector_type" in raw:
        raise CheckpointError(f"{folder}: this is an original haotian-liu/LLaVA folder; use load_llava_original")
    config = AutoConfig.from_pretrained(str(folder))
    select_layer = _llava_hf_settings(config, folder)
    shapes, renamed, source = (_skeleton_source(folder, LLAVA_HF_RULES, "LLaVA-HF") if weights
                               else ({}, {}, str(folder)))
    tower, plans = tower_skeleton(config.vision_config, _take(renamed, "vision.") if weights else None, shapes,
                                  select_layer, folder, source)
    text_config = config.text_config
    with empty_parameters():
        projector = build_projector("mlp2x_gelu", tower.hidden_size, text_config.hidden_size)
    tie = bool(getattr(text_config, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
    llm = llm_skeleton(text_config, _take(renamed, "llm.") if weights else None, torch_dtype, tie, source)
    plans.update(_copy_plans(shapes, renamed, ("projector.", "llm.")))
    vlm = _assemble(tower, projector, llm, torch_dtype)
    return vlm, _checked(vlm, plans, source) if weights else None, _maybe_tokenizer(folder)


def _copy_plans(shapes: Mapping[str, tuple[str, tuple[int, ...]]], renamed: Mapping[str, str],
                prefixes: Sequence[str]) -> dict[str, Any]:
    """One-to-one plans for the renamed keys under `prefixes` (projector and LLM: no conversion needed)."""
    from .streaming import remapped_plans
    return remapped_plans(shapes, {k: v for k, v in renamed.items() if k.startswith(tuple(prefixes))})


def llava_original_on_meta(path: str | Path, vision_tower_path: str | Path | None = None,
                           torch_dtype: torch.dtype | None = None, weights: bool = True) -> tuple[VLM, Any, Any]:
    """`load_llava_original` without reading weights (see `llava_hf_on_meta`). The CLIP tower is planned from
    the checkpoint's own tower weights, else from a local CLIP folder; a tower that only the Hub has is loaded
    whole (it is small next to the LLM)."""
    folder = Path(path)
    raw = json.loads((folder / "config.json").read_text())
    kind, select_layer = _original_settings(raw, folder)
    text_config = _llama_config(raw)
    shapes, renamed, source = (_skeleton_source(folder, LLAVA_ORIGINAL_RULES, "original LLaVA") if weights
                               else ({}, {}, str(folder)))
    vision_source = _resolve_vision_source(raw, vision_tower_path, folder)
    plans: dict[str, Any] = {}
    tower_keys = _take(renamed, "vision.")
    if isinstance(vision_source, Path) and not weights:
        from transformers import CLIPVisionConfig
        config = CLIPVisionConfig.from_pretrained(str(vision_source))
        tower, _ = tower_skeleton(config, None, {}, select_layer, vision_source, source)
    elif isinstance(vision_source, Path):
        from transformers import CLIPVisionConfig
        config = CLIPVisionConfig.from_pretrained(str(vision_source))
        if not tower_keys:
            tower_shapes, _, _ = _skeleton_source(vision_source, (("", ""),), "HF CLIP")
            shapes = {**shapes, **tower_shapes}
            tower_keys = clip_vision_keys(tower_shapes)
        tower, plans = tower_skeleton(config, tower_keys, shapes, select_layer, vision_source, source)
    else:
        tower = _original_tower(vision_source, {}, select_layer, source) if not tower_keys else None
        if tower is None:
            tower, plans = tower_skeleton(vision_source.config, tower_keys, shapes, select_layer, None, source)
    mm_hidden = raw.get("mm_hidden_size", tower.hidden_size)
    if mm_hidden != tower.hidden_size:
        raise CheckpointError(f"{folder}: mm_hidden_size={mm_hidden} but the vision tower width is {tower.hidden_size}")
    with empty_parameters():
        projector = build_projector(kind, tower.hidden_size, text_config.hidden_size)
    llm = llm_skeleton(text_config, _take(renamed, "llm.") if weights else None, torch_dtype,
                       bool(getattr(text_config, "tie_word_embeddings", False)), source)
    plans.update(_copy_plans(shapes, renamed, ("projector.", "llm.")))
    vlm = _assemble(tower, projector, llm, torch_dtype)
    return vlm, _checked(vlm, plans, source) if weights else None, _maybe_tokenizer(folder)


def clip_vision_keys(keys: Iterable[str]) -> dict[str, str]:
    """The keys of a CLIP folder that `CLIPVisionModel.from_pretrained` reads: `vision_model.*` (a full
    CLIPModel's text tower and both projections are left out, as transformers does)."""
    keys = list(keys)
    if any(k.startswith(HF_CLIP_VISION_PREFIX) for k in keys):
        return {k: k for k in keys if k.startswith(HF_CLIP_VISION_PREFIX)}
    return {k: k for k in keys if k != "visual_projection.weight"}


HF_CLIP_VISION_PREFIX = "vision_model."


def causal_lm_on_meta(folder: str | Path, dtype: torch.dtype | None, trust_remote_code: bool = False,
                      weights: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """A transformers causal-LM folder as a meta skeleton and its plans (`llm.` + the checkpoint's own key
    names; a checkpoint that needs transformers' key conversions fails by name: load it eagerly)."""
    from transformers import AutoConfig, GenerationConfig

    from .streaming import remapped_plans
    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    shapes, renamed, source = (_skeleton_source(folder, (("", ""),), "causal LM") if weights
                               else ({}, {}, str(folder)))
    keys = {k: k for k in renamed if not k.endswith(_DROPPED_SUFFIXES)}
    llm = llm_skeleton(config, keys if weights else None, dtype, bool(getattr(config, "tie_word_embeddings", False)),
                       source)
    if (folder / "generation_config.json").is_file():
        llm.generation_config = GenerationConfig.from_pretrained(str(folder))
    return llm, remapped_plans(shapes, keys, "llm.")


def hf_clip_on_meta(folder: str | Path, select_layer: int, weights: bool = True
                    ) -> tuple[VisionTower, dict[str, Any]]:
    """A CLIP folder (CLIPVisionModel or full CLIPModel) as `VisionTower.from_hf_clip` builds it, on meta."""
    from transformers import CLIPVisionConfig
    folder = Path(folder)
    config = CLIPVisionConfig.from_pretrained(str(folder))
    if not weights:
        return tower_skeleton(config, None, {}, select_layer, folder, str(folder))
    shapes, _, source = _skeleton_source(folder, (("", ""),), "HF CLIP")
    return tower_skeleton(config, clip_vision_keys(shapes), shapes, select_layer, folder, source)


def checked_source(vlm: VLM, plans: Mapping[str, Any], description: str) -> Any:
    """Public name of `_checked` for the builders that assemble a VLM from parts."""
    return _checked(vlm, plans, description)
