"""Detoxifier: masked prompt, EOS target, refusal when both answers are unsafe, one prompt, and learning."""
import pytest
import torch

from vlsafe.constants import IGNORE_INDEX
from vlsafe.data.synthetic.world import generate
from vlsafe.methods.protector.builders import TinyTextLM
from vlsafe.methods.protector.detoxifier_module import DetoxifierModule
from vlsafe.methods.protector.encoders import REFUSAL, format_detox_prompt

QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
             enable_checkpointing=False)
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4}


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return DetoxifierModule(model=TinyTextLM(**TINY), optim={"lr": 3e-3, "warmup_ratio": 0.0, "schedule": "constant"},
                            max_new_tokens=24, preset="vlsafe")


def by_case(case):
    return next(s for s in generate(60, seed=4, kinds=["harm_text"]) if s.meta["task"] == case)


def test_prompt_is_masked_target_ends_with_eos_and_inference_uses_the_same_prompt(module):
    from vlsafe.methods.protector import Detoxifier

    tok = module.tokenizer
    encoder = module.data_encoder("fit")
    sample = by_case("refusal_vs_compliance")
    item = encoder.encode(sample)
    prompt = tok(format_detox_prompt(sample.messages[0]["content"], sample.rejected))["input_ids"]
    n = len(prompt)
    assert item["input_ids"][:n] == prompt and all(label == IGNORE_INDEX for label in item["labels"][:n])
    assert item["labels"][n:] == item["input_ids"][n:] and item["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(item["input_ids"][n:-1]) == sample.chosen
    both_unsafe = encoder.encode(by_case("both_unsafe"))
    assert both_unsafe["target"] == REFUSAL
    predict = module.data_encoder("predict").encode(sample)
    assert predict["input_ids"] == prompt                    # generation prompt == training prompt
    detox = Detoxifier.from_module(module)
    assert tok(format_detox_prompt(sample.messages[0]["content"], sample.rejected, detox.template))["input_ids"] \
        == prompt


@pytest.fixture(scope="module")
def pairs_world(tmp_path_factory):
    from vlsafe.data.synthetic.text import ProtectorWorld

    world = ProtectorWorld(root=str(tmp_path_factory.mktemp("detox-world")), harm_text_samples=640,
                           harm_qa_samples=0, val_fraction=0.1, batch_size=16, num_workers=0)
    world.prepare_data()
    return world


def test_detoxifier_learns_the_rewrites(module, pairs_world, one_thread):
    import lightning as L

    def val_loss():
        return L.Trainer(**QUIET).validate(module, datamodule=pairs_world, verbose=False)[0]["val/loss"]

    with one_thread():
        before = val_loss()
        L.Trainer(max_steps=40, num_sanity_val_steps=0, limit_val_batches=0, **QUIET).fit(module,
                                                                                          datamodule=pairs_world)
        after = val_loss()
    print(f"detoxifier val loss {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before, (before, after)
