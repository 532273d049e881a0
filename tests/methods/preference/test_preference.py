"""Preference optimisation: losses by hand, shared image encoding, reference modes, blind responses."""
import math

import pytest
import torch

from vlsafe.builders import TinyVLM
from vlsafe.data.synthetic.world import generate
from vlsafe.methods.logprobs import response_logprobs
from vlsafe.methods.preference.losses import (
    PairLogps,
    cdpo_loss,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_sum_loss,
)
from vlsafe.methods.preference.module import PreferenceModule

PC, PR = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
RC, RR = torch.tensor([-3.5, -4.0]), torch.tensor([-3.5, -3.0])
# h = (pc - pr) - (rc - rr) = [1.0 - 0.0, -3.0 - (-1.0)] = [1.0, -2.0]


def test_losses_match_hand_computed_values():
    beta = 0.5
    pair = PairLogps(PC, PR, RC, RR)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [-math.log(sigmoid(0.5)), -math.log(sigmoid(-1.0))]
    torch.testing.assert_close(dpo_sigmoid_loss(pair, beta)[0], torch.tensor(expected))
    cdpo = [-(0.9 * math.log(sigmoid(0.5)) + 0.1 * math.log(sigmoid(-0.5))),
            -(0.9 * math.log(sigmoid(-1.0)) + 0.1 * math.log(sigmoid(1.0)))]
    torch.testing.assert_close(cdpo_loss(pair, beta, label_smoothing=0.1)[0], torch.tensor(cdpo))
    torch.testing.assert_close(ipo_sum_loss(pair, beta)[0], torch.tensor([(1.0 - 1.0) ** 2, (-2.0 - 1.0) ** 2]))
    losses, chosen_rewards, rejected_rewards = hinge_loss(pair, beta)
    torch.testing.assert_close(losses, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(chosen_rewards, beta * (PC - RC))
    torch.testing.assert_close(rejected_rewards, beta * (PR - RR))


def test_response_logprobs_sum_and_mean():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    targets = torch.tensor([[0, 1, -100]])
    total = math.log(0.5) + math.log(0.8)
    torch.testing.assert_close(response_logprobs(logits, targets), torch.tensor([total]))
    torch.testing.assert_close(response_logprobs(logits, targets, average=True), torch.tensor([total / 2]))


def _module(**kwargs):
    torch.manual_seed(0)
    return PreferenceModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64), **kwargs)


def _batch(module, n=3):
    encoder = module.data_encoder("fit")
    return encoder.collate([encoder.encode(s) for s in generate(n, seed=2, kinds=["preference"])])


def test_shared_image_encoding_gives_the_same_logps_as_per_sequence():
    module = _module(blind="sum").eval()
    batch = _batch(module)
    assert batch["input_ids"].shape[0] == 3 * 3 and batch["pixel_values"].shape[0] == 3
    with torch.no_grad():
        features, _ = module._features(batch["pixel_values"], 3)
        shared = module._logps(module.vlm, batch, features)
        module.share_image_features = False
        features, _ = module._features(batch["pixel_values"], 3)
        per_sequence = module._logps(module.vlm, batch, features)
    torch.testing.assert_close(shared, per_sequence, atol=1e-5, rtol=0)


