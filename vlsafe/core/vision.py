"""The vision tower: an open_clip ViT that returns LLaVA-style patch features.

open_clip is the single implementation we train and run, because it stops early at the selected
block and supports gradient checkpointing. HF CLIP checkpoints (the ones LLaVA uses) are converted
into open_clip's layout on load and back on export, by two pure functions over state dicts.

Layer numbering follows LLaVA/HF: with L blocks, HF's `hidden_states` has L+1 entries (entry 0 is the
embedding output after `pre_layrnorm`), so `select_layer=k>0` is the output of block k (1-based) and
`select_layer=-j` is the output of block L+1-j; `-1` is the last block, `-2` the penultimate one.
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer
from torch import nn

HF_CLIP_PREFIX = "vision_model."  # CLIPVisionModel's on-disk prefix (and its in-memory one before transformers 5)
_HF_IGNORED_KEYS = ("embeddings.position_ids",)  # a buffer some old checkpoints persisted
_HF_ACTIVATIONS = {"quick_gelu": None, "gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}


# ---------------------------------------------------------------------------------------------- layers
def block_index(select_layer: int, num_layers: int) -> int:
    """0-based open_clip block index whose output is HF `hidden_states[select_layer]`."""
    if not isinstance(select_layer, int) or isinstance(select_layer, bool):
        raise ValueError(f"select_layer must be an int, got {select_layer!r}")
    if 1 <= select_layer <= num_layers:
        return select_layer - 1
    if -num_layers <= select_layer <= -1:
        return num_layers + select_layer
    raise ValueError(
        f"select_layer={select_layer} is out of range for a {num_layers}-block tower: use 1..{num_layers} "
        f"(output of that block) or -1..-{num_layers} (counted from the last block; LLaVA uses -2). "
        f"0 / -{num_layers + 1} would be the embedding output, which is not supported")


# ---------------------------------------------------------------------------------------------- state dicts
def _hf_block_keys(i: int) -> dict[str, str]:
    """open_clip key -> HF key for the parts of block i that map one to one."""
    hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
    pairs = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    return {f"{oc}{o}.{p}": f"{hf}{h}.{p}" for o, h in pairs.items() for p in ("weight", "bias")}


def _hf_stem_keys() -> dict[str, str]:
    """open_clip key -> HF key outside the blocks (the projection is handled separately)."""
    return {"class_embedding": "embeddings.class_embedding",
            "conv1.weight": "embeddings.patch_embedding.weight",
            "positional_embedding": "embeddings.position_embedding.weight",
            "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
            "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}


def hf_clip_plan(keys: Iterable[str], num_layers: int) -> dict[str, tuple[str, list[str]]]:
    """How each open_clip `VisionTransformer` weight is made from HF CLIP vision keys: (op, HF keys) with op
    `copy`, `cat0` (q/k/v stacked into `in_proj_*`) or `t` (`visual_projection.weight` transposed into `proj`).

    Accepts `CLIPVisionModel` keys with or without the `vision_model.` prefix, plus an optional
    `visual_projection.weight` (from `CLIPVisionModelWithProjection`). Missing or unexpected keys raise, so a
    wrong `num_layers` cannot pass silently. Works on names only, so a streamed load can plan before reading.
    """
    full = {k.removeprefix(HF_CLIP_PREFIX): k for k in keys}
    wanted = dict(_hf_stem_keys())
    for i in range(num_layers):
        wanted.update(_hf_block_keys(i))
    qkv = {f"encoder.layers.{i}.self_attn.{n}_proj.{p}" for i in range(num_layers) for n in "qkv"
           for p in ("weight", "bias")}
    missing = [k for k in [*wanted.values(), *sorted(qkv)] if k not in full]
    unexpected = sorted(set(full) - set(wanted.values()) - qkv - {"visual_projection.weight", *_HF_IGNORED_KEYS})
    if missing or unexpected:
        raise ValueError(f"HF CLIP vision state dict does not match a {num_layers}-layer tower: "
                         f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    plan = {oc_key: ("copy", [full[hf_key]]) for oc_key, hf_key in wanted.items()}
    for i in range(num_layers):
        attn = f"encoder.layers.{i}.self_attn."
        for p in ("weight", "bias"):
            parts = [full[f"{attn}{n}_proj.{p}"] for n in "qkv"]
            plan[f"transformer.resblocks.{i}.attn.in_proj_{p}"] = ("cat0", parts)
    if "visual_projection.weight" in full:
        plan["proj"] = ("t", [full["visual_projection.weight"]])
    return plan


def hf_clip_to_open_clip(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """HF CLIP vision weights -> open_clip `VisionTransformer` weights, by `hf_clip_plan`."""
    ops = {"copy": lambda ts: ts[0], "cat0": lambda ts: torch.cat(ts, dim=0), "t": lambda ts: ts[0].t()}
    return {oc_key: ops[op]([state_dict[k] for k in hf_keys])
            for oc_key, (op, hf_keys) in hf_clip_plan(state_dict.keys(), num_layers).items()}


def open_clip_to_hf_clip(state_dict: Mapping[str, torch.Tensor], num_layers: int,
                         prefix: str = HF_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """open_clip `VisionTransformer` weights -> `CLIPVisionModel` weights (`proj` is dropped: it has none)."""
    out: dict[str, torch.Tensor] = {}
    mapping = dict(_hf_stem_keys())
    for i in range(num_layers):
        mapping.update(_hf_block_keys(i))
    for oc_key, hf_key in mapping.items():
        out[prefix + hf_key] = state_dict[oc_key]
    for i in range(num_layers):
        for p in ("weight", "bias"):
            q, k, v = state_dict[f"transformer.resblocks.{i}.attn.in_proj_{p}"].chunk(3, dim=0)
            for name, t in zip("qkv", (q, k, v)):  # clone: views of one storage cannot be saved as safetensors
                out[f"{prefix}encoder.layers.{i}.self_attn.{name}_proj.{p}"] = t.clone()
    return out


# ---------------------------------------------------------------------------------------------- configs
def _single(value: Any, what: str) -> int:
    """open_clip and HF allow (h, w) pairs; LLaVA interop needs square images and patches."""
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square {what} {tuple(value)} is not supported")
        value = value[0]
    return int(value)


def open_clip_cfg_from_hf(config: Any) -> tuple[dict[str, Any], bool, int]:
    """HF `CLIPVisionConfig` -> (open_clip vision_cfg dict, quick_gelu, embed_dim)."""
    act = config.hidden_act
    if act not in _HF_ACTIVATIONS:
        raise ValueError(f"HF CLIP hidden_act={act!r} has no open_clip equivalent; "
                         f"supported: {sorted(_HF_ACTIVATIONS)}")
    if getattr(config, "num_channels", 3) != 3:
        raise ValueError(f"only 3-channel towers are supported, got num_channels={config.num_channels}")
    width, heads = config.hidden_size, config.num_attention_heads
    mlp_ratio = config.intermediate_size / width
    if int(width * mlp_ratio) != config.intermediate_size:
        raise ValueError(f"intermediate_size={config.intermediate_size} is not representable as an open_clip "
                         f"mlp_ratio of width {width}")
    approximate = _HF_ACTIVATIONS[act]
    cfg = dict(layers=config.num_hidden_layers, width=width, head_width=width // heads, mlp_ratio=mlp_ratio,
               patch_size=_single(config.patch_size, "patch_size"),
               image_size=_single(config.image_size, "image_size"),
               norm_kwargs={"eps": float(config.layer_norm_eps)},
               act_kwargs={"approximate": approximate} if approximate not in (None, "none") else None)
    return cfg, approximate is None, int(getattr(config, "projection_dim", width))


def _unsupported_cfg(cfg: Mapping[str, Any]) -> None:
    """Reject open_clip towers that are not plain ViTs before spending time building them."""
    if cfg.get("timm_model_name"):
        raise ValueError(f"timm vision towers ({cfg['timm_model_name']!r}) are not supported; use a plain open_clip ViT")
    if isinstance(cfg.get("layers"), (tuple, list)):
        raise ValueError("ModifiedResNet vision towers (layers given as a tuple) are not supported; use a plain ViT")
    if cfg.get("attentional_pool"):
        raise ValueError("attentional_pool vision towers (CoCa-style) are not supported; use a plain ViT")
    unknown = set(cfg) - {f.name for f in fields(CLIPVisionCfg)}
    if unknown:
        raise ValueError(f"unknown open_clip vision_cfg fields: {sorted(unknown)}")


# ---------------------------------------------------------------------------------------------- pixels
def normalize_pixels(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 RGB (..., 3, S, S) in 0..255 -> float32 `(x / 255 - mean) / std`; float input is returned as is.

    Why two pixel formats: data loader workers ship uint8 images (a quarter of float32's bytes through the
    worker queue) and the model normalises on its own device. A float tensor is taken to be normalised
    already (what `VLMProcessor.preprocess_image` returns, computed by this same function).
    """
    if pixels.dtype != torch.uint8:
        return pixels
    # one multiply and one add per element, in place: `(x / 255 - mean) / std` folded into scale and shift
    # (within 5e-7 of the three-step form; 40% less CPU, which matters when the consumer is a CPU process)
    mean_t = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    scale = (1.0 / (255.0 * std_t)).to(device=pixels.device, dtype=torch.float32)
    shift = (-mean_t / std_t).to(device=pixels.device, dtype=torch.float32)
    return pixels.float().mul_(scale).add_(shift)


