"""`load: streamed` builds on the meta device and reads tensor by tensor; it must give the eager model exactly.

Single process, tiny checkpoints (the 2-process FSDP2 shard load is tests/scale/test_streamed_load.py).
"""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig

from tests.core.test_interop import (  # noqa: F401  (hf_llava is a fixture)
    _batch,
    _original_config,
    _original_state,
    _our_logits,
    _rename,
    _tokenizer,
    _write_clip_folder,
    hf_llava,
)
from vlsafe.builders import FromParts, LlavaHF, LlavaOriginal, build_on_meta
from vlsafe.core.interop import CheckpointError
from vlsafe.core.streaming import is_meta

UNUSED_RANDOM = ("vision.visual.proj",)  # open_clip's contrastive projection: random in both, never used by LLaVA


def _assert_same_model(eager, streamed) -> None:
    a, b = eager.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if k not in UNUSED_RANDOM and not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    buffers_a, buffers_b = dict(eager.named_buffers()), dict(streamed.named_buffers())
    assert buffers_a.keys() == buffers_b.keys() and buffers_a  # rotary inv_freq at least
    assert all(torch.equal(buffers_a[k], buffers_b[k]) for k in buffers_a)
    assert not any(is_meta(p) for p in streamed.parameters())
    # every parameter owns exactly its own bytes (no view into a larger tensor or a mapped file's storage)
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in streamed.parameters())
    batch = _batch()
    assert torch.equal(_our_logits(eager, batch), _our_logits(streamed, batch))


@pytest.mark.parametrize("layout", ["saved", "hub_legacy", "sharded"])
def test_streamed_llava_hf_equals_eager(hf_llava, tmp_path, layout):
    model, folder = hf_llava
    if layout == "saved":
        path = folder
    else:
        path = tmp_path
        shutil.copy(folder / "config.json", tmp_path / "config.json")
        if layout == "sharded":
            model.save_pretrained(tmp_path, max_shard_size="40KB")
        else:
            save_file(_rename(model.state_dict(), layout), str(tmp_path / "model.safetensors"),
                      metadata={"format": "pt"})
    skeleton = build_on_meta(LlavaHF(str(path), load="streamed", tokenizer=str(folder)))
    llm = skeleton.vlm.llm
    assert is_meta(llm.model.embed_tokens.weight) and not is_meta(llm.model.rotary_emb.inv_freq)
    eager, _ = LlavaHF(str(path), tokenizer=str(folder)).build()
    streamed, processor = LlavaHF(str(path), load="streamed", tokenizer=str(folder)).build()
    assert processor.num_image_tokens == eager.vision.num_patches
    _assert_same_model(eager, streamed)


@pytest.mark.parametrize("head_in_checkpoint", [False, True])
def test_streamed_ties_the_head_as_the_eager_load_does(hf_llava, tmp_path, head_in_checkpoint):
    """tie_word_embeddings: one shared tensor; with both keys on disk the head's values win in both loads."""
    _, folder = hf_llava
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items()
             if head_in_checkpoint or not k.endswith("lm_head.weight")}
    assert len(state) == len(load_file(str(folder / "model.safetensors"))) - (not head_in_checkpoint)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    eager, _ = LlavaHF(str(tmp_path), tokenizer=str(folder)).build()
    streamed, _ = LlavaHF(str(tmp_path), load="streamed", tokenizer=str(folder)).build()
    head, embed = streamed.llm.get_output_embeddings().weight, streamed.llm.get_input_embeddings().weight
    assert head is embed and eager.llm.get_output_embeddings().weight is eager.llm.get_input_embeddings().weight
    _assert_same_model(eager, streamed)


@pytest.mark.parametrize("tower_in_checkpoint", [False, True])
def test_streamed_llava_original_equals_eager(hf_llava, tmp_path, tower_in_checkpoint):
    """Released LLaVA folders are .bin shards: read through torch.load(mmap=True), one file at a time."""
    model, folder = hf_llava
    clip = _write_clip_folder(model, tmp_path / "clip", random_weights=tower_in_checkpoint)
    ckpt = tmp_path / "llava"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(_original_config(model, str(clip))))
    torch.save(_original_state(model, tower_in_checkpoint), ckpt / "pytorch_model.bin")
    eager, _ = LlavaOriginal(str(ckpt), tokenizer=str(folder)).build()
    streamed, _ = LlavaOriginal(str(ckpt), tokenizer=str(folder), load="streamed").build()
    _assert_same_model(eager, streamed)


