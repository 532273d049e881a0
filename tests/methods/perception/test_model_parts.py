"""Heads, token embeddings and the exact `<loc>` splice, on a tiny model."""
import pytest
import torch

from vlsafe.builders import TinyVLM
from vlsafe.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlsafe.data.grounding import LOC_TOKEN
from vlsafe.data.synthetic.world import generate
from vlsafe.methods.perception.heads import (
    BoxDecoder,
    BoxEncoder,
    MaskDecoder,
    MaskDecoderSettings,
    PerceptionHeads,
    occupancy_box,
)
from vlsafe.methods.perception.module import PerceptionModule
from vlsafe.methods.perception.splice import (
    splice_loc_embeddings,
    target_loc_context,
    target_loc_hidden,
)

SMALL_HEADS = {"box_hidden": 64, "mask_decoder": {"dim": 32, "heads": 2, "depth": 1, "mlp_dim": 64}}


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return PerceptionModule(vlm=TinyVLM(hidden_size=64, intermediate_size=128), **SMALL_HEADS)


def test_loc_token_rows_start_at_the_mean_of_the_old_rows():
    vlm, processor = TinyVLM(hidden_size=32, intermediate_size=64).build()
    old_in = vlm.llm.get_input_embeddings().weight.detach().clone()
    old_out = vlm.llm.get_output_embeddings().weight.detach().clone()
    module = PerceptionModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64), **SMALL_HEADS)
    tokenizer, llm = module.processor.tokenizer, module.vlm.llm
    loc = module.loc_token_id
    assert loc == len(tokenizer) - 1 == old_in.shape[0]
    torch.testing.assert_close(llm.get_input_embeddings().weight[:loc], old_in)
    torch.testing.assert_close(llm.get_input_embeddings().weight[loc], old_in.mean(0))
    torch.testing.assert_close(llm.get_output_embeddings().weight[loc], old_out.mean(0))
    ids = tokenizer("Answer: <loc>.", add_special_tokens=False).input_ids
    assert ids.count(loc) == 1, f"{LOC_TOKEN} must be one token"


def test_splice_replaces_exactly_the_loc_positions_with_left_and_right_padding():
    loc = 7  # padding id 0
    right = torch.tensor([[1, 7, 2, 7, 0, 0], [3, 4, 7, 5, 6, 2]])
    left = torch.tensor([[0, 0, 1, 7, 2, 7], [3, 4, 7, 5, 6, 2]])
    for ids in (right, left):
        embeddings = torch.randn(2, 6, 5)
        values = torch.randn(3, 5)
        out = splice_loc_embeddings(embeddings, ids, loc, values)
        rows, cols = (ids == loc).nonzero(as_tuple=True)
        assert torch.equal(out[rows, cols], values), "row-major order: row 0's <loc>s, then row 1's"
        keep = ids != loc
        assert torch.equal(out[keep], embeddings[keep])
    with pytest.raises(ValueError, match="3 <loc> token"):
        splice_loc_embeddings(torch.zeros(2, 6, 5), right, loc, torch.zeros(2, 5))


def test_question_context_is_the_text_after_the_image_and_before_each_supervised_loc():
    """What `read_question` lets the decoder see: no padding, no image slot or system prompt before it, nothing
    at or after the `<loc>` being decoded, and one row per supervised `<loc>` in `target_loc_hidden`'s order."""
    loc, img, pad = 7, IMAGE_TOKEN_INDEX, 0
    ids = torch.tensor([[1, 2, img, img, 3, 4, 7, 5, 7, pad],      # two answer <loc>s
                        [1, img, 3, 7, 4, 5, 6, 7, 8, 9],           # a question <loc> (col 3), one answer <loc>
                        [1, 2, 3, 4, 7, 5, pad, pad, pad, pad]])    # no image: all text counts
    mask = (ids != pad).long()
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, col in ((0, 6), (0, 8), (1, 7), (2, 4)):
        labels[row, col] = loc
    hidden = torch.randn(3, 10, 4)
    context = target_loc_context(hidden, ids, mask, labels, loc)
    states, _ = target_loc_hidden(hidden, ids, labels, loc)
    assert context.states.shape[0] == states.shape[0] == 4
    expected = [[4, 5], [4, 5, 6, 7], [2, 3, 4, 5, 6], [0, 1, 2, 3]]
    for k, columns in enumerate(expected):
        assert context.valid[k].nonzero().squeeze(-1).tolist() == columns, k
        row = (0, 0, 1, 2)[k]
        torch.testing.assert_close(context.states[k, columns], hidden[row, columns])