def test_reference_modes_agree_before_and_after_training_steps():
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    copy_mode, adapter_mode = _module(lora=lora, reference="copy"), _module(lora=lora, reference="adapter")
    adapter_mode.load_state_dict(copy_mode.state_dict(), strict=False)
    batch = _batch(copy_mode)
    optimizer = torch.optim.SGD([p for p in copy_mode.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # move the policy away from the reference
        loss, _ = copy_mode.compute_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter_mode.vlm.load_state_dict(copy_mode.vlm.state_dict())
    copy_mode.eval(), adapter_mode.eval()
    ref_copy = copy_mode.reference_logps(batch)
    ref_adapter = adapter_mode.reference_logps(batch)
    torch.testing.assert_close(ref_copy, ref_adapter, atol=1e-5, rtol=1e-5)
    policy, _ = copy_mode._features(batch["pixel_values"], 2)
    assert not torch.allclose(copy_mode._logps(copy_mode.vlm, batch, policy), ref_copy), "the policy moved"
    precomputed = _module(lora=lora, reference="precomputed").eval()
    precomputed.vlm.load_state_dict(copy_mode.vlm.state_dict())
    batch["ref_logps"] = ref_copy.view(2, -1)
    losses = [m.compute_loss(batch)[0] for m in (copy_mode, adapter_mode, precomputed)]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses[0], losses[2], atol=1e-5, rtol=1e-5)


def test_blind_sum_adds_a_second_dpo_term():
    module = _module(blind="sum", reference="copy").eval()
    batch = _batch(module)
    with torch.no_grad():
        loss, stats = module.compute_loss(batch)
    # at the start policy == reference, so each DPO term is log 2
    torch.testing.assert_close(loss, torch.tensor(2 * math.log(2)), atol=1e-5, rtol=0)
    assert set(stats) >= {"rewards/blind", "rewards/blind_margins", "logps/blind", "rewards/accuracies"}


def test_missing_or_identical_responses_are_named():
    from vlsafe.data.schema import SampleError

    module = _module(blind="sum")
    encoder = module.data_encoder("fit")
    sample = next(generate(1, seed=2, kinds=["preference"]))
    sample.blind = None
    with pytest.raises(SampleError, match="field 'blind': is missing"):
        encoder.encode(sample)
    sample.blind, sample.rejected = "x", sample.chosen
    with pytest.raises(SampleError, match="identical to chosen"):
        encoder.encode(sample)


@pytest.mark.slow
def test_bpo_raises_the_held_out_safety_rate_over_the_sft_model(tmp_path):
    """The demo pipeline, smaller: SFT on plain QA, then BPO on preference pairs; safety must go up.

    The blind answers are the world's fixed per-question guesses; the demo recipe generates them with the SFT
    model instead (`BlindAnswerWorld(blind_model=...)`, ~35 ms a sample here), which this test leaves out for time.
    """
    import lightning as L

    from vlsafe.builders import FromCheckpoint
    from vlsafe.data.synthetic.module import SyntheticWorld
    from vlsafe.eval.safety import evaluate_safety
    from vlsafe.methods.sft import SFTModule

    quiet = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    L.seed_everything(0)
    sft = SFTModule(vlm=TinyVLM(hidden_size=64, intermediate_size=128), optim={"lr": 1e-3})
    trainer = L.Trainer(max_steps=SFT_STEPS, enable_checkpointing=False, **quiet)
    trainer.fit(sft, SyntheticWorld(root=str(tmp_path / "qa"), kinds=["qa"], train_samples=SFT_STEPS * 16,
                                    val_samples=0, batch_size=16, num_workers=0))
    trainer.save_checkpoint(tmp_path / "sft.ckpt")

    held_out = list(generate(120, seed=0, kinds=["preference"], split="heldout"))
    before = evaluate_safety(sft.vlm, sft.processor, held_out)
    # the template's answer turn, as the demo recipe scores it: the tiny byte-level BPE has no sentencepiece "▁"
    # prefix, so the released format's answer tokenised alone is not the token sequence the SFT model produces
    bpo = PreferenceModule(vlm=FromCheckpoint(str(tmp_path / "sft.ckpt")), blind="sum", sft_weight=1.0,
                           response_format="template", optim={"lr": 3e-3, "warmup_ratio": 0.05})
    L.Trainer(max_steps=BPO_STEPS, enable_checkpointing=False, **quiet).fit(
        bpo, SyntheticWorld(root=str(tmp_path / "pref"), kinds=["preference"], train_samples=BPO_STEPS * 8,
                            val_samples=0, batch_size=8, num_workers=0))
    after = evaluate_safety(bpo.vlm, bpo.processor, held_out)
    print("SFT:", before.summary(), "\nBPO:", after.summary())
    assert after.safety_rate >= before.safety_rate + 0.3
    assert after.over_refusal <= 0.2, "refusing everything is not safety"


SFT_STEPS, BPO_STEPS = 150, 300
