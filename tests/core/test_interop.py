"""LLaVA checkpoint import/export against transformers' LlavaForConditionalGeneration (tiny, random)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from vlsafe.constants import IMAGE_TOKEN_INDEX
from vlsafe.core.interop import (
    CheckpointError,
    export_llava_hf,
    load_llava_hf,
    load_llava_original,
)
from vlsafe.core.projector import build_projector
from vlsafe.core.vlm import VLM

HF_IMAGE_ID = 127
N_PATCHES = 16
PAD = 3


# ---------------------------------------------------------------------------------------------- fixtures
def _tokenizer(with_image: bool) -> PreTrainedTokenizerFast:
    """128-word tokenizer; the last word is `<image>` (id 127) like llava-hf's added token, or a plain word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(4, 127)]
    words.append("<image>" if with_image else "w127")
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    if with_image:
        tok.add_tokens(["<image>"], special_tokens=True)  # already id 127: only marks it special
    return tok


def _tiny_config() -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=HF_IMAGE_ID,
                       image_seq_length=N_PATCHES)


@pytest.fixture(scope="module")
def hf_llava(tmp_path_factory) -> tuple[LlavaForConditionalGeneration, Path]:
    """A tiny random LLaVA with weights spread out (std 0.1) so that any mis-wiring moves the logits."""
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(_tiny_config()).float().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    folder = tmp_path_factory.mktemp("llava_hf")
    model.save_pretrained(folder)
    _tokenizer(with_image=True).save_pretrained(folder)
    return model, folder


def _batch(images_in_row0: int = 1) -> dict[str, torch.Tensor]:
    """Two rows: row 0 has `images_in_row0` images, row 1 one image and two left-pad tokens."""
    img = [IMAGE_TOKEN_INDEX] * N_PATCHES
    row0 = [1, 5, 6] + sum([img + [7 + i] for i in range(images_in_row0)], []) + [9, 10]
    row1 = [1, 11] + img + [12, 13]
    width = max(len(row0), len(row1) + 2)
    rows = [[PAD] * (width - len(r)) + r for r in (row0, row1)]
    ids = torch.tensor(rows)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in (row0, row1)])
    assert mask[1, 0] == 0  # row 1 really is left-padded
    pixels = torch.randn(images_in_row0 + 1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def _hf_logits(model: nn.Module, batch: dict[str, torch.Tensor], image_id: int = HF_IMAGE_ID) -> torch.Tensor:
    ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_INDEX, image_id)
    return model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                 position_ids=_position_ids(batch["attention_mask"])).logits