def test_module_feeds_box_encodings_at_loc_positions_in_a_padded_batch(module):
    """Capture what the LLM receives: encoded boxes exactly at `<loc>`, the core's embeddings elsewhere."""
    encoder = module.data_encoder("fit")
    samples = list(generate(3, seed=5, kinds=["grounding"]))
    samples[1].messages[0]["content"] += " Think of " + "<boxes> and " * 2  # input-side boxes; longer row
    samples[1].boxes = [[1, 2, 10, 12], [20, 20, 30, 40]] + samples[1].boxes
    samples[1].messages[0]["content"] = samples[1].messages[0]["content"].replace("<boxes>", "[0.1, 0.1, 0.2, 0.2]", 1)
    batch = encoder.collate([encoder.encode(s) for s in samples])
    assert bool((batch["attention_mask"] == 0).any()), "the batch must contain padding"
    assert batch["loc_boxes"].shape[0] == 5 and batch["loc_is_target"].tolist() == [True, False, False, True, True]
    seen = {}
    hook = module.vlm.llm.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            module.eval().forward_batch(batch)
            reference = module.vlm.embed(batch["input_ids"], module.vlm.encode_images(batch["pixel_values"]))
            encoded = module.heads.box_encoder(batch["loc_boxes"])
    finally:
        hook.remove()
        module.train()
    fed = seen["inputs_embeds"]
    is_loc = batch["input_ids"] == module.loc_token_id
    assert int(is_loc.sum()) == 5
    assert torch.equal(fed[is_loc], encoded)
    assert torch.equal(fed[~is_loc], reference[~is_loc])
    hidden = torch.arange(3 * batch["input_ids"].shape[1], dtype=torch.float).view(3, -1, 1)
    states, is_target = target_loc_hidden(hidden, batch["input_ids"], batch["labels"], module.loc_token_id)
    rows, cols = is_loc.nonzero(as_tuple=True)
    assert torch.equal(states.squeeze(-1), hidden[rows[is_target], cols[is_target] - 1].squeeze(-1))


def test_box_decoder_starts_centred_and_always_returns_valid_boxes():
    decoder = BoxDecoder(16, 32)
    torch.testing.assert_close(decoder(torch.randn(3, 16)), torch.tensor([[0.25, 0.25, 0.75, 0.75]]).expand(3, 4))
    torch.nn.init.normal_(decoder.mlp.layers[-1].weight, std=3.0)
    boxes = decoder(torch.randn(100, 16))
    assert bool((boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all())


def test_occupancy_box_of_a_binary_mask_is_its_bounding_box():
    """A disc and an L-shape (not boxes themselves) read as exactly their bounding boxes; soft masks move smoothly."""
    side = 32
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    disc = ((xs - 10.5) ** 2 + (ys - 20.5) ** 2 <= 36).float()  # pixels 5..16 x 15..26
    ell = torch.zeros(side, side)
    ell[2:12, 20:23] = 1
    ell[9:12, 20:30] = 1
    centre, size = occupancy_box(torch.stack([disc, ell]))
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1) * side
    torch.testing.assert_close(boxes, torch.tensor([[5.0, 15.0, 17.0, 27.0], [20.0, 2.0, 30.0, 12.0]]))
    soft = ell.clone().requires_grad_()
    occupancy_box(soft.unsqueeze(0))[1].sum().backward()
    assert soft.grad.abs().sum() > 0, "differentiable, so box losses reach the mask logits"


