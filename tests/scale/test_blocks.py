"""The sharding units are exactly the transformer blocks of the real model families, found by inspection."""
from __future__ import annotations

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from vlsafe.core.projector import build_projector
from vlsafe.core.vision import VisionTower
from vlsafe.core.vlm import VLM
from vlsafe.scale.blocks import block_classes
from vlsafe.scale.fsdp import FSDP, BlockWrapPolicy


def _llm(family: str) -> nn.Module:
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    config_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                             # Vicuna v1.5 is a Llama-2 fine-tune: same architecture class, its own shapes
                             "vicuna": (tf.LlamaConfig, tf.LlamaForCausalLM),
                             "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                             "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
    if family == "vicuna":
        common.update(num_key_value_heads=4, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    return model_cls(config_cls(**common))


def tiny_vlm(family: str = "llama", vision_layers: int = 2) -> VLM:
    torch.manual_seed(0)
    tower = VisionTower.from_open_clip(vision_cfg={"image_size": 32, "patch_size": 8, "width": 32,
                                                   "layers": vision_layers, "head_width": 16, "mlp_ratio": 2.0},
                                       select_layer=-1)
    llm = _llm(family)
    return VLM(tower, build_projector("mlp2x_gelu", 32, 32), llm)


def _decoder_layers(vlm: VLM) -> list[nn.Module]:
    llm = vlm.llm.get_base_model() if hasattr(vlm.llm, "get_base_model") else vlm.llm
    return list(llm.model.layers)


@pytest.mark.parametrize("family,layer_class", [("llama", "LlamaDecoderLayer"), ("vicuna", "LlamaDecoderLayer"),
                                                ("mistral", "MistralDecoderLayer"), ("qwen2", "Qwen2DecoderLayer")])
def test_wrap_policy_targets_exactly_the_decoder_layers_and_vit_blocks(family, layer_class):
    vlm = tiny_vlm(family)
    policy = BlockWrapPolicy()
    targets = policy._run_policy(vlm, ignored_modules=set(), root_kwargs={})  # what FSDP1 wraps
    expected = set(_decoder_layers(vlm)) | set(vlm.vision.visual.transformer.resblocks)
    assert set(targets) == expected
    assert len(targets) == 3 + 2
    assert {c.__name__ for c in policy.resolved} == {layer_class, "ResidualAttentionBlock"}
    assert ResidualAttentionBlock in policy.resolved  # open_clip's ViT block class itself


def test_wrap_policy_sees_through_a_lora_adapter():
    from vlsafe.core.lora import LoraSettings, set_trainable

    vlm = tiny_vlm("llama")
    set_trainable(vlm, lora=LoraSettings(r=4))
    targets = BlockWrapPolicy()._run_policy(vlm, ignored_modules=set(), root_kwargs={})
    assert set(targets) == set(_decoder_layers(vlm)) | set(vlm.vision.visual.transformer.resblocks)
    # each unit mixes frozen base weights and trainable adapters: what use_orig_params=True allows
    layer = _decoder_layers(vlm)[0]
    grads = {p.requires_grad for p in layer.parameters()}
    assert grads == {True, False}


def test_torch_recursive_wrap_path_resolves_from_the_root_too():
    """The legacy callable path (used by apply_activation_checkpointing) sees the root first."""
    from torch.distributed.fsdp.wrap import _recursive_wrap

    vlm = tiny_vlm("qwen2")
    wrapped = []

    def record(module: nn.Module, **kwargs) -> nn.Module:
        wrapped.append(module)
        return module

    _recursive_wrap(vlm, auto_wrap_policy=BlockWrapPolicy(), wrapper_cls=record, ignored_modules=set(),
                    ignored_params=set(), only_wrap_children=True)
    assert set(wrapped) == set(_decoder_layers(vlm)) | set(vlm.vision.visual.transformer.resblocks)


def test_activation_checkpointing_on_the_blocks_keeps_gradients_identical():
    """The check_fn/policy Lightning's FSDP applies: same loss and gradients, blocks recomputed."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointWrapper,
                                                                            apply_activation_checkpointing,
                                                                            checkpoint_wrapper)

    plain, checkpointed = tiny_vlm("llama"), tiny_vlm("llama")
    plain.vision.requires_grad_(True)
    checkpointed.vision.requires_grad_(True)
    apply_activation_checkpointing(checkpointed, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   auto_wrap_policy=BlockWrapPolicy())
    assert sum(isinstance(m, CheckpointWrapper) for m in checkpointed.modules()) == 3 + 2
    ids = torch.tensor([[1, 2] + [-200] * 16 + [3, 4, 5]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (plain, checkpointed):
        model.train()
        model(ids, torch.ones_like(ids), pixel_values=pixels).logits.float().pow(2).mean().backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        other = grads[1][name]
        assert (grad is None) == (other is None), name  # e.g. the unused final ViT norm has no gradient
        assert grad is None or torch.allclose(grad, other, atol=1e-6), name
    assert grads[0]["vision.visual.transformer.resblocks.0.mlp.c_fc.weight"].abs().sum() > 0


def test_fsdp_strategy_preset_wires_policy_hybrid_sharding_and_orig_params():
    strategy = FSDP(sharding_strategy="HYBRID_SHARD", activation_checkpointing=True, state_dict_type="full")
    assert isinstance(strategy.kwargs["auto_wrap_policy"], BlockWrapPolicy)
    assert strategy.kwargs["use_orig_params"] is True  # frozen + trainable parameters in one unit
    assert strategy.sharding_strategy.name == "HYBRID_SHARD"
    assert isinstance(strategy._activation_checkpointing_kwargs["auto_wrap_policy"], BlockWrapPolicy)
    assert strategy._state_dict_type == "full"
    assert FSDP()._activation_checkpointing_kwargs == {}  # off unless asked for


def test_model_without_blocks_is_refused_by_name():
    with pytest.raises(ValueError, match="found no transformer blocks in Sequential"):
        block_classes(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"\['NoSuchBlock'\] do not occur"):
        block_classes(tiny_vlm(), extra=["NoSuchBlock"])
