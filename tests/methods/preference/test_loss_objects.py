"""Losses as configured objects: SimPO and ORPO against TRL's own code, no reference model for them, recipe choice.

TRL's `CPOTrainer.cpo_loss` (SimPO) and `ORPOTrainer.odds_ratio_loss` run on minimal stand-in trainers, so the
numbers compared come from TRL's code (trl 1.16, `trl/experimental/{cpo,orpo}/`), not from a transcription.
"""
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

from vlsafe.builders import TinyVLM
from vlsafe.data.synthetic.world import generate
from vlsafe.methods.logprobs import sequence_logps
from vlsafe.methods.preference.losses import (
    LOSS_TYPES,
    DPOLoss,
    ORPOLoss,
    PairLogps,
    RobustDPOLoss,
    SimPOLoss,
    loss_from_type,
    preference_loss,
)
from vlsafe.methods.preference.module import PreferenceModule

_STAND_IN = {"accelerator": SimpleNamespace(device=torch.device("cpu")), "alpha": 0.0}


def _pairs(seed: int = 0, n: int = 6):
    """Summed response log-probs with their token counts, averages from about -20 to -1e-3 per token."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 30, (2, n), generator=g)
    per_token = -torch.exp(torch.empty(2, n, dtype=torch.float64).uniform_(math.log(1e-3), math.log(20), generator=g))
    summed = per_token * tokens
    return PairLogps(summed[0], summed[1], chosen_tokens=tokens[0], rejected_tokens=tokens[1]), per_token


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_equals_trl_cpo_trainer_simpo_loss(label_smoothing):
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    pair, average = _pairs()
    beta, gamma = 2.0, 0.7
    trainer = SimpleNamespace(**_STAND_IN, loss_type="simpo", beta=beta, simpo_gamma=gamma,
                              label_smoothing=label_smoothing)
    expected = cpo.CPOTrainer.cpo_loss(trainer, average[0], average[1])
    got = SimPOLoss(beta=beta, gamma=gamma, label_smoothing=label_smoothing)(pair)
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    if not label_smoothing:  # and the paper's formula, -log sigma(beta (avg_w - avg_l) - gamma)
        paper = [math.log1p(math.exp(-(beta * (w - l) - gamma))) for w, l in zip(average[0].tolist(),
                                                                                  average[1].tolist())]
        torch.testing.assert_close(got[0], torch.tensor(paper, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_orpo_equals_trl_odds_ratio_loss_on_both_sides_of_log_half():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    pair, average = _pairs(seed=1, n=40)
    assert (average > -math.log(2)).any() and (average < -math.log(2)).any(), "both log1mexp branches"
    average = average.float()  # TRL computes in float32 (orpo_trainer.py:690-691)
    pair = PairLogps(pair.policy_chosen.float(), pair.policy_rejected.float(), chosen_tokens=pair.chosen_tokens,
                     rejected_tokens=pair.rejected_tokens)
    trainer = SimpleNamespace(**_STAND_IN, beta=0.25)
    trl_or, chosen_rewards, rejected_rewards, _, _ = orpo.ORPOTrainer.odds_ratio_loss(trainer, average[0], average[1])
    losses, mine_chosen, mine_rejected = ORPOLoss(beta=0.25)(pair)
    # TRL returns beta log sigma(log odds) and subtracts its mean from the NLL (orpo_trainer.py:848)
    torch.testing.assert_close(losses, -trl_or, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mine_chosen, chosen_rewards)
    torch.testing.assert_close(mine_rejected, rejected_rewards)


def _module(**kwargs) -> PreferenceModule:
    torch.manual_seed(0)
    return PreferenceModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64), **kwargs)


def _batch(module: PreferenceModule, n: int = 3):
    encoder = module.data_encoder("fit")
    return encoder.collate([encoder.encode(s) for s in generate(n, seed=2, kinds=["preference"])])


def test_orpo_module_loss_is_nll_plus_trl_odds_ratio_term_on_full_forward_logps():
    """The module's ORPO loss (shared-prompt forwards, summed log-probs divided by token counts) equals
    chosen token-mean NLL - mean(TRL's beta log sigma(log odds)) on per-sequence averaged log-probs."""
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    module = _module(loss=ORPOLoss(beta=0.5)).eval()
    batch = _batch(module)
    with torch.no_grad():
        loss, stats = module.compute_loss(batch)
        features, _ = module._features(batch["pixel_values"], 2)
        average = sequence_logps(module.vlm, batch, features, average=True).view(2, -1).double()
    trl_or = orpo.ORPOTrainer.odds_ratio_loss(SimpleNamespace(**_STAND_IN, beta=0.5), average[0], average[1])[0]
    expected = -average[0].mean() - trl_or.mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(stats["rewards/chosen"].mean()) == pytest.approx(float(0.5 * average[0].mean()), rel=1e-5)


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared tensors (a frozen vision tower) counted once


@pytest.mark.parametrize("loss", [SimPOLoss(), ORPOLoss()], ids=["simpo", "orpo"])
def test_reference_free_losses_build_no_reference_and_train(loss):
    dpo = _module(reference="copy", train_vision=True)
    free = _module(loss=loss, train_vision=True)
    assert free.reference_vlm is None and free.reference_projector is None and free.reference_mode == "none"
    assert _parameters(free) == _parameters(free.vlm)
    assert _parameters(dpo) == 2 * _parameters(free), "the DPO module holds a whole frozen copy"
    batch = _batch(free)
    optimizer = torch.optim.SGD([p for p in free.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(3):
        loss_value, stats = free.compute_loss(batch)
        loss_value.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss_value.detach()))
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert float(stats["rewards/margins"].mean()) == pytest.approx(
        float((stats["rewards/chosen"] - stats["rewards/rejected"]).mean()))


def test_loss_type_strings_map_to_the_classes_and_clashes_are_named():
    pair = PairLogps(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -4.0]),
                     torch.tensor([-3.5, -3.0]), torch.tensor([3, 4]), torch.tensor([2, 5]))
    for name in LOSS_TYPES:
        smoothing = 0.2 if name in ("cdpo", "robust") else 0.0
        for mine, old in zip(loss_from_type(name, 0.3, smoothing)(pair), preference_loss(name, pair, 0.3, smoothing)):
            torch.testing.assert_close(mine, old)
    assert isinstance(loss_from_type("robust", 0.1, 0.2), RobustDPOLoss)
    with pytest.raises(ValueError, match=r"drop beta: 0.5"):
        _module(loss=SimPOLoss(beta=2.0), beta=0.5)
    with pytest.raises(ValueError, match="needs no reference model; reference='precomputed'"):
        _module(loss=ORPOLoss(), reference="precomputed")
    with pytest.raises(ValueError, match="reference='none' needs a reference-free loss"):
        _module(reference="none")
    with pytest.raises(ValueError, match="needs reference log-probs"):
        DPOLoss()(PairLogps(pair.policy_chosen, pair.policy_rejected))
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        RobustDPOLoss(label_smoothing=0.5)
    same = _module(loss=DPOLoss(beta=0.1), beta=0.1, loss_type="sigmoid")  # agreeing settings are fine
    assert same.hparams["loss"] == {"class_path": "vlsafe.methods.preference.losses.DPOLoss", "init_args": {"beta": 0.1}}