@torch.no_grad()
def _our_logits(vlm: VLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return vlm(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"]).logits


def _assert_close_on_tokens(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor, tol: float = 1e-4):
    real = mask.bool()
    assert ours.shape[:2] == theirs.shape[:2]
    diff = (ours[real] - theirs[real]).abs().max().item()
    assert diff < tol, diff
    assert theirs[real].abs().max().item() > 0.1  # the comparison is not between near-zero tensors


# ---------------------------------------------------------------------------------------------- HF import
@pytest.mark.parametrize("images_in_row0", [1, 2])
def test_load_llava_hf_matches_hf_logits(hf_llava, images_in_row0):
    model, folder = hf_llava
    vlm, tokenizer = load_llava_hf(folder)
    batch = _batch(images_in_row0)
    _assert_close_on_tokens(_our_logits(vlm, batch), _hf_logits(model, batch), batch["attention_mask"])
    assert tokenizer is not None and tokenizer.convert_tokens_to_ids("<image>") == HF_IMAGE_ID
    assert vlm.vision.select_layer == -2 and vlm.num_image_tokens == N_PATCHES


def _rename(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rewrite transformers-5 in-memory names into the layout of another transformers generation."""
    prefixes = {
        "transformers_4_52": [("model.vision_tower.", "model.vision_tower.vision_model.")],
        "hub_legacy": [("model.vision_tower.", "vision_tower.vision_model."),
                       ("model.multi_modal_projector.", "multi_modal_projector."),
                       ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")],
    }[layout]
    out = {}
    for key, value in state.items():
        for src, dst in prefixes:
            if key.startswith(src):
                key = dst + key[len(src):]
                break
        out[key] = value.contiguous()
    return out


@pytest.mark.parametrize("layout", ["transformers_4_52", "hub_legacy", "sharded"])
def test_load_llava_hf_reads_every_key_layout(hf_llava, tmp_path, layout):
    model, folder = hf_llava
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    if layout == "sharded":
        model.save_pretrained(tmp_path, max_shard_size="40KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
    else:
        save_file(_rename(model.state_dict(), layout), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    vlm, tokenizer = load_llava_hf(tmp_path)
    assert tokenizer is None  # no tokenizer files in this folder
    batch = _batch()
    _assert_close_on_tokens(_our_logits(vlm, batch), _hf_logits(model, batch), batch["attention_mask"])


@pytest.mark.parametrize("drop, named", [
    ("language_model.model.layers.1.mlp.up_proj.weight", "layers.1.mlp.up_proj.weight"),
    ("vision_tower.encoder.layers.0.mlp.fc1.bias", "encoder.layers.0.mlp.fc1.bias"),
    ("multi_modal_projector.linear_2.bias", "2.bias"),
])
def test_missing_weight_is_named(hf_llava, tmp_path, drop, named):
    _, folder = hf_llava
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = load_file(str(folder / "model.safetensors"))
    assert drop in state, sorted(state)[:5]  # the test knows the on-disk layout of this transformers version
    del state[drop]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing") as err:
        load_llava_hf(tmp_path)
    assert named in str(err.value) and "model.safetensors" in str(err.value)


def test_unknown_weight_is_named(hf_llava, tmp_path):
    _, folder = hf_llava
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = load_file(str(folder / "model.safetensors"))
    state["image_newline"] = torch.zeros(32)  # a LLaVA-NeXT parameter
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="image_newline"):
        load_llava_hf(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy"),
    ({"vision_feature_layer": [-2, -1]}, "vision_feature_layer"),
    ({"projector_hidden_act": "relu"}, "projector"),
])
def test_unsupported_llava_hf_configs(hf_llava, tmp_path, change, message):
    _, folder = hf_llava
    raw = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, **change}))
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_llava_hf(tmp_path)


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("tokenizer_kind", ["has_image_token", "needs_image_token", "none"])
def test_export_reloads_in_transformers_with_same_logits(hf_llava, tmp_path, tokenizer_kind):
    _, folder = hf_llava
    vlm, _ = load_llava_hf(folder)
    tokenizer = {"has_image_token": _tokenizer(True), "needs_image_token": _tokenizer(False), "none": None}[
        tokenizer_kind]
    expected_id = HF_IMAGE_ID if tokenizer_kind == "has_image_token" else 128
    out = export_llava_hf(vlm, tokenizer, tmp_path / "export")

    reloaded, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    reloaded = reloaded.float().eval()
    assert reloaded.config.image_token_index == expected_id
    assert reloaded.config.text_config.vocab_size == expected_id + 1
    batch = _batch(2)
    theirs = _hf_logits(reloaded, batch, image_id=expected_id)
    _assert_close_on_tokens(_our_logits(vlm, batch), theirs[..., :128], batch["attention_mask"])

    # the live model and the caller's tokenizer are untouched
    assert vlm.llm.get_input_embeddings().weight.shape[0] == 128
    if tokenizer is not None:
        assert len(tokenizer) == 128
        reloaded_tok = AutoTokenizer.from_pretrained(out)
        assert reloaded_tok.convert_tokens_to_ids("<image>") == expected_id
        assert reloaded_tok("w5 <image> w6").input_ids[-2] == expected_id


def test_export_processor_expands_image_token(hf_llava, tmp_path):
    from transformers import AutoProcessor
    _, folder = hf_llava
    vlm, _ = load_llava_hf(folder)
    out = export_llava_hf(vlm, _tokenizer(False), tmp_path / "export")
    processor = AutoProcessor.from_pretrained(out)
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    inputs = processor(text="w5 <image> w6", images=image, return_tensors="pt")
    assert int((inputs["input_ids"] == 128).sum()) == N_PATCHES
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)


def test_export_merges_lora_without_touching_the_live_model(hf_llava, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    _, folder = hf_llava
    vlm, tokenizer = load_llava_hf(folder)
    torch.manual_seed(3)
    vlm.llm = get_peft_model(vlm.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    vlm.eval()
    batch = _batch()
    ours = _our_logits(vlm, batch)
    with vlm.llm.disable_adapter():
        base = _our_logits(vlm, batch)
    assert (ours - base).abs().max() > 1e-3  # the adapter matters, so merging is observable

    out = export_llava_hf(vlm, tokenizer, tmp_path / "export")
    reloaded = LlavaForConditionalGeneration.from_pretrained(out).float().eval()
    _assert_close_on_tokens(ours, _hf_logits(reloaded, batch), batch["attention_mask"])
    assert isinstance(vlm.llm, PeftModel)
    assert torch.allclose(_our_logits(vlm, batch), ours)  # adapters still unmerged and active


def test_export_requires_mlp_projector(hf_llava, tmp_path):
    _, folder = hf_llava
    vlm, tokenizer = load_llava_hf(folder)
    linear = VLM(vlm.vision, build_projector("linear", 32, 32), vlm.llm)
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        export_llava_hf(linear, tokenizer, tmp_path / "export")


# ---------------------------------------------------------------------------------------------- original layout
def _original_config(model: LlavaForConditionalGeneration, mm_vision_tower: str, **overrides) -> dict:
    """config.json as haotian-liu/LLaVA writes it: flat Llama fields plus mm_* training options."""
    text = model.config.text_config
    return {
        "_name_or_path": "./checkpoints/vicuna-tiny", "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "hidden_act": "silu", "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads, "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads, "rms_norm_eps": text.rms_norm_eps,
        "max_position_embeddings": 4096, "rope_scaling": None, "rope_theta": 10000.0, "pretraining_tp": 1,
        "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "vocab_size": 128,
        "transformers_version": "4.31.0", "image_aspect_ratio": "pad", "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False, "use_mm_proj": True, "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right", "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": mm_vision_tower, "mm_patch_merge_type": "flat",
        **overrides,
    }


def _original_state(model: LlavaForConditionalGeneration, with_tower: bool) -> dict[str, torch.Tensor]:
    inner = model.model
    state = {f"model.{k}": v for k, v in inner.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    for hf_name, ours in (("linear_1", "0"), ("linear_2", "2")):
        for p in ("weight", "bias"):
            state[f"model.mm_projector.{ours}.{p}"] = getattr(inner.multi_modal_projector, hf_name).state_dict()[p]
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints persisted this
    if with_tower:
        for k, v in inner.vision_tower.state_dict().items():
            state[f"model.vision_tower.vision_tower.vision_model.{k}"] = v
    return {k: v.detach().clone() for k, v in state.items()}


def _write_clip_folder(model: LlavaForConditionalGeneration, folder: Path, random_weights: bool) -> Path:
    clip = CLIPVisionModel(model.config.vision_config)
    if not random_weights:
        clip.load_state_dict(model.model.vision_tower.state_dict())
    clip.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tower_in_checkpoint", [False, True])
def test_load_llava_original_matches_hf_logits(hf_llava, tmp_path, tower_in_checkpoint):
    model, _ = hf_llava
    # When the checkpoint carries the tower, the separate CLIP folder only supplies the config: give it
    # different random weights so the test proves the checkpoint's tower weights were used.
    clip = _write_clip_folder(model, tmp_path / "clip", random_weights=tower_in_checkpoint)
    ckpt = tmp_path / "llava"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(_original_config(model, str(clip))))
    torch.save(_original_state(model, tower_in_checkpoint), ckpt / "pytorch_model.bin")
    vlm, tokenizer = load_llava_original(ckpt)
    assert tokenizer is None
    batch = _batch(2)
    _assert_close_on_tokens(_our_logits(vlm, batch), _hf_logits(model, batch), batch["attention_mask"])
    # an explicit vision_tower_path wins over mm_vision_tower
    (ckpt / "config.json").write_text(json.dumps(_original_config(model, "openai/clip-vit-large-patch14-336")))
    vlm2, _ = load_llava_original(ckpt, vision_tower_path=clip)
    _assert_close_on_tokens(_our_logits(vlm2, batch), _hf_logits(model, batch), batch["attention_mask"])


def test_load_llava_original_without_reachable_tower_says_what_to_do(hf_llava, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = hf_llava
    (tmp_path / "config.json").write_text(json.dumps(_original_config(model, str(tmp_path / "no_such_clip"))))
    torch.save(_original_state(model, with_tower=False), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="vision_tower_path") as err:
        load_llava_original(tmp_path)
    assert "no_such_clip" in str(err.value)


@pytest.mark.parametrize("override, message", [
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
    ({"mm_vision_select_feature": "cls_patch"}, "mm_vision_select_feature"),
    ({"mm_projector_type": "identity"}, "mm_projector_type"),
    ({"mm_projector_type": "linear"}, "projector weights do not match"),
    ({"mm_hidden_size": 64}, "mm_hidden_size"),
])
def test_load_llava_original_rejects_what_it_cannot_load(hf_llava, tmp_path, override, message):
    model, _ = hf_llava
    clip = _write_clip_folder(model, tmp_path / "clip", random_weights=False)
    ckpt = tmp_path / "llava"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(_original_config(model, str(clip), **override)))
    torch.save(_original_state(model, with_tower=False), ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=message):
        load_llava_original(ckpt)


def test_loaders_point_at_each_other(hf_llava, tmp_path):
    model, folder = hf_llava
    with pytest.raises(CheckpointError, match="load_llava_hf"):
        load_llava_original(folder)
    (tmp_path / "config.json").write_text(json.dumps(_original_config(model, "x")))
    with pytest.raises(CheckpointError, match="load_llava_original"):
        load_llava_hf(tmp_path)