def test_streamed_from_parts_equals_eager(hf_llava, tmp_path):
    """HF CLIP folder + any HF causal LM folder + a stage-1 projector file (LLaVA's key names)."""
    model, _ = hf_llava
    clip = _write_clip_folder(model, tmp_path / "clip", random_weights=False)
    torch.manual_seed(3)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "llm")
    _tokenizer(with_image=True).save_pretrained(tmp_path / "llm")
    projector = {f"model.mm_projector.{i}.{p}": torch.randn(32, 32) if p == "weight" else torch.randn(32)
                 for i in (0, 2) for p in ("weight", "bias")}
    save_file(projector, str(tmp_path / "mm_projector.safetensors"))
    eager, streamed = (FromParts(llm=str(tmp_path / "llm"), hf_vision=str(clip), load=load,
                                 projector_weights=str(tmp_path / "mm_projector.safetensors")).build()[0]
                       for load in ("eager", "streamed"))
    _assert_same_model(eager, streamed)


def test_a_checkpoint_that_does_not_fit_is_named_before_reading(hf_llava, tmp_path):
    _, folder = hf_llava
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k in state if k.endswith("layers.1.mlp.up_proj.weight"))
    state[key] = state[key][:, :-1].contiguous()  # wrong shape
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"mlp.up_proj.weight.*has shape") as err:
        build_on_meta(LlavaHF(str(tmp_path), load="streamed"), processor=False)
    assert "model.safetensors" in str(err.value)
    del state[key]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing.*layers.1.mlp.up_proj.weight"):
        build_on_meta(LlavaHF(str(tmp_path), load="streamed"), processor=False)
    with pytest.raises(ValueError, match="load='lazy'"):
        LlavaHF(str(tmp_path), load="lazy")


def test_lora_and_the_dpo_reference_follow_the_streamed_path(hf_llava):
    """The policy gets peft's own adapter init (B = 0), the frozen reference copy is the checkpoint's model and
    shares the frozen tower; both are filled by configure_model (what Lightning and load_from_checkpoint call)."""
    from vlsafe.methods.preference.module import PreferenceModule

    _, folder = hf_llava
    eager, _ = LlavaHF(str(folder)).build()
    module = PreferenceModule(vlm=LlavaHF(str(folder), load="streamed"), lora={"r": 4, "alpha": 8, "dropout": 0.0},
                              reference="copy", train_vision=False)
    assert is_meta(module.reference_vlm.llm.model.embed_tokens.weight)
    module.configure_model()
    assert not any(is_meta(p) for p in module.parameters())
    assert module.reference_vlm.vision is module.vlm.vision
    _assert_same_model(eager, module.reference_vlm)
    adapters = {n: p for n, p in module.vlm.llm.named_parameters() if "lora_" in n}
    assert adapters and all(p.requires_grad for p in adapters.values())
    adapters = {n: p.detach() for n, p in adapters.items()}
    assert all(float(p.abs().sum()) == 0 for n, p in adapters.items() if "lora_B" in n)
    assert all(float(p.abs().sum()) > 0 for n, p in adapters.items() if "lora_A" in n)
    with torch.no_grad():  # B = 0: the adapted policy starts as the checkpoint's model
        batch = _batch()
        module.vlm.eval()
        assert torch.equal(_our_logits(module.vlm, batch), _our_logits(eager, batch))


def _llava_config_folder(folder, hidden, intermediate, layers, heads):
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)
    LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2,
                vision_feature_select_strategy="default", image_seq_length=576).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("size, hidden, intermediate, layers, heads, total", [
    ("7b", 4096, 11008, 32, 32, 7_063_427_072),
    ("13b", 5120, 13824, 40, 40, 13_351_494_656),
])
def test_7b_and_13b_llava_build_on_meta_in_seconds(tmp_path, size, hidden, intermediate, layers, heads, total):
    """llava-1.5-{7,13}b-hf's config.json alone (no weights): the whole VLM on meta, counted exactly."""
    folder = _llava_config_folder(tmp_path / size, hidden, intermediate, layers, heads)
    start = time.perf_counter()
    skeleton = build_on_meta(LlavaHF(folder), processor=False, weights=False)
    elapsed = time.perf_counter() - start
    assert skeleton.weights is None and all(is_meta(p) for p in skeleton.vlm.parameters())
    # transformers' LlavaForConditionalGeneration count; vlsafe's open_clip tower adds its unused `proj` (1024x768)
    counted = {n: p.numel() for n, p in skeleton.vlm.named_parameters()}
    assert sum(counted.values()) - counted["vision.visual.proj"] == total and counted["vision.visual.proj"] == 786_432
    assert elapsed < 20, elapsed


def test_a_resized_embedding_is_refused_not_silently_undone(hf_llava):
    """Tokens added after the skeleton was built (PerceptionGPT's `<loc>`) change shapes the checkpoint cannot fill."""
    from vlsafe.core.streaming import StreamedLoadError, materialize

    _, folder = hf_llava
    skeleton = build_on_meta(LlavaHF(str(folder), load="streamed"), processor=False)
    skeleton.vlm.llm.resize_token_embeddings(130, mean_resizing=False)
    with pytest.raises(StreamedLoadError, match=r"embed_tokens.weight \(130, 32\) vs \(128, 32\).*load: eager"):
        materialize(skeleton.vlm, skeleton.weights)