# ---------------------------------------------------------------------------------------------- the tower
class VisionTower(nn.Module):
    """open_clip ViT that returns the patch tokens (no CLS) of one block, as LLaVA feeds its projector."""

    def __init__(self, visual: VisionTransformer, select_layer: int = -2,
                 image_mean: tuple[float, float, float] = OPENAI_DATASET_MEAN,
                 image_std: tuple[float, float, float] = OPENAI_DATASET_STD,
                 vision_cfg: Mapping[str, Any] | None = None):
        super().__init__()
        _check_plain_vit(visual)
        self.visual = visual
        self.num_layers = len(visual.transformer.resblocks)
        self._block = block_index(select_layer, self.num_layers)
        self.select_layer = select_layer
        self.hidden_size = int(visual.transformer.width)
        self.image_size = _single(visual.image_size, "image_size")
        self.patch_size = _single(visual.patch_size, "patch_size")
        self.num_patches = int(visual.grid_size[0] * visual.grid_size[1])
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.vision_cfg = dict(vision_cfg) if vision_cfg is not None else None  # kept for export checks

    def normalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised float32 with this tower's mean/std; float (normalised) input unchanged."""
        return normalize_pixels(pixel_values, self.image_mean, self.image_std)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 or normalised float -> (N, num_patches, hidden_size); blocks after the selected
        one never run."""
        dtype = next(self.visual.parameters()).dtype
        pixels = self.normalize(pixel_values).to(dtype)
        out = self.visual.forward_intermediates(pixels, indices=[self._block], stop_early=True,
                                                intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"][0]

    def hf_index(self, select_layer: int | None = None) -> int:
        """Index into HF `hidden_states` (0 = embedding output, k = block k) of `select_layer` (default: ours)."""
        layer = self.select_layer if select_layer is None else select_layer
        return block_index(layer, self.num_layers) + 1

    def hidden_states(self, pixel_values: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
        """HF-style `hidden_states[0..last]` as patch tokens (no CLS): entry 0 is the embedding output after
        `ln_pre`, entry k the output of block k; `last` defaults to all `num_layers` blocks. Blocks after
        `last` never run. For features that combine several layers (PerceptionGPT's learned layer merge);
        `forward` stays the one-layer path."""
        last = self.num_layers if last is None else int(last)
        if not 0 <= last <= self.num_layers:
            raise ValueError(f"last={last} is out of range for a {self.num_layers}-block tower (0..{self.num_layers})")
        dtype = next(self.visual.parameters()).dtype
        x = self.visual._embeds(self.normalize(pixel_values).to(dtype))  # conv, CLS, positions, ln_pre
        states = [x[:, 1:]]
        if last:
            _, blocks = self.visual.transformer.forward_intermediates(x, indices=list(range(last)), stop_early=True)
            states += [h[:, 1:] for h in blocks]
        return states

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (only matters when the tower is trained)."""
        self.visual.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_open_clip(cls, model_name: str | None = None, pretrained: str | None = None,
                       vision_cfg: Mapping[str, Any] | None = None, quick_gelu: bool = False,
                       select_layer: int = -2, embed_dim: int | None = None) -> "VisionTower":
        """A named open_clip model (`pretrained`: tag or local checkpoint) or a raw `CLIPVisionCfg` dict.

        QuickGELU is switched on when the pretrained tag was trained with it (e.g. `ViT-L-14-336` +
        `openai`, LLaVA-1.5's tower): open_clip itself only warns, and nn.GELU silently degrades features.
        `embed_dim` only sizes the unused contrastive projection of a raw config (default: width).
        """
        if (model_name is None) == (vision_cfg is None):
            raise ValueError("pass exactly one of model_name or vision_cfg")
        if vision_cfg is not None:
            _unsupported_cfg(vision_cfg)
            cfg = asdict(CLIPVisionCfg(**vision_cfg))
            visual = _build_vision_tower(embed_dim or cfg["width"], cfg, quick_gelu=quick_gelu)
            return cls(visual, select_layer, vision_cfg=cfg)
        model_cfg = open_clip.get_model_config(model_name) or {}
        if "vision_cfg" in model_cfg:
            _unsupported_cfg(model_cfg["vision_cfg"])
        quick_gelu = quick_gelu or tag_uses_quick_gelu(model_name, pretrained)
        model = open_clip.create_model(model_name, pretrained=pretrained, force_quick_gelu=quick_gelu)
        visual = model.visual
        mean = getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or OPENAI_DATASET_STD
        return cls(visual, select_layer, mean, std, vision_cfg=model_cfg.get("vision_cfg"))

    @classmethod
    def from_hf_state_dict(cls, config: Any, state_dict: Mapping[str, torch.Tensor], select_layer: int = -2,
                           image_mean: tuple[float, ...] | None = None,
                           image_std: tuple[float, ...] | None = None) -> "VisionTower":
        """Build from a `CLIPVisionConfig` and HF CLIP weights without instantiating the HF model."""
        cfg, quick_gelu, embed_dim = open_clip_cfg_from_hf(config)
        if "visual_projection.weight" in state_dict:
            embed_dim = state_dict["visual_projection.weight"].shape[0]
        weights = hf_clip_to_open_clip(state_dict, config.num_hidden_layers)
        visual = _build_vision_tower(embed_dim, cfg, quick_gelu=quick_gelu)
        missing, unexpected = visual.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - {"proj"}:
            raise ValueError(f"converted CLIP weights do not fit the tower: missing {missing}, unexpected {unexpected}")
        return cls(visual, select_layer, image_mean or OPENAI_DATASET_MEAN, image_std or OPENAI_DATASET_STD,
                   vision_cfg=cfg)

    @classmethod
    def from_hf_clip(cls, path_or_model: str | Path | nn.Module, select_layer: int = -2) -> "VisionTower":
        """A transformers `CLIPVisionModel` / `CLIPVisionModelWithProjection` (object or saved folder)."""
        mean = std = None
        if isinstance(path_or_model, nn.Module):
            model = path_or_model
        else:
            from transformers import CLIPVisionModel
            model = CLIPVisionModel.from_pretrained(str(path_or_model))
            mean, std = read_image_stats(path_or_model)
        return cls.from_hf_state_dict(model.config, model.state_dict(), select_layer, mean, std)

    # ------------------------------------------------------------------ export
    def hf_export_problems(self) -> list[str]:
        """Why this tower cannot be written as an HF CLIP tower (empty list: it can)."""
        v, problems = self.visual, []
        cfg = self.vision_cfg or {}
        block = v.transformer.resblocks[0]
        if not isinstance(block, ResidualAttentionBlock):
            problems.append("custom attention blocks (qk_norm / scaled cosine attention / extra norms)")
        elif not isinstance(block.ls_1, nn.Identity):
            problems.append("layer scale (ls_init_value)")
        if isinstance(v.ln_pre, nn.Identity):
            problems.append("no_ln_pre")
        # Known only when the tower was built through from_open_clip/from_hf_*: a fixed sin-cos table
        # is indistinguishable from a frozen learnable one by inspecting the module.
        if cfg.get("pos_embed_type", "learnable") != "learnable":
            problems.append(f"non-learnable position embedding ({cfg['pos_embed_type']})")
        if not isinstance(v.patch_dropout, nn.Identity):
            problems.append("patch dropout")
        if v.attn_pool is not None:
            problems.append("attentional pool")
        if v.pool_type != "tok":
            problems.append(f"pool_type={v.pool_type!r} (HF pools the CLS token)")
        if _hf_activation(block) is None:
            problems.append(f"activation {block.mlp.gelu!r} (HF CLIP export supports QuickGELU and GELU)")
        if len({m.eps for m in v.modules() if isinstance(m, nn.LayerNorm)}) != 1:
            problems.append("layer norms with different eps")
        return problems

    def _require_hf_exportable(self) -> None:
        problems = self.hf_export_problems()
        if problems:
            raise ValueError("this open_clip tower cannot be represented as an HF CLIPVisionModel: "
                             + "; ".join(problems))

    def hf_clip_config(self) -> Any:
        """The `CLIPVisionConfig` describing this tower (for LLaVA-HF export)."""
        from transformers import CLIPVisionConfig
        self._require_hf_exportable()
        v = self.visual
        block = v.transformer.resblocks[0]
        return CLIPVisionConfig(
            hidden_size=self.hidden_size, intermediate_size=block.mlp.c_fc.out_features,
            num_hidden_layers=self.num_layers, num_attention_heads=block.attn.num_heads, num_channels=3,
            image_size=self.image_size, patch_size=self.patch_size, hidden_act=_hf_activation(block),
            layer_norm_eps=float(v.ln_pre.eps), projection_dim=int(v.proj.shape[1]) if v.proj is not None else 512)

    def hf_clip_state_dict(self, prefix: str = HF_CLIP_PREFIX) -> dict[str, torch.Tensor]:
        """Weights as `CLIPVisionModel` names them on disk (`vision_model.*`, loadable by every
        transformers version's `from_pretrained`); pass `prefix=""` for transformers>=5 in-memory names."""
        self._require_hf_exportable()
        return open_clip_to_hf_clip(self.visual.state_dict(), self.num_layers, prefix)


# ---------------------------------------------------------------------------------------------- helpers
def _check_plain_vit(visual: nn.Module) -> None:
    """The feature path relies on open_clip's ViT internals (CLS prefix, fixed token count)."""
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"only plain open_clip ViT towers are supported, got {visual.__class__.__name__} "
                         f"(ModifiedResNet and timm towers have no per-block patch tokens in LLaVA's sense)")
    if visual.attn_pool is not None:
        raise ValueError("attentional_pool towers are not supported: their tokens are pooled queries, not patches")
    if not isinstance(visual.patch_dropout, nn.Identity):
        raise ValueError("patch dropout is not supported: it changes the number of image tokens during training")


def tag_uses_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """Whether open_clip's registry says this pretrained tag was trained with QuickGELU (paths: False)."""
    if not pretrained:
        return False
    from open_clip.pretrained import get_pretrained_cfg
    return bool((get_pretrained_cfg(model_name, pretrained) or {}).get("quick_gelu", False))


def _hf_activation(block: nn.Module) -> str | None:
    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    return None


def read_image_stats(folder: str | Path) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """Mean/std from a saved `preprocessor_config.json` if the folder has one (else None, None)."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return None, None
    cfg = json.loads(path.read_text())
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    return (tuple(mean) if mean else None), (tuple(std) if std else None)