def test_a_recipe_chooses_simpo_by_class_path_fits_without_a_reference_and_resumes(tmp_path, monkeypatch):
    from vlsafe.cli import VLSafeCLI
    from vlsafe.reliability.recipe_keys import check_recipe_keys

    monkeypatch.setattr(sys, "argv", ["tools/fit.py"])
    recipe = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "vlsafe.methods.preference.module.PreferenceModule", "init_args": {
            "vlm": {"class_path": "vlsafe.builders.TinyVLM", "init_args": {"hidden_size": 32,
                                                                               "intermediate_size": 64}},
            "loss": {"class_path": "vlsafe.methods.preference.losses.SimPOLoss", "init_args": {"beta": 2.5, "gamma": 0.3}},
            "response_format": "template"}},
        "data": {"class_path": "vlsafe.data.synthetic.module.SyntheticWorld", "init_args": {
            "root": str(tmp_path / "world"), "kinds": ["preference"], "train_samples": 8, "val_samples": 0,
            "batch_size": 4, "num_workers": 0}}}
    path = tmp_path / "simpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert check_recipe_keys(path) == []
    cli = VLSafeCLI(args=["fit", "--config", str(path)])
    module = cli.model
    assert isinstance(module.loss_fn, SimPOLoss) and (module.loss_fn.beta, module.loss_fn.gamma) == (2.5, 0.3)
    assert module.reference_vlm is None and cli.trainer.global_step == 2
    assert module.reference_mode == "none" and module.hparams["reference"] == "copy", "resolved; recorded as given"
    assert module.hparams["loss"]["init_args"] == {"beta": 2.5, "gamma": 0.3, "label_smoothing": 0.0}
    # the recorded hyperparameters compare equal to the recipe's, so --ckpt_path continues the run
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    resumed = VLSafeCLI(args=["fit", "--config", str(path), "--ckpt_path", str(checkpoint), "--trainer.max_steps", "3"])
    assert resumed.trainer.global_step == 3 and isinstance(resumed.model.loss_fn, SimPOLoss)
