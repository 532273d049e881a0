"""vlsafe's preference losses against TRL's own `DPOTrainer._compute_loss` on the same log-probs.

TRL's method runs on a minimal stand-in trainer whose "model" returns given per-token log-probs, with
precomputed reference log-probs, so the numbers compared come from TRL's code, not a transcription.
"""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from vlsafe.methods.preference.losses import (
    LOSS_TYPES,
    PairLogps,
    RobustDPOLoss,
    check_loss,
    preference_loss,
)

B, WIDTH = 4, 12


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


def _inputs(seed: int = 0, batch: int = B):
    """A TRL batch ([chosen; rejected] rows) with responses of different lengths, and its per-token log-probs."""
    g = torch.Generator().manual_seed(seed)
    completion = torch.zeros(2 * batch, WIDTH, dtype=torch.long)
    lengths = torch.randint(1, WIDTH - 2, (2 * batch,), generator=g)
    for row, n in enumerate(lengths.tolist()):
        completion[row, WIDTH - n:] = 1  # prompt first, completion last (position 0 is never completion)
    token_logps = -torch.rand(2 * batch, WIDTH - 1, generator=g, dtype=torch.float64) * 3 * completion[:, 1:]
    ref = -torch.rand(2 * batch, generator=g, dtype=torch.float64) * 3 * lengths
    inputs = {"input_ids": torch.ones(2 * batch, WIDTH, dtype=torch.long),
              "attention_mask": torch.ones(2 * batch, WIDTH, dtype=torch.long), "completion_mask": completion,
              "ref_chosen_logps": ref[:batch], "ref_rejected_logps": ref[batch:]}
    return inputs, token_logps


def _trl_loss(loss_type: str, beta: float, label_smoothing: float, inputs, token_logps):
    trl = pytest.importorskip("trl.trainer.dpo_trainer")
    zeros = torch.zeros_like(token_logps)
    outputs = SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Accelerator(),
                              aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
                              f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
                              label_smoothing=label_smoothing, use_weighting=False,
                              _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    loss = trl.DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    return float(loss), trainer._metrics["train"]


def _vlsafe(loss_type: str, beta: float, label_smoothing: float, inputs, token_logps):
    logps, tokens = token_logps.sum(1), inputs["completion_mask"].sum(1)
    n = logps.shape[0] // 2
    pair = PairLogps(logps[:n], logps[n:], inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], tokens[:n],
                     tokens[n:])
    return preference_loss(loss_type, pair, beta, label_smoothing)


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0),
                                                       ("robust", 0.2)])
def test_losses_equal_trl_dpo_trainer(loss_type, label_smoothing):
    inputs, token_logps = _inputs()
    beta = 0.1
    expected, metrics = _trl_loss(loss_type, beta, label_smoothing, inputs, token_logps)
    losses, chosen_rewards, rejected_rewards = _vlsafe(loss_type, beta, label_smoothing, inputs, token_logps)
    assert float(losses.mean()) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert float(chosen_rewards.mean()) == pytest.approx(metrics["rewards/chosen"][0], rel=1e-9)
    assert float(rejected_rewards.mean()) == pytest.approx(metrics["rewards/rejected"][0], rel=1e-9)


def test_robust_dpo_loss_object_equals_trl_robust():
    """The class a recipe names (`loss: {class_path: vlsafe.methods.preference.losses.RobustDPOLoss}`) against TRL's `robust`."""
    inputs, token_logps = _inputs(seed=4)
    expected, metrics = _trl_loss("robust", 0.3, 0.1, inputs, token_logps)
    logps, tokens = token_logps.sum(1), inputs["completion_mask"].sum(1)
    pair = PairLogps(logps[:B], logps[B:], inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], tokens[:B],
                     tokens[B:])
    losses, chosen_rewards, _ = RobustDPOLoss(beta=0.3, label_smoothing=0.1)(pair)
    assert RobustDPOLoss.needs_reference
    assert float(losses.mean()) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert float(chosen_rewards.mean()) == pytest.approx(metrics["rewards/chosen"][0], rel=1e-9)


def test_cdpo_is_the_label_smoothed_sigmoid_trl_keeps_in_aot():
    """TRL's sigmoid dropped label smoothing; its `aot` loss keeps the cDPO formula on sorted log-ratios, which
    for a single pair is cDPO itself (trl 1.16 dpo_trainer.py:1447-1456)."""
    for seed in range(3):
        inputs, token_logps = _inputs(seed, batch=1)
        expected, _ = _trl_loss("aot", 0.5, 0.15, inputs, token_logps)
        losses, _, _ = _vlsafe("cdpo", 0.5, 0.15, inputs, token_logps)
        assert float(losses) == pytest.approx(expected, rel=1e-9)


def test_ipo_sum_differs_from_trl_ipo_and_smoothing_goes_only_where_it_is_used():
    inputs, token_logps = _inputs()
    trl_ipo, _ = _trl_loss("ipo", 0.1, 0.0, inputs, token_logps)
    summed = float(_vlsafe("ipo_sum", 0.1, 0.0, inputs, token_logps)[0].mean())
    assert abs(summed - trl_ipo) > 1.0, "ipo_sum squares token-summed log-ratios: another loss, another name"
    with pytest.raises(ValueError, match="'sigmoid' takes no label_smoothing.*'cdpo'.*'robust'"):
        check_loss("sigmoid", 0.1)
    for name in ("ipo", "ipo_sum", "hinge"):
        with pytest.raises(ValueError, match="takes no label_smoothing"):
            check_loss(name, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        check_loss("robust", 0.5)
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'"):
        check_loss("dpo")
    assert set(LOSS_TYPES) == {"sigmoid", "cdpo", "robust", "ipo", "ipo_sum", "hinge"}
