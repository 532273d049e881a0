"""SFT packing (issue 19 §3): several samples per row give the padded batch's loss and gradients, exactly."""
import inspect
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlsafe.builders import TinyVLM
from vlsafe.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlsafe.core.vlm import packed_attention_mask
from vlsafe.data.encoding.encoders import ConversationEncoder
from vlsafe.data.encoding.packing import PackedConversationEncoder, plan_rows
from vlsafe.data.encoding.processor import image_bytes
from vlsafe.data.schema import Sample
from vlsafe.methods.logprobs import masked_lm_loss, supervised_positions
from vlsafe.methods.sft import SFTModule
from vlsafe.ops.checkpoint_guard import resume_differences


def _image(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return image_bytes(Image.fromarray(pixels))


def _samples() -> list[Sample]:
    """Very different lengths (a few tokens to a few hundred), two images, one, none."""
    long_answer = " ".join(f"the red cube {i} sits left of the blue ball" for i in range(30))
    return [
        Sample("short-image", [{"role": "user", "content": "<image>\nWhat is it?"},
                               {"role": "assistant", "content": "A cube."}], images=[_image(1)]),
        Sample("text-only", [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]),
        Sample("long-two-images", [{"role": "user", "content": "<image>\n<image>\nDescribe both in detail."},
                                   {"role": "assistant", "content": long_answer},
                                   {"role": "user", "content": "And the colours?"},
                                   {"role": "assistant", "content": "Red and blue."}],
               images=[_image(2), _image(3)]),
        Sample("medium-text", [{"role": "user", "content": "Count " + "one two three " * 8},
                               {"role": "assistant", "content": "four five six " * 5}]),
        Sample("medium-image", [{"role": "user", "content": "<image>\nWhere is the ball?"},
                                {"role": "assistant", "content": "Left of the cube, near the edge."}],
               images=[_image(4)]),
    ]


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return SFTModule(vlm=TinyVLM(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, max_length=1024),
                     packing=True)


def _loss_and_grads(module: SFTModule, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.vlm.zero_grad(set_to_none=True)
    loss, _, _ = module._loss(batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.vlm.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_batch_has_the_padded_batch_loss_and_gradients(module, attention):
    """Same samples padded (one per row) and packed (several per row, positions restarting, block-diagonal
    attention): loss within 1e-5 and every parameter gradient close, under SDPA's boolean and eager's additive
    mask. A packed row whose attention leaked across samples or whose positions ran on would move both."""
    module.vlm.llm.config._attn_implementation = attention
    items = [ConversationEncoder(module.processor).encode(s) for s in _samples()]
    padded = ConversationEncoder(module.processor).collate(items)
    packed = PackedConversationEncoder(module.processor).collate(items)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0], "the short samples share rows"
    assert packed["input_ids"].numel() < 0.7 * padded["input_ids"].numel(), "packing removes most of the padding"
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    assert sorted(packed["ids"]) == sorted(padded["ids"]) and packed["pixel_values"].shape[0] == 4
    try:
        padded_loss, padded_grads = _loss_and_grads(module, padded)
        packed_loss, packed_grads = _loss_and_grads(module, packed)
    finally:
        module.vlm.llm.config._attn_implementation = "sdpa"
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=0)
    assert padded_grads.keys() == packed_grads.keys() and any(n.startswith("projector.") for n in padded_grads)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_one_row_varlen_path_gives_the_padded_loss(module):
    """The flash-attention path (all rows flattened into one, no mask, samples read from the position ids) run
    through SDPA on CPU, where transformers builds the block mask from the same position ids: padded loss within
    1e-5. The flash kernels themselves need a GPU and are untested here."""
    items = [ConversationEncoder(module.processor).encode(s) for s in _samples()]
    padded = ConversationEncoder(module.processor).collate(items)
    packed = PackedConversationEncoder(module.processor).collate(items)
    with torch.no_grad():
        padded_loss = module._loss(padded)[0]
        positions, targets = supervised_positions(packed["labels"])
        embeddings = module.vlm.embed(packed["input_ids"], module.vlm.encode_images(packed["pixel_values"]))
        logits = module.vlm._varlen_forward(embeddings, packed["position_ids"], positions, {}).logits
    assert logits.shape[:2] == targets.shape
    torch.testing.assert_close(masked_lm_loss(logits, targets)[0], padded_loss, atol=1e-5, rtol=0)


def test_positions_restart_and_attention_stays_inside_each_sample(module):
    items = [ConversationEncoder(module.processor).encode(s) for s in _samples()]
    lengths = {item["id"]: len(item["input_ids"]) for item in items}
    packed = PackedConversationEncoder(module.processor).collate(items)
    starts = (packed["position_ids"] == 0) & (packed["attention_mask"] == 1)
    assert int(starts.sum()) == len(items), "one position 0 per sample"
    row_of = {}
    cursor = 0
    for r in range(packed["input_ids"].shape[0]):
        real = int(packed["attention_mask"][r].sum())
        row_positions = packed["position_ids"][r, :real].tolist()
        segments = [i for i, p in enumerate(row_positions) if p == 0] + [real]
        for start, end in itertools.pairwise(segments):
            sample_id = packed["ids"][cursor]
            assert end - start == lengths[sample_id] and row_positions[start:end] == list(range(end - start))
            assert packed["labels"][r, start] == IGNORE_INDEX, "nothing learns to predict a sample's first token"
            row_of[sample_id] = r
            cursor += 1
    assert cursor == len(items) and len(set(row_of.values())) == packed["input_ids"].shape[0]
    # image slots follow `ids` order, which is the order of pixel_values
    assert int((packed["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == 4 * module.processor.num_image_tokens
    mask = packed_attention_mask(torch.tensor([[0, 1, 2, 0, 1, 0]]), torch.float32, additive=False)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_plan_rows_fills_rows_first_fit_decreasing_and_never_splits_a_sample():
    assert plan_rows([700, 120, 90, 600, 50, 40], capacity=700) == [[0], [2, 3], [1, 4, 5]]
    assert plan_rows([900, 100], capacity=500) == [[0], [1]], "a sample over capacity gets a row of its own"
    with pytest.raises(ValueError, match="capacity"):
        plan_rows([3], capacity=0)


def test_packing_is_a_named_switch_recorded_in_hparams_and_off_by_default(module):
    assert module.hparams["packing"] is True and module.hparams["packing_max_tokens"] is None
    unpacked = SFTModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64, num_layers=1))
    written_before_the_switch = {k: v for k, v in unpacked.hparams.items() if not k.startswith("packing")}
    assert resume_differences(written_before_the_switch, dict(unpacked.hparams)) == ([], []), "old runs resume"
    assert isinstance(module.data_encoder("fit"), PackedConversationEncoder)
    parameters = inspect.signature(SFTModule).parameters  # the paper recipes train on padded batches, as released
    assert parameters["packing"].default is None and parameters["packing_max_tokens"].default is None
    # the CLI compares the recipe's parsed arguments (the signature's defaults) with an old checkpoint's hparams
    recipe = {**dict(unpacked.hparams), **{name: parameters[name].default for name in ("packing", "packing_max_tokens")}}
    assert resume_differences(written_before_the_switch, recipe) == ([], [])
    assert isinstance(SFTModule.data_encoder(SimpleNamespace(packing=False, processor=module.processor), "fit"),
                      ConversationEncoder)
    with pytest.raises(ValueError, match="packing_max_tokens"):
        SFTModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64, num_layers=1), packing=True, packing_max_tokens=0)
    module.vlm.llm.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match="flex_attention"):
            module.vlm(torch.tensor([[1, 2, 1]]), torch.ones(1, 3), position_ids=torch.tensor([[0, 1, 0]]))
    finally:
        module.vlm.llm.config._attn_implementation = "sdpa"


