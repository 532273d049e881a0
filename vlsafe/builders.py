"""Recipe-facing constructors: each builder makes a `VLM` and the `VLMProcessor` that matches it.

A recipe picks one with `class_path` (e.g. `vlsafe.builders.LlavaHF`). Builders are plain classes
whose constructor arguments are their whole configuration, so `config()` can be stored in a checkpoint
as plain data and the model rebuilt later without unpickling anything.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from vlsafe.core.interop import (
    causal_lm_on_meta,
    checked_source,
    hf_clip_on_meta,
    llava_hf_on_meta,
    llava_original_on_meta,
    load_llava_hf,
    load_llava_original,
)
from vlsafe.core.lora import LoraSettings, apply_lora
from vlsafe.core.projector import build_projector
from vlsafe.core.streaming import TensorSource, empty_parameters, materialize
from vlsafe.core.tokenizer import train_bpe_tokenizer
from vlsafe.core.vlm import VLM
from vlsafe.data.encoding.processor import SpecialTokenRule, VLMProcessor
from vlsafe.data.images import RgbMode
from vlsafe.data.synthetic.world import corpus
from vlsafe.moved import import_vlsafe_class
from vlsafe.ops.checkpoint_guard import read_checkpoint

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


LoadMode = Literal["eager", "streamed"]
LOAD_MODES: tuple[str, ...] = get_args(LoadMode)


def check_load(load: str) -> str:
    if load not in LOAD_MODES:
        raise ValueError(f"load={load!r}; use one of {LOAD_MODES} (streamed: meta-device build, weights read tensor "
                         f"by tensor when the model is configured)")
    return load


@dataclass
class Skeleton:
    """A builder's VLM with its parameters on the meta device (buffers real), and where its weights are.

    `weights` fills it (`vlsafe.core.streaming.materialize`), or is None when nothing is to be read (a model
    that only needs its shapes, e.g. for counting). `processor` is None when not asked for."""

    vlm: VLM
    weights: TensorSource | None
    processor: VLMProcessor | None


class VLMBuilder:
    """Base class: subclasses implement `build()`; `config()` records the constructor arguments.

    Builders that read checkpoints take `load`: `eager` (default: the whole checkpoint is read into a
    model built in full, the behaviour every test and recipe has always had) or `streamed` (the model is
    built on the meta device and each process reads, tensor by tensor, only what it holds; see
    `build_on_meta` and the README's "Large models")."""

    def build(self) -> tuple[VLM, VLMProcessor]:
        if getattr(self, "load", "eager") == "streamed":
            skeleton = build_on_meta(self)
            materialize(skeleton.vlm, skeleton.weights)
            return skeleton.vlm, skeleton.processor
        return self._build_eager()

    def _build_eager(self) -> tuple[VLM, VLMProcessor]:
        raise NotImplementedError

    def _skeleton(self, weights: bool = True) -> tuple[VLM, TensorSource | None, Any]:
        """(meta VLM, its weights or None, tokenizer or None); builders that support `build_on_meta` implement it."""
        raise NotImplementedError(f"{type(self).__name__} cannot be built on the meta device")

    def _tokenizer_for(self, folder: str | None, found: Any) -> Any:
        from transformers import AutoTokenizer

        name = getattr(self, "tokenizer", None)
        if name or found is None:
            return AutoTokenizer.from_pretrained(name or folder, use_fast=True)
        return found

    def _text_rules(self) -> dict[str, Any]:
        """The processor's text settings (`_processor_for`); absent on builders that predate them."""
        return {"max_text_chars": getattr(self, "max_text_chars", None),
                "special_tokens_in_text": getattr(self, "special_tokens_in_text", "text"),
                "rgb_mode": getattr(self, "rgb_mode", "composite")}

    def config(self) -> dict[str, Any]:
        params = inspect.signature(type(self).__init__).parameters
        # `load` says how weights are read, not which model this is: left out, so checkpoints compare and resume
        # the same either way, and a model rebuilt from a checkpoint's hyperparameters reads eagerly
        args = {name: getattr(self, name) for name in params if name not in ("self", "load")}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}

    @staticmethod
    def from_config(config: dict[str, Any]) -> "VLMBuilder":
        """Rebuild a builder from `config()` output; only vlsafe builder classes are accepted."""
        cls = import_vlsafe_class(config["class_path"], VLMBuilder, "builder")
        return cls(**config.get("init_args", {}))


