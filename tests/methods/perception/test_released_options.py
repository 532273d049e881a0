"""The released PerceptionGPT options: learned CLIP layer merge, batch-pooled Dice, white square padding.

Each is checked against a transcription of the released formula (pipilurj/perceptionGPT @ fd8e3eb) and
against the vlsafe variant it is an alternative to.
"""
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

from vlsafe.builders import TinyVLM
from vlsafe.core.vision import VisionTower
from vlsafe.data.encoding.processor import image_bytes
from vlsafe.data.synthetic.world import generate
from vlsafe.methods.perception.features import LayerMerge, perception_vision
from vlsafe.methods.perception.losses import dice_loss
from vlsafe.methods.perception.module import PerceptionModule

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                 patch_size=8)
SMALL_HEADS = {"box_hidden": 32, "mask_decoder": {"dim": 32, "heads": 2, "depth": 1, "mlp_dim": 64}}


# ------------------------------------------------------------------------------------- released transcriptions
def released_dice_loss(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mllm/utils/dice_loss.py:5-17 (dice_coeff) + :25-28 (dice_loss), called as perceptionGPT.py:396 does:
    `dice_loss(sigmoid(logits.squeeze(1)), masks.squeeze(1).float(), multiclass=False)`, so
    `reduce_batch_first=True` and epsilon 1e-6."""
    epsilon, reduce_batch_first = 1e-6, True
    assert input.size() == target.size()
    assert input.dim() == 3 or not reduce_batch_first
    sum_dim = (-1, -2) if input.dim() == 2 or not reduce_batch_first else (-1, -2, -3)
    inter = 2 * (input * target).sum(dim=sum_dim)
    sets_sum = input.sum(dim=sum_dim) + target.sum(dim=sum_dim)
    sets_sum = torch.where(sets_sum == 0, inter, sets_sum)
    dice = (inter + epsilon) / (sets_sum + epsilon)
    return 1 - dice.mean()


def released_merge(hidden_states: tuple[torch.Tensor, ...], merge_coef: torch.Tensor) -> torch.Tensor:
    """perceptionGPT.py:188-189 (`merge_coef_higher`, the mask decoder's features; :186-187 is the same for
    the LLM's): stack HF `hidden_states[:-1]`, matmul with the softmaxed per-layer weights, drop CLS."""
    merged = torch.stack(hidden_states[:-1], dim=1).permute(0, 2, 3, 1) @ \
        merge_coef.softmax(dim=0).unsqueeze(0).reshape(-1, 1).squeeze(dim=-1)
    return merged[:, 1:]


# ------------------------------------------------------------------------------------- Dice
def test_batch_dice_equals_the_released_formula_and_differs_from_per_mask():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 16, 16, generator=g)
    target = torch.zeros(3, 16, 16)
    target[0, 2:14, 2:14] = 1  # a large object
    target[1, 5:7, 5:7] = 1    # a small one: per-mask Dice weighs it as much as the large one
    target[2, 0:8, :] = 1
    batch = dice_loss(probs, target, reduction="batch")
    torch.testing.assert_close(batch, released_dice_loss(probs, target), rtol=0, atol=1e-7)
    per_mask = dice_loss(probs, target, reduction="per_mask")
    assert abs(float(batch) - float(per_mask)) > 0.01, (batch, per_mask)
    # both sums zero (no mask pixels, no probability): the released `torch.where` gives Dice 1, loss 0
    empty = torch.zeros(2, 4, 4)
    assert float(released_dice_loss(empty, empty)) == float(dice_loss(empty, empty, reduction="batch")) == 0.0
    # the epsilon is the released 1e-6: a single pixel at p=0.5 against an empty target
    one = torch.zeros(1, 4, 4)
    one[0, 0, 0] = 0.5
    torch.testing.assert_close(dice_loss(one, torch.zeros(1, 4, 4), reduction="batch"),
                               torch.tensor(1 - 1e-6 / (0.5 + 1e-6)))
    with pytest.raises(ValueError, match="dice_reduction"):
        dice_loss(probs, target, reduction="mean")


# ------------------------------------------------------------------------------------- layer merge
def _hf_tower() -> tuple[CLIPVisionModel, VisionTower]:
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).eval()
    with torch.no_grad():  # spread the weights so that layers differ visibly (tests/core/test_vision.py)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    tower = VisionTower.from_hf_clip(model, select_layer=-2).eval().requires_grad_(False)
    return model, tower