def test_packed_training_keeps_the_loader_length_and_resume_position_and_trains(tmp_path):
    """Packing happens inside each batch of B samples: the loader's len() and a mid-epoch resume position are
    those of padded batches, and a Lightning fit on packed batches runs."""
    import lightning as L

    from vlsafe.data.datamodule import ShardDataModule
    from vlsafe.data.synthetic.world import write_world

    write_world(tmp_path / "train", 30, seed=0, kinds=["qa", "caption"], split="train", max_samples_per_shard=16)
    torch.manual_seed(0)
    module = SFTModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64, num_layers=1), packing=True,
                       optim={"lr": 1e-3})

    def epoch(encoder, skip: int = 0) -> list[list[str]]:
        data = ShardDataModule(train=str(tmp_path / "train"), batch_size=4, num_workers=0, shuffle_buffer=8)
        data.connect(encoder)
        stream = data.stream("fit")
        stream.resume_at(0, skip)
        return len(stream), [sorted(batch["ids"]) for batch in stream]

    padded_len, padded = epoch(ConversationEncoder(module.processor))
    packed_len, packed = epoch(module.data_encoder("fit"))
    assert packed_len == padded_len == len(packed) == 8 and packed == padded
    assert epoch(module.data_encoder("fit"), skip=3)[1] == packed[3:], "a resume continues where it stopped"
    data = ShardDataModule(train=str(tmp_path / "train"), batch_size=4, num_workers=0)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
