"""How many parameters a recipe's model holds, counted on the meta device (no weights, no memory).

`vlsafe plan` needs exact parameter counts for 7B/13B recipes on a machine that has neither the weights nor
the memory for them. The model is built as the recipe's builder builds it (open_clip ViT tower, vlsafe
projector, transformers causal LM, assembled into `VLM`), inside `torch.device("meta")`, and the recipe's
freeze policy and LoRA settings are applied with the same `set_trainable` the methods use, so trainable vs
frozen follows the recipe.

The architecture is read from the checkpoint's own `config.json` when the recipe's path exists here. Paper
recipes point at placeholders (`/path/to/vicuna-7b-v1.5`); for those the folder's name is looked up in
`PUBLISHED_ARCHITECTURES` (the public config.json values of the LLaVA-1.5 / Vicuna-1.5 / CLIP checkpoints)
and the result says so (`ModelCount.source`). An unknown name is an error, never a guess.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlsafe.builders import (
    FromParts,
    LlavaHF,
    LlavaOriginal,
    TinyVLM,
    VLMBuilder,
    resolve_dtype,
)
from vlsafe.core.lora import LoraSettings, set_trainable
from vlsafe.core.projector import build_projector
from vlsafe.core.vlm import VLM
from vlsafe.scale.blocks import block_classes

_VICUNA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
_VICUNA_13B = {**_VICUNA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
               "num_attention_heads": 40, "num_key_value_heads": 40}
_LLAVA_HF_VOCAB = 32064  # llava-hf folders pad the vocabulary (image token + padding to a multiple of 64)

# Folder name (lower case, a substring match on the last path component) -> the published LLM config and,
# for whole-VLM folders, the vision tower and projector LLaVA-1.5 pairs with it. Longest name first wins.
PUBLISHED_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "vicuna-7b-v1.5": {"llm": _VICUNA_7B},
    "vicuna-13b-v1.5": {"llm": _VICUNA_13B},
    "llava-v1.5-7b": {"llm": _VICUNA_7B, "vision": "ViT-L-14-336", "projector": "mlp2x_gelu", "select_layer": -2},
    "llava-v1.5-13b": {"llm": _VICUNA_13B, "vision": "ViT-L-14-336", "projector": "mlp2x_gelu", "select_layer": -2},
    "llava-1.5-7b-hf": {"llm": {**_VICUNA_7B, "vocab_size": _LLAVA_HF_VOCAB}, "vision": "ViT-L-14-336",
                        "projector": "mlp2x_gelu", "select_layer": -2},
    "llava-1.5-13b-hf": {"llm": {**_VICUNA_13B, "vocab_size": _LLAVA_HF_VOCAB}, "vision": "ViT-L-14-336",
                         "projector": "mlp2x_gelu", "select_layer": -2},
}
# CLIP folder name -> open_clip model name (QuickGELU: the OpenAI weights were trained with it).
PUBLISHED_TOWERS = {"clip-vit-large-patch14-336": "ViT-L-14-336", "clip-vit-large-patch14": "ViT-L-14"}


class ModelSizeError(ValueError):
    """The recipe's model cannot be sized (unknown architecture, unsupported builder)."""


@dataclass(frozen=True)
class PartCount:
    total: int
    trainable: int
    bytes: int  # storage bytes of all its parameters
    trainable_bytes: int


@dataclass(frozen=True)
class ModelCount:
    """Parameter counts and the shapes the activation estimate needs, for one built (meta) model."""

    total: int
    trainable: int
    bytes: int
    trainable_bytes: int
    parts: dict[str, PartCount]  # "vision", "projector", "llm"
    largest_block: int  # parameters of the biggest decoder layer / ViT block (one FSDP/ZeRO-3 unit)
    output_embedding: int  # LM head parameters (FSDP2 keeps the root unit gathered through backward)
    llm_hidden: int
    llm_intermediate: int
    llm_layers: int
    vocab_size: int
    vision_hidden: int
    vision_layers: int
    image_tokens: int
    lora: bool
    source: str  # where the architecture came from

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