def test_layer_merge_reproduces_the_released_formula_on_hf_clip_hidden_states():
    """Decoder features: softmax-weighted sum over HF `hidden_states[:-1]` (the embedding output and blocks
    1..L-1: L states, here 3 of the 4), equal to the released matmul; the projector keeps layer -2."""
    model, tower = _hf_tower()
    vlm = SimpleNamespace(vision=tower, vision_features=tower)
    merge = LayerMerge(tower.num_layers)
    assert merge.weights.shape == (3,) and torch.equal(merge.weights, torch.full([3], 1 / 3))  # :317-318
    with torch.no_grad():
        merge.weights.copy_(torch.tensor([0.3, -1.2, 2.0]))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model(pixels, output_hidden_states=True).hidden_states  # 4 entries for 3 blocks
    projected, decoder = perception_vision(vlm, pixels, merge)
    expected = released_merge(hidden, merge.weights.detach())
    assert (decoder - expected).abs().max() < 1e-5
    assert (projected - hidden[-2][:, 1:]).abs().max() < 1e-5, "the LLM's features stay at select_layer -2"
    # the merge is not the select layer's features (else the option would be invisible)
    assert (decoder - hidden[-2][:, 1:]).abs().max() > 0.1
    # the tower is frozen, the merge weights learn
    decoder.square().mean().backward()
    assert merge.weights.grad is not None and bool(merge.weights.grad.abs().gt(0).all())
    # without a merge both streams are the select layer's features
    plain_projected, plain_decoder = perception_vision(vlm, pixels, None)
    assert plain_decoder is plain_projected and (plain_projected - hidden[-2][:, 1:]).abs().max() < 1e-5


def test_merged_path_runs_the_tower_only_as_deep_as_the_default_path():
    """With LLaVA's select layer -2 the merge needs blocks 1..L-1 only: the last block never runs (one pass,
    the default path's cost)."""
    _, tower = _hf_tower()
    calls = []
    tower.visual.transformer.resblocks[-1].register_forward_hook(lambda *a: calls.append(1))
    vlm = SimpleNamespace(vision=tower, vision_features=tower)
    with torch.no_grad():
        perception_vision(vlm, torch.zeros(1, 3, 32, 32), LayerMerge(tower.num_layers))
        perception_vision(vlm, torch.zeros(1, 3, 32, 32), None)
    assert calls == []


# ------------------------------------------------------------------------------------- the module and pad colour
@pytest.fixture(scope="module")
def released_module():
    torch.manual_seed(0)
    return PerceptionModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64), dice_reduction="batch",
                            pad_color="white", **{**SMALL_HEADS, "mask_decoder": {**SMALL_HEADS["mask_decoder"],
                                                                                  "vision_features": "merged"}})


def test_released_options_train_the_merge_weights_and_pad_with_white(released_module):
    module = released_module
    assert module.heads.layer_merge.weights.numel() == module.vlm.vision.num_layers
    encoder = module.data_encoder("fit")
    samples = list(generate(2, seed=3, kinds=["grounding"]))
    batch = encoder.collate([encoder.encode(s) for s in samples])
    loss, terms, _ = module.compute_loss(batch)
    loss.backward()
    assert "mask_dice" in terms and module.heads.layer_merge.weights.grad is not None
    wide = Image.new("RGB", (48, 24), (10, 20, 30))  # 12-pixel bands above and below after padding to 48 x 48
    raw = module.processor.preprocess_image(image_bytes(wide), normalize=False)  # uint8, resized to 64 x 64
    assert raw[:, 0].eq(255).all() and raw[:, -1].eq(255).all(), "the padding bands are white"
    assert raw[:, 32].tolist() == [[10] * 64, [20] * 64, [30] * 64], "the image itself is unchanged"
    assert module.hparams["dice_reduction"] == "batch" and module.hparams["pad_color"] == "white"
    assert module.hparams["mask_decoder"]["vision_features"] == "merged"


def test_pad_colour_values_and_bad_options_name_the_setting():
    mean = PerceptionModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64), **SMALL_HEADS)
    assert mean.processor.pad_fill == (122, 116, 104) and mean.heads.layer_merge is None  # LLaVA's default
    mean.processor.pad_color = (1, 2, 3)
    assert mean.processor.pad_fill == (1, 2, 3)
    for bad in ("black", (256, 0, 0), (1, 2)):
        mean.processor.pad_color = bad
        with pytest.raises(ValueError, match="pad_color"):
            mean.processor.pad_fill
    with pytest.raises(ValueError, match="dice_reduction"):
        PerceptionModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64), dice_reduction="sum", **SMALL_HEADS)
    with pytest.raises(ValueError, match="vision_features"):
        PerceptionModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64),
                         **{**SMALL_HEADS, "mask_decoder": {"vision_features": "last"}})