def test_box_decoder_setting_picks_the_image_read_or_the_released_hidden_state_mlp():
    torch.manual_seed(0)
    settings = MaskDecoderSettings(dim=32, heads=2, depth=1, mlp_dim=32, pixel_skip=False)
    hidden, vision = torch.randn(3, 16), torch.randn(2, 25, 24)
    images = torch.tensor([1, -1, 0])  # the middle <loc> has no image
    released = PerceptionHeads(16, 24, 20, box_hidden=32, mask=settings, box_decoder="mlp")
    torch.nn.init.normal_(released.box_decoder.mlp.layers[-1].weight)
    out = released.decode(hidden, images, vision, None, want_masks=torch.tensor([True, True, False]))
    torch.testing.assert_close(out.boxes, released.box_decoder(hidden))
    assert out.mask_rows.tolist() == [0] and out.mask_logits.shape == (1, 20, 20), "masks only where asked and imaged"
    reading = PerceptionHeads(16, 24, 20, box_hidden=32, mask=settings)
    torch.nn.init.normal_(reading.box_decoder.mlp.layers[-1].weight)
    out = reading.decode(hidden, images, vision, None, want_masks=False)
    assert out.mask_logits is None
    torch.testing.assert_close(out.boxes[1], reading.box_decoder(hidden[1:2])[0], msg="no image: the hidden-state MLP")
    state = reading.mask_decoder.attend(hidden[[0, 2]], vision[[1, 0]])
    torch.testing.assert_close(out.boxes[[0, 2]], reading.mask_decoder.boxes(state, reading.mask_decoder.masks(state)))
    assert not torch.allclose(out.boxes[[0, 2]], reading.box_decoder(hidden[[0, 2]]))
    with pytest.raises(ValueError, match="box_decoder must be one of"):
        PerceptionHeads(16, 24, 20, box_decoder="attention")


def test_box_encoder_then_decoder_round_trip_after_a_short_fit():
    """Encoder and decoder can carry a box through a hidden vector: fit decoder(encoder(b)) = b."""
    torch.manual_seed(0)
    encoder, decoder = BoxEncoder(32, 64), BoxDecoder(32, 64)
    optimiser = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=3e-3)

    def random_boxes(n):
        corners = torch.rand(n, 2, 2).sort(dim=1).values
        return torch.cat([corners[:, 0], corners[:, 1]], dim=-1)[:, [0, 1, 2, 3]]

    for _ in range(400):
        boxes = random_boxes(128)
        loss = (decoder(encoder(boxes)) - boxes).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    held_out = random_boxes(256)
    with torch.no_grad():
        error = (decoder(encoder(held_out)) - held_out).abs().mean().item()
    assert error < 0.02, error


def test_mask_decoder_outputs_frame_sized_logits_with_and_without_pixel_skip():
    for skip in (True, False):
        decoder = MaskDecoder(16, 24, out_size=40, settings=MaskDecoderSettings(dim=32, heads=2, depth=1,
                                                                               mlp_dim=32, pixel_skip=skip))
        logits = decoder(torch.randn(2, 16), torch.randn(2, 25, 24), torch.randn(2, 3, 40, 40))
        assert logits.shape == (2, 40, 40) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="square patch grid"):
        decoder(torch.randn(1, 16), torch.randn(1, 24, 24))


def test_lora_trains_adapters_heads_and_embeddings_only():
    module = PerceptionModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64), train_projector=False,
                              lora={"r": 16, "alpha": 64, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
                              **SMALL_HEADS)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable, "something trains"
    for name in trainable:
        assert "lora_" in name or name.startswith("heads.") or "embed_tokens" in name or "lm_head" in name, name
    assert any(n.startswith("heads.mask_decoder") for n in trainable)
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    assert not any("mlp" in n and "heads" not in n for n in trainable), "LoRA only on q/v"
    encoder = module.data_encoder("fit")
    batch = encoder.collate([encoder.encode(s) for s in generate(2, seed=1, kinds=["grounding"])])
    loss, terms, _ = module.compute_loss(batch)
    loss.backward()
    assert set(terms) >= {"lm", "box_l1", "box_giou", "mask_bce", "mask_dice"}
    lora_grads = [p.grad for n, p in module.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