# ---------------------------------------------------------------------------------------------- architectures
def _published(path: str, what: str) -> dict[str, Any]:
    name = Path(str(path).rstrip("/")).name.lower()
    for key in sorted(PUBLISHED_ARCHITECTURES, key=len, reverse=True):
        if key in name:
            return PUBLISHED_ARCHITECTURES[key]
    raise ModelSizeError(f"{what}={path!r}: no config.json there and {name!r} is not a published architecture "
                         f"vlsafe knows ({', '.join(PUBLISHED_ARCHITECTURES)}); point it at a folder with config.json")


def _config_json(path: str | None) -> dict[str, Any] | None:
    if path and (Path(path) / "config.json").is_file():
        return json.loads((Path(path) / "config.json").read_text())
    return None


def _llm_config(path: str, what: str) -> tuple[Any, str]:
    from transformers import AutoConfig, LlamaConfig

    raw = _config_json(path)
    if raw is None:
        return LlamaConfig(**_published(path, what)["llm"], tie_word_embeddings=False), f"published config ({path})"
    if raw.get("model_type") == "llava_llama" or "mm_vision_tower" in raw:  # original LLaVA: Llama + mm_* keys
        fields = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in ("model_type", "architectures")}
        return LlamaConfig(**fields), f"{path}/config.json"
    if raw.get("model_type") == "llava":
        return AutoConfig.from_pretrained(path).text_config, f"{path}/config.json"
    return AutoConfig.from_pretrained(path), f"{path}/config.json"


def _tower_on_meta(open_clip_name: str | None = None, hf_folder: str | None = None, select_layer: int = -2,
                   hf_config: Any = None) -> nn.Module:
    """The open_clip ViT the builders make, from its config only (`open_clip.create_model` moves the model to
    a device, which a meta model cannot do, so the vision config is built directly, as TinyVLM does)."""
    import open_clip

    from vlsafe.core.vision import VisionTower, open_clip_cfg_from_hf

    if hf_folder is not None or hf_config is not None:
        if hf_config is None:
            from transformers import CLIPVisionConfig
            hf_config = CLIPVisionConfig.from_pretrained(hf_folder)
        cfg, quick_gelu, embed_dim = open_clip_cfg_from_hf(hf_config)
        return VisionTower.from_open_clip(vision_cfg=cfg, quick_gelu=quick_gelu, select_layer=select_layer,
                                          embed_dim=embed_dim)
    model_cfg = open_clip.get_model_config(open_clip_name)
    if not model_cfg or "vision_cfg" not in model_cfg:
        raise ModelSizeError(f"vision={open_clip_name!r} is not an open_clip model name")
    return VisionTower.from_open_clip(vision_cfg=model_cfg["vision_cfg"], quick_gelu=model_cfg.get("quick_gelu", True),
                                      select_layer=select_layer, embed_dim=model_cfg.get("embed_dim"))


def _llm_on_meta(config: Any, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)


def _original_tower(builder: LlavaOriginal, raw: Mapping[str, Any] | None, select_layer: int) -> nn.Module:
    folder = builder.vision_tower_path or (raw or {}).get("mm_vision_tower")
    if folder and (Path(folder) / "config.json").is_file():
        return _tower_on_meta(hf_folder=str(folder), select_layer=select_layer)
    name = Path(str(folder or "clip-vit-large-patch14-336").rstrip("/")).name.lower()
    for key in sorted(PUBLISHED_TOWERS, key=len, reverse=True):
        if key in name:
            return _tower_on_meta(PUBLISHED_TOWERS[key], select_layer=select_layer)
    raise ModelSizeError(f"vision_tower_path={folder!r}: no config.json there and not a published CLIP tower "
                         f"({', '.join(PUBLISHED_TOWERS)})")


