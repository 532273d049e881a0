"""The shared core: splicing, padding invariance, several images, generation, LoRA, trainability."""
import pytest
import torch

from vlsafe.constants import IMAGE_TOKEN_INDEX
from vlsafe.core.lora import LoraSettings, count_parameters, set_trainable
from vlsafe.data.encoding.encoders import ConversationEncoder, PromptEncoder
from vlsafe.data.synthetic.world import generate


@pytest.fixture(scope="module")
def core(tiny_vlm_builder):
    vlm, processor = tiny_vlm_builder.build()
    return vlm.eval(), processor


def _batch(processor, samples, side):
    encoder = ConversationEncoder(processor)
    items = [encoder.encode(s) for s in samples]
    batch = processor.collate_text([i["input_ids"] for i in items], [i["labels"] for i in items], side)
    batch["pixel_values"] = torch.cat([i["pixel_values"] for i in items])
    return batch, [len(i["input_ids"]) for i in items]


def test_logits_do_not_depend_on_padding_side(core):
    vlm, processor = core
    samples = list(generate(3, seed=5, kinds=["qa", "caption"]))
    right, lengths = _batch(processor, samples, "right")
    left, _ = _batch(processor, samples, "left")
    with torch.no_grad():
        r = vlm(right["input_ids"], right["attention_mask"], right["pixel_values"]).logits
        l_ = vlm(left["input_ids"], left["attention_mask"], left["pixel_values"]).logits
        for row, n in enumerate(lengths):
            alone, _ = _batch(processor, samples[row:row + 1], "right")
            single = vlm(alone["input_ids"], alone["attention_mask"], alone["pixel_values"]).logits[0]
            width = r.shape[1]
            torch.testing.assert_close(r[row, :n], single, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(l_[row, width - n:], single, atol=1e-5, rtol=1e-4)


def test_image_features_land_on_their_own_placeholders(core):
    """Two images in one row, none in another: each feature block goes to its own slots, in order."""
    vlm, processor = core
    k = processor.num_image_tokens
    ids = torch.tensor([[5, *[IMAGE_TOKEN_INDEX] * k, 6, *[IMAGE_TOKEN_INDEX] * k, 7],
                        [5, 6, 7, 8, 9, 10, 11, *[0] * (2 * k - 4)]])
    features = torch.randn(2, k, vlm.llm.config.hidden_size)
    embedded = vlm.embed(ids, features)
    torch.testing.assert_close(embedded[0, 1:1 + k], features[0])
    torch.testing.assert_close(embedded[0, 2 + k:2 + 2 * k], features[1])
    table = vlm.llm.get_input_embeddings().weight
    torch.testing.assert_close(embedded[1, :7], table[torch.tensor([5, 6, 7, 8, 9, 10, 11])])
    with pytest.raises(ValueError, match="do not match"):
        vlm.embed(ids, features[:1])


def test_precomputed_image_features_equal_pixel_path(core):
    vlm, processor = core
    batch, _ = _batch(processor, list(generate(2, seed=1)), "right")
    with torch.no_grad():
        from_pixels = vlm(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        features = vlm.encode_images(batch["pixel_values"])
        from_features = vlm(batch["input_ids"], batch["attention_mask"], image_features=features).logits
    torch.testing.assert_close(from_pixels, from_features)


def test_batched_left_padded_generation_equals_one_by_one(core):
    vlm, processor = core
    samples = list(generate(3, seed=2, kinds=["qa", "caption"]))
    encoder = PromptEncoder(processor)
    batch = encoder.collate([encoder.encode(s) for s in samples])
    assert len({len(encoder.encode(s)["input_ids"]) for s in samples}) > 1, "need different prompt lengths"
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=processor.pad_token_id,
                  eos_token_id=processor.tokenizer.eos_token_id)
    together = vlm.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], **kwargs)
    for row, sample in enumerate(samples):
        one = encoder.collate([encoder.encode(sample)])
        alone = vlm.generate(one["input_ids"], one["attention_mask"], one["pixel_values"], **kwargs)[0]
        got = together[row][:len(alone)]
        assert got.tolist() == alone.tolist()


def test_right_padded_batch_generation_is_refused(core):
    vlm, processor = core
    encoder = ConversationEncoder(processor)
    samples = list(generate(2, seed=3, kinds=["qa", "caption"]))
    batch, lengths = _batch(processor, samples, "right")
    assert lengths[0] != lengths[1]
    with pytest.raises(ValueError, match="left padding"):
        vlm.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=2)
    del encoder


def test_lora_trains_adapters_and_projector_only(tiny_vlm_builder):
    vlm, _ = tiny_vlm_builder.build()
    set_trainable(vlm, train_vision=False, train_projector=True, lora=LoraSettings(r=4, alpha=8))
    names = [n for n, p in vlm.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("projector.") for n in names)
    assert any(n.startswith("projector.") for n in names) and any("lora_A" in n for n in names)
    assert not any("lm_head" in n for n in names)
    trainable, total = count_parameters(vlm)
    assert 0 < trainable < total / 2


def test_text_only_batch_still_reaches_the_projector(core, tiny_vlm_builder):
    """DDP needs a gradient for every trainable parameter, even on batches without images."""
    vlm, processor = tiny_vlm_builder.build()
    vlm.train()
    messages = [{"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": "red"}]
    encoded = processor.encode_conversation(messages)
    batch = processor.collate_text([encoded.input_ids], [encoded.labels])
    logits = vlm(batch["input_ids"], batch["attention_mask"]).logits
    logits.sum().backward()
    assert all(p.grad is not None for p in vlm.projector.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(tiny_vlm_builder):
    from vlsafe.core.lora import enable_gradient_checkpointing

    def grads(checkpointing: bool):
        vlm, processor = tiny_vlm_builder.build()
        set_trainable(vlm, train_vision=True)
        if checkpointing:
            enable_gradient_checkpointing(vlm, vision=True)
        vlm.train()
        batch, _ = _batch(processor, list(generate(2, seed=7)), "right")
        vlm(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and any(n.startswith("vision.") for n in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-4)