def _processor_for(vlm: VLM, tokenizer, template: str, max_length: int, pad_to_square: bool = True, *,
                   max_text_chars: int | None = None, special_tokens_in_text: SpecialTokenRule = "text",
                   rgb_mode: RgbMode = "composite") -> VLMProcessor:
    """The processor that matches `vlm`. Every builder takes `max_text_chars` (per-message character cap; None:
    `VLSAFE_MAX_TEXT_CHARS` or 100,000; 0: none) and `special_tokens_in_text` ("text": vlsafe reads a literal
    `</s>` in a conversation as characters; "control": the released LLaVA tokenisation, where it becomes EOS),
    so a recipe sets them beside `max_length` (`model.init_args.vlm.init_args.max_text_chars`). `rgb_mode`
    ("composite": alpha on white; "pil": LLaVA's `convert('RGB')`) decides what a transparent pixel becomes."""
    tower = vlm.vision
    return VLMProcessor(tokenizer, template, image_size=tower.image_size, num_image_tokens=tower.num_patches,
                        image_mean=tower.image_mean, image_std=tower.image_std, max_length=max_length,
                        pad_to_square=pad_to_square, max_text_chars=max_text_chars,
                        special_tokens_in_text=special_tokens_in_text, rgb_mode=rgb_mode)


class FromParts(VLMBuilder):
    """Compose a VLM from an open_clip (or HF CLIP) tower, a projector and any HF causal LM.

    This is LLaVA stage 1/2 from scratch: e.g. `llm=lmsys/vicuna-7b-v1.5`, `vision=ViT-L-14-336` with
    `vision_pretrained=openai`, `projector=mlp2x_gelu`, `projector_weights=<stage-1 mm_projector.bin>`.
    """

    def __init__(self, llm: str, vision: str = "ViT-L-14-336", vision_pretrained: str | None = "openai",
                 hf_vision: str | None = None, projector: str = "mlp2x_gelu", projector_weights: str | None = None,
                 select_layer: int = -2, tokenizer: str | None = None, template: str = "vicuna_v1",
                 max_length: int = 2048, torch_dtype: str | None = None, attn_implementation: str | None = None,
                 trust_remote_code: bool = False, max_text_chars: int | None = None,
                 special_tokens_in_text: SpecialTokenRule = "text", rgb_mode: RgbMode = "composite",
                 load: LoadMode = "eager"):
        self.load = check_load(load)
        self.llm, self.vision, self.vision_pretrained, self.hf_vision = llm, vision, vision_pretrained, hf_vision
        self.projector, self.projector_weights, self.select_layer = projector, projector_weights, select_layer
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length
        self.torch_dtype, self.attn_implementation = torch_dtype, attn_implementation
        self.trust_remote_code = trust_remote_code
        self.max_text_chars, self.special_tokens_in_text = max_text_chars, special_tokens_in_text
        self.rgb_mode = rgb_mode

    def _skeleton(self, weights: bool = True) -> tuple[VLM, TensorSource | None, Any]:
        """Streamed: the LLM and an HF CLIP tower (`hf_vision`) on meta; an open_clip tower, whose weights come
        as one pretrained file, and the projector (small) are built and loaded whole, as `build` does
        (`weights=False`: shapes only, the open_clip tower from its config, nothing read)."""
        from vlsafe.core.vision import VisionTower

        plans: dict[str, Any] = {}
        if self.hf_vision:
            tower, plans = hf_clip_on_meta(self.hf_vision, self.select_layer, weights)
        elif weights:
            tower = VisionTower.from_open_clip(self.vision, pretrained=self.vision_pretrained,
                                               select_layer=self.select_layer)
        else:
            tower = _open_clip_tower_on_meta(self.vision, self.vision_pretrained, self.select_layer)
        llm, llm_plans = causal_lm_on_meta(self.llm, resolve_dtype(self.torch_dtype), self.trust_remote_code, weights)
        if weights:
            projector = build_projector(self.projector, tower.hidden_size, llm.config.hidden_size)
            if self.projector_weights:
                load_projector_weights(projector, self.projector_weights)
        else:
            with empty_parameters():
                projector = build_projector(self.projector, tower.hidden_size, llm.config.hidden_size)
        vlm = VLM(tower, projector, llm)
        if not weights:
            return vlm, None, None
        return vlm, checked_source(vlm, {**plans, **llm_plans}, f"{self.llm} + {self.hf_vision or self.vision}"), None

    def _tokenizer_for(self, folder: str | None, found: Any) -> Any:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.tokenizer or self.llm, use_fast=True,
                                             trust_remote_code=self.trust_remote_code)

    def _build_eager(self) -> tuple[VLM, VLMProcessor]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from vlsafe.core.vision import VisionTower

        if self.hf_vision:
            tower = VisionTower.from_hf_clip(self.hf_vision, select_layer=self.select_layer)
        else:
            tower = VisionTower.from_open_clip(self.vision, pretrained=self.vision_pretrained,
                                               select_layer=self.select_layer)
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.torch_dtype:
            kwargs["dtype"] = resolve_dtype(self.torch_dtype)
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        llm = AutoModelForCausalLM.from_pretrained(self.llm, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer or self.llm, use_fast=True,
                                                  trust_remote_code=self.trust_remote_code)
        projector = build_projector(self.projector, tower.hidden_size, llm.config.hidden_size)
        if self.projector_weights:
            load_projector_weights(projector, self.projector_weights)
        vlm = VLM(tower, projector, llm)
        return vlm, _processor_for(vlm, tokenizer, self.template, self.max_length, **self._text_rules())


