"""VisionTower against transformers' CLIPVisionModel, in both conversion directions."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from vlsafe.core.vision import (VisionTower, block_index, hf_clip_to_open_clip, open_clip_to_hf_clip,
                                tag_uses_quick_gelu)

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8)
TINY_CFG = dict(layers=3, width=32, head_width=8, mlp_ratio=2.0, patch_size=8, image_size=32)


def _spread(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw all weights with std 0.3: CLIP's tiny default init makes activations so small that a
    wrong activation function or layer-norm eps would change features by less than the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _hf_clip(tmp_path, **overrides) -> tuple[CLIPVisionModel, str]:
    torch.manual_seed(0)
    model = _spread(CLIPVisionModel(CLIPVisionConfig(**{**TINY, **overrides})))
    model.save_pretrained(tmp_path / "clip")
    return model, str(tmp_path / "clip")


def _pixels(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("select_layer", [-2, -1, 1, -3, 3])
def test_from_hf_clip_folder_matches_hidden_states(tmp_path, select_layer):
    model, path = _hf_clip(tmp_path)
    tower = VisionTower.from_hf_clip(path, select_layer=select_layer).eval()
    x = _pixels()
    expected = model(x, output_hidden_states=True).hidden_states[select_layer][:, 1:]
    assert _max_diff(tower(x), expected) < 1e-5
    assert (tower.num_patches, tower.hidden_size, tower.num_layers) == (16, 32, 3)
    assert tower.image_size == 32 and tower.patch_size == 8


def test_layers_differ_so_selection_is_observable(tmp_path):
    """Guards the test above: if adjacent layers were equal, a wrong index could still pass."""
    model, path = _hf_clip(tmp_path)
    hs = model(_pixels(), output_hidden_states=True).hidden_states
    assert _max_diff(hs[-2], hs[-1]) > 1e-2 and _max_diff(hs[1], hs[2]) > 1e-2


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_activation_and_layer_norm_eps_are_carried_over(tmp_path, act):
    model, path = _hf_clip(tmp_path, hidden_act=act, layer_norm_eps=1e-3)
    tower = VisionTower.from_hf_clip(path).eval()
    x = _pixels()
    expected = model(x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert _max_diff(tower(x), expected) < 1e-5
    # and the check is sensitive to each of them:
    for wrong in ({"hidden_act": "quick_gelu" if act == "gelu" else "gelu"}, {"layer_norm_eps": 1e-5}):
        config = CLIPVisionConfig(**{**TINY, "hidden_act": act, "layer_norm_eps": 1e-3, **wrong})
        mismatched = VisionTower.from_hf_state_dict(config, model.state_dict()).eval()
        assert _max_diff(mismatched(x), expected) > 1e-4


def test_from_hf_clip_with_projection_object_loads_projection():
    torch.manual_seed(0)
    model = _spread(CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY, projection_dim=24)))
    tower = VisionTower.from_hf_clip(model).eval()
    x = _pixels()
    out = model(x, output_hidden_states=True)
    assert _max_diff(tower(x), out.hidden_states[-2][:, 1:]) < 1e-5
    pooled = tower.visual(x)  # open_clip's own pooled + projected embedding
    assert _max_diff(pooled, out.image_embeds) < 1e-5


def test_round_trip_open_clip_to_hf(tmp_path):
    tower = VisionTower.from_open_clip(vision_cfg=TINY_CFG, quick_gelu=True)
    _spread(tower)
    config = tower.hf_clip_config()
    hf = CLIPVisionModel(config).eval()
    in_memory_prefix = "vision_model." if any(k.startswith("vision_model.") for k in hf.state_dict()) else ""
    hf.load_state_dict(tower.hf_clip_state_dict(prefix=in_memory_prefix), strict=True)
    x = _pixels()
    expected = hf(x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert _max_diff(tower(x), expected) < 1e-5

    # the default (on-disk) prefix loads through from_pretrained with nothing missing or left over
    from safetensors.torch import save_file
    folder = tmp_path / "exported"
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in tower.hf_clip_state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    reloaded, info = CLIPVisionModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    back = VisionTower.from_hf_clip(folder).eval()
    assert _max_diff(back(x), expected) < 1e-5


def test_pure_conversions_are_inverse():
    torch.manual_seed(0)
    hf_state = CLIPVisionModel(CLIPVisionConfig(**TINY)).state_dict()
    flat = {k.removeprefix("vision_model."): v for k, v in hf_state.items()}
    back = open_clip_to_hf_clip(hf_clip_to_open_clip(hf_state, 3), 3, prefix="")
    assert back.keys() == flat.keys()
    assert all(torch.equal(back[k], flat[k]) for k in flat)


def test_wrong_layer_count_is_reported():
    hf_state = CLIPVisionModel(CLIPVisionConfig(**TINY)).state_dict()
    with pytest.raises(ValueError, match="unexpected .*encoder.layers.2"):
        hf_clip_to_open_clip(hf_state, 2)
    with pytest.raises(ValueError, match="missing .*encoder.layers.3"):
        hf_clip_to_open_clip(hf_state, 4)


@pytest.mark.parametrize("cfg, message", [
    ({**TINY_CFG, "layers": (1, 1, 1, 1)}, "ModifiedResNet"),
    ({**TINY_CFG, "timm_model_name": "vit_tiny_patch16_224"}, "timm"),
    ({**TINY_CFG, "attentional_pool": True}, "attentional_pool"),
    ({**TINY_CFG, "patch_dropout": 0.5}, "patch dropout"),
])
def test_unsupported_open_clip_towers_are_rejected(cfg, message):
    with pytest.raises(ValueError, match=message):
        VisionTower.from_open_clip(vision_cfg=cfg)


@pytest.mark.parametrize("cfg, message", [
    ({**TINY_CFG, "ls_init_value": 0.1}, "layer scale"),
    ({**TINY_CFG, "qk_norm": True}, "custom attention"),
    ({**TINY_CFG, "no_ln_pre": True}, "no_ln_pre"),
    ({**TINY_CFG, "pos_embed_type": "sin_cos_2d"}, "non-learnable position embedding"),
    ({**TINY_CFG, "act_kwargs": {"approximate": "tanh"}}, None),  # representable: gelu_pytorch_tanh
])
def test_hf_export_refuses_unrepresentable_towers(cfg, message):
    tower = VisionTower.from_open_clip(vision_cfg=cfg)
    if message is None:
        assert tower.hf_clip_config().hidden_act == "gelu_pytorch_tanh"
        return
    with pytest.raises(ValueError, match=f"cannot be represented as an HF CLIPVisionModel: .*{message}"):
        tower.hf_clip_state_dict()


@pytest.mark.parametrize("layer", [0, 4, -4, 1.5])
def test_out_of_range_select_layer(layer):
    with pytest.raises(ValueError, match="select_layer"):
        VisionTower.from_open_clip(vision_cfg=TINY_CFG, select_layer=layer)


def test_block_index_semantics():
    assert [block_index(k, 3) for k in (1, 2, 3, -1, -2, -3)] == [0, 1, 2, 2, 1, 0]


def test_grad_checkpointing_gives_same_gradients():
    tower = _spread(VisionTower.from_open_clip(vision_cfg=TINY_CFG)).train()
    x = _pixels()
    tower(x).square().sum().backward()
    plain = [p.grad.clone() for p in tower.parameters() if p.grad is not None]
    tower.zero_grad()
    tower.set_grad_checkpointing(True)
    tower(x).square().sum().backward()
    ckpt = [p.grad.clone() for p in tower.parameters() if p.grad is not None]
    assert tower.visual.transformer.grad_checkpointing
    assert len(plain) == len(ckpt) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain, ckpt))


def test_from_open_clip_named_model_loads_local_checkpoint(tmp_path):
    import open_clip
    torch.manual_seed(0)
    source = open_clip.create_model("ViT-S-32")
    path = tmp_path / "vit_s_32.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)  # a different random init, so equality below can only come from the checkpoint
    tower = VisionTower.from_open_clip("ViT-S-32", pretrained=str(path), select_layer=-1)
    expected = source.visual.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in tower.visual.state_dict().items())
    assert tower.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert (tower.image_size, tower.patch_size, tower.num_patches, tower.hidden_size) == (224, 32, 49, 384)
    # select_layer=-1: the last block's patch tokens, computed here by running open_clip's blocks by hand
    x = _pixels(1, 224)
    with torch.no_grad():
        h = source.visual._embeds(x)
        for block in source.visual.transformer.resblocks:
            h = block(h)
        assert _max_diff(tower(x), h[:, 1:]) < 1e-5


@pytest.mark.parametrize("name, message", [("coca_ViT-B-32", "attentional_pool"),
                                           ("ViT-B-32-SigLIP2-256", "timm"), ("RN50", "ModifiedResNet")])
def test_unsupported_named_open_clip_models_fail_before_building(name, message):
    with pytest.raises(ValueError, match=message):
        VisionTower.from_open_clip(name)


def test_openai_tags_get_quick_gelu():
    """LLaVA-1.5's tower is OpenAI CLIP, trained with QuickGELU; open_clip would only warn on nn.GELU."""
    assert tag_uses_quick_gelu("ViT-L-14-336", "openai")
    assert not tag_uses_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    assert not tag_uses_quick_gelu("ViT-B-32", "/some/local/checkpoint.pt")
    assert not tag_uses_quick_gelu("ViT-B-32", None)