def vlm_on_meta(builder: VLMBuilder) -> tuple[VLM, str]:
    """The builder's VLM with every tensor on the meta device, and where its architecture came from."""
    with torch.device("meta"):
        if isinstance(builder, TinyVLM):
            return builder.build()[0], "TinyVLM settings"
        if isinstance(builder, FromParts):
            config, source = _llm_config(builder.llm, "llm")
            tower = (_tower_on_meta(hf_folder=builder.hf_vision, select_layer=builder.select_layer)
                     if builder.hf_vision else _tower_on_meta(builder.vision, select_layer=builder.select_layer))
            llm = _llm_on_meta(config, resolve_dtype(builder.torch_dtype))
            projector = build_projector(builder.projector, tower.hidden_size, config.hidden_size)
            return VLM(tower, projector, llm), source
        if isinstance(builder, LlavaOriginal):
            raw = _config_json(builder.path)
            published = {} if raw else _published(builder.path, "path")
            config, source = _llm_config(builder.path, "path")
            select_layer = int((raw or published).get("mm_vision_select_layer", published.get("select_layer", -2)))
            tower = _original_tower(builder, raw, select_layer)
            kind = (raw or {}).get("mm_projector_type", published.get("projector", "linear"))
            projector = build_projector(kind, tower.hidden_size, config.hidden_size)
            return VLM(tower, projector, _llm_on_meta(config, None)), source
        if isinstance(builder, LlavaHF):
            raw = _config_json(builder.path)
            if raw is None:
                published = _published(builder.path, "path")
                from transformers import LlamaConfig
                config, source = LlamaConfig(**published["llm"], tie_word_embeddings=False), f"published ({builder.path})"
                tower = _tower_on_meta(published["vision"], select_layer=published["select_layer"])
            else:
                from transformers import AutoConfig
                full = AutoConfig.from_pretrained(builder.path)
                config, source = full.text_config, f"{builder.path}/config.json"
                tower = _tower_on_meta(hf_config=full.vision_config, select_layer=int(full.vision_feature_layer))
            projector = build_projector("mlp2x_gelu", tower.hidden_size, config.hidden_size)
            return VLM(tower, projector, _llm_on_meta(config, resolve_dtype(builder.torch_dtype))), source
    raise ModelSizeError(f"vlsafe plan cannot size a {type(builder).__name__} model (supported: TinyVLM, FromParts, "
                         f"LlavaOriginal, LlavaHF)")


# ---------------------------------------------------------------------------------------------- counting
def _part(module: nn.Module) -> PartCount:
    params = list(module.parameters())  # unique: tied weights count once
    return PartCount(total=sum(p.numel() for p in params),
                     trainable=sum(p.numel() for p in params if p.requires_grad),
                     bytes=sum(p.numel() * p.element_size() for p in params),
                     trainable_bytes=sum(p.numel() * p.element_size() for p in params if p.requires_grad))


def _largest_block(vlm: VLM) -> int:

    classes = tuple(block_classes(vlm))
    sizes = [sum(p.numel() for p in m.parameters()) for m in vlm.modules() if isinstance(m, classes)]
    return max(sizes, default=0)


def count_model(vlm: VLM, source: str = "") -> ModelCount:
    """Counts of a built VLM (meta or real) as its trainability flags stand."""
    whole = _part(vlm)
    parts = {"vision": _part(vlm.vision), "projector": _part(vlm.projector), "llm": _part(vlm.llm)}
    config = vlm.llm.config
    head = vlm.llm.get_output_embeddings()
    tied = head is not None and head.weight is vlm.llm.get_input_embeddings().weight
    return ModelCount(
        total=whole.total, trainable=whole.trainable, bytes=whole.bytes, trainable_bytes=whole.trainable_bytes,
        parts=parts, largest_block=_largest_block(vlm),
        output_embedding=0 if head is None or tied else head.weight.numel(),
        llm_hidden=int(config.hidden_size), llm_intermediate=int(getattr(config, "intermediate_size", 4 * config.hidden_size)),
        llm_layers=int(config.num_hidden_layers), vocab_size=int(config.vocab_size),
        vision_hidden=int(vlm.vision.hidden_size), vision_layers=int(getattr(vlm.vision, "num_layers", 0)),
        image_tokens=int(vlm.num_image_tokens), lora=hasattr(vlm.llm, "peft_config"), source=source)


def count_recipe_model(builder: VLMBuilder, *, lora: LoraSettings | Mapping[str, Any] | None = None,
                       train_vision: bool = False, train_projector: bool = True,
                       train_llm: bool = True) -> ModelCount:
    """Build `builder`'s model on the meta device, apply the recipe's freeze policy / LoRA, and count it."""
    vlm, source = vlm_on_meta(builder)
    settings = LoraSettings(**lora) if isinstance(lora, Mapping) else lora
    with torch.device("meta"):
        set_trainable(vlm, train_vision=train_vision, train_projector=train_projector, train_llm=train_llm,
                      lora=settings)
    return count_model(vlm, source)