def load_projector_weights(projector: torch.nn.Module, path: str) -> None:
    """Load a stage-1 projector (`mm_projector.bin` / `.safetensors`, LLaVA key names accepted)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    prefixes = ("model.mm_projector.", "mm_projector.", "multi_modal_projector.")
    cleaned = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        cleaned[key.replace("linear_1", "0").replace("linear_2", "2")] = value
    missing, unexpected = projector.load_state_dict(cleaned, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: projector weights do not fit (missing {missing}, unexpected {unexpected})")


class LlavaHF(VLMBuilder):
    """A transformers `LlavaForConditionalGeneration` folder (e.g. `llava-hf/llava-1.5-7b-hf`)."""

    def __init__(self, path: str, template: str = "vicuna_v1", max_length: int = 2048,
                 torch_dtype: str | None = None, tokenizer: str | None = None, max_text_chars: int | None = None,
                 special_tokens_in_text: SpecialTokenRule = "text", rgb_mode: RgbMode = "composite",
                 load: LoadMode = "eager"):
        self.load = check_load(load)
        self.path, self.template, self.max_length = path, template, max_length
        self.torch_dtype, self.tokenizer = torch_dtype, tokenizer
        self.max_text_chars, self.special_tokens_in_text = max_text_chars, special_tokens_in_text
        self.rgb_mode = rgb_mode

    def _skeleton(self, weights: bool = True) -> tuple[VLM, TensorSource | None, Any]:
        return llava_hf_on_meta(self.path, torch_dtype=resolve_dtype(self.torch_dtype), weights=weights)

    def _build_eager(self) -> tuple[VLM, VLMProcessor]:
        from transformers import AutoTokenizer


        vlm, tokenizer = load_llava_hf(self.path, torch_dtype=resolve_dtype(self.torch_dtype))
        if self.tokenizer or tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer or self.path, use_fast=True)
        return vlm, _processor_for(vlm, tokenizer, self.template, self.max_length, **self._text_rules())


class LlavaOriginal(VLMBuilder):
    """A haotian-liu/LLaVA checkpoint (`liuhaotian/llava-v1.5-7b` layout, `model.mm_projector.*`)."""

    def __init__(self, path: str, vision_tower_path: str | None = None, template: str = "vicuna_v1",
                 max_length: int = 2048, tokenizer: str | None = None, max_text_chars: int | None = None,
                 special_tokens_in_text: SpecialTokenRule = "text", rgb_mode: RgbMode = "composite",
                 load: LoadMode = "eager"):
        self.load = check_load(load)
        self.path, self.vision_tower_path = path, vision_tower_path
        self.template, self.max_length, self.tokenizer = template, max_length, tokenizer
        self.max_text_chars, self.special_tokens_in_text = max_text_chars, special_tokens_in_text
        self.rgb_mode = rgb_mode

    def _skeleton(self, weights: bool = True) -> tuple[VLM, TensorSource | None, Any]:
        return llava_original_on_meta(self.path, vision_tower_path=self.vision_tower_path, weights=weights)

    def _build_eager(self) -> tuple[VLM, VLMProcessor]:
        from transformers import AutoTokenizer


        vlm, tokenizer = load_llava_original(self.path, vision_tower_path=self.vision_tower_path)
        if self.tokenizer or tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer or self.path, use_fast=True)
        return vlm, _processor_for(vlm, tokenizer, self.template, self.max_length, **self._text_rules())


class TinyVLM(VLMBuilder):
    """A random-init VLM small enough to train on a laptop CPU in seconds, for demos and tests.

    open_clip ViT (64 px, patch 8 -> 64 image tokens) + a small Llama, with a byte-level BPE tokenizer
    trained on the synthetic world's text. Same seed -> same weights and vocabulary.
    """

    def __init__(self, image_size: int = 64, patch_size: int = 8, vision_width: int = 64, vision_layers: int = 2,
                 vision_heads: int = 2, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                 intermediate_size: int = 128, vocab_size: int = 1024, projector: str = "mlp2x_gelu",
                 select_layer: int = -1, template: str = "vicuna_v1", max_length: int = 512, seed: int = 0,
                 tokenizer: str | None = None, vision_pos_embed: str = "learnable", max_text_chars: int | None = None,
                 special_tokens_in_text: SpecialTokenRule = "text", rgb_mode: RgbMode = "composite"):
        self.image_size, self.patch_size = image_size, patch_size
        self.vision_width, self.vision_layers, self.vision_heads = vision_width, vision_layers, vision_heads
        self.hidden_size, self.num_layers, self.num_heads = hidden_size, num_layers, num_heads
        self.intermediate_size, self.vocab_size, self.projector = intermediate_size, vocab_size, projector
        self.select_layer, self.template, self.max_length, self.seed = select_layer, template, max_length, seed
        self.tokenizer = tokenizer
        self.max_text_chars, self.special_tokens_in_text = max_text_chars, special_tokens_in_text
        self.rgb_mode = rgb_mode
        # "sin_cos_2d" (open_clip's fixed 2-D position code) gives a random-init tower patch features that say
        # where they are, as a pretrained CLIP's do; grounding demos need that, a random learnable table hides it.
        self.vision_pos_embed = vision_pos_embed

    def _skeleton(self, weights: bool = True) -> tuple[VLM, TensorSource | None, Any]:
        """Shapes only (random init has nothing to read): parameters on meta, no weights."""
        with empty_parameters():
            vlm, processor = self.build()
        return vlm, None, processor.tokenizer

    def build(self) -> tuple[VLM, VLMProcessor]:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from vlsafe.core.vision import VisionTower

        if self.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer, use_fast=True)
        else:
            tokenizer = train_bpe_tokenizer(corpus(), vocab_size=self.vocab_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            tower = VisionTower.from_open_clip(
                vision_cfg={"image_size": self.image_size, "patch_size": self.patch_size, "width": self.vision_width,
                            "layers": self.vision_layers, "head_width": self.vision_width // self.vision_heads,
                            "mlp_ratio": 2.0,
                            **({} if self.vision_pos_embed == "learnable"
                               else {"pos_embed_type": self.vision_pos_embed})},
                select_layer=self.select_layer)
            config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=self.hidden_size,
                                 intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                                 num_attention_heads=self.num_heads, num_key_value_heads=self.num_heads,
                                 max_position_embeddings=max(self.max_length, 512),
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
            llm = LlamaForCausalLM(config)
            projector = build_projector(self.projector, tower.hidden_size, self.hidden_size)
        vlm = VLM(tower, projector, llm)
        return vlm, _processor_for(vlm, tokenizer, self.template, self.max_length, **self._text_rules())


def _open_clip_tower_on_meta(name: str, pretrained: str | None, select_layer: int) -> Any:
    """A named open_clip tower from its config alone, parameters on meta (QuickGELU as its pretrained tag says)."""
    import open_clip

    from vlsafe.core.vision import VisionTower, tag_uses_quick_gelu

    model_cfg = open_clip.get_model_config(name) or {}
    if "vision_cfg" not in model_cfg:
        raise ValueError(f"vision={name!r} is not an open_clip model name")
    quick_gelu = bool(model_cfg.get("quick_gelu")) or tag_uses_quick_gelu(name, pretrained)
    with empty_parameters():
        return VisionTower.from_open_clip(vision_cfg=model_cfg["vision_cfg"], quick_gelu=quick_gelu,
                                          select_layer=select_layer, embed_dim=model_cfg.get("embed_dim"))


def build_on_meta(builder: VLMBuilder, processor: bool = True, weights: bool = True) -> Skeleton:
    """The builder's VLM with every parameter on the meta device (no weights read, no memory), in seconds
    for a 7B/13B folder; buffers (rotary `inv_freq`, position ids) are computed as in a normal build.

    `weights` maps every meta parameter to its checkpoint tensor(s), checked name by name and shape by shape;
    `vlsafe.core.streaming.materialize(skeleton.vlm, skeleton.weights)` fills it (what `load: streamed` does in
    `VLMModule.configure_model`, after FSDP2 has sharded it). `processor=False` skips loading the tokenizer
    (e.g. to count parameters); `weights=False` reads config.json only (no weight files needed, `weights` None).
    `vlsafe.scale.model_size` also sizes placeholder paths from published configs."""
    vlm, source, tokenizer = builder._skeleton(weights)
    made = None
    if processor:
        folder = getattr(builder, "path", None)
        made = _processor_for(vlm, builder._tokenizer_for(folder, tokenizer), builder.template, builder.max_length,
                              **builder._text_rules())
    return Skeleton(vlm, source, made)


def save_pretrained_parts(vlm: VLM, processor: VLMProcessor, out_dir: str | Path) -> Path:
    """Save the tokenizer beside a run so evaluation never depends on re-deriving it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(out / "tokenizer")
    return out


class FromCheckpoint(VLMBuilder):
    """Start from a vlsafe training checkpoint, e.g. the SFT model that preference training continues.

    The checkpoint's own builder rebuilds the architecture and tokenizer; its `vlm.*` weights are loaded
    on top, and a LoRA adapter it was trained with is merged (or kept with `merge_lora: false`).
    `train_if_missing` names a recipe to run first when `path` does not exist yet; that recipe must
    write its checkpoint to `path` (the demo recipes do).
    """

    def __init__(self, path: str, merge_lora: bool = True, train_if_missing: str | None = None):
        self.path, self.merge_lora, self.train_if_missing = path, merge_lora, train_if_missing

    def _train_first(self) -> None:
        import subprocess
        import sys

        print(f"vlsafe: {self.path} does not exist; training it first with {self.train_if_missing}", flush=True)
        subprocess.run([sys.executable, "-m", "vlsafe.cli", self.train_if_missing], check=True)
        if not Path(self.path).exists():
            raise FileNotFoundError(f"{self.train_if_missing} finished but did not write {self.path}; point "
                                    f"FromCheckpoint.path at the checkpoint that recipe saves")

    def build(self) -> tuple[VLM, VLMProcessor]:

        if not Path(self.path).exists():
            if not self.train_if_missing:
                raise FileNotFoundError(f"checkpoint {self.path} does not exist (set train_if_missing to a recipe "
                                        f"that produces it)")
            self._train_first()

        checkpoint = read_checkpoint(self.path)  # weights_only=True; garbage or pickled code: a named error
        hparams = checkpoint.get("hyper_parameters") or {}
        if "vlm" not in hparams:
            raise ValueError(f"{self.path} is not a vlsafe checkpoint (no 'vlm' hyperparameters)")
        vlm, processor = VLMBuilder.from_config(hparams["vlm"]).build()
        if hparams.get("lora"):
            apply_lora(vlm, LoraSettings(**hparams["lora"]))
        state = {k[len("vlm."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("vlm.")}
        missing, unexpected = vlm.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{self.path}: weights do not match the rebuilt model (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        if hparams.get("lora") and self.merge_lora:
            vlm.llm = vlm.llm.merge_and_unload()
        return vlm.eval(), processor
