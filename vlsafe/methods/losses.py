"""Preference losses as pure functions over per-sequence log-probabilities, named as TRL names them.

Every loss takes a `PairLogps` (policy and reference log-probs of the preferred `chosen` and dispreferred
`rejected` responses, shape (B,), and optionally their scored-token counts) plus `beta` and
`label_smoothing`, and returns the triple `(losses, chosen_rewards, rejected_rewards)`: per-example losses
(B,) and the implicit DPO rewards `beta * (log pi - log pi_ref)` (detached; TRL's `rewards/chosen` etc.).

Against TRL's `DPOTrainer._compute_loss` (trl 1.16.0, trl/trainer/dpo_trainer.py):
- `sigmoid` (:1387-1388) -log sigma(beta h); TRL's sigmoid ignores `label_smoothing`, so vlsafe refuses it there.
- `cdpo`: conservative DPO, the form TRL's `sigmoid` had with `label_smoothing` before it dropped it
  (and still uses in `aot`, :1447-1456): -(1 - e) log sigma(beta h) - e log sigma(-beta h).
- `robust` (:1428-1431): (-(1 - e) log sigma(beta h) + e log sigma(-beta h)) / (1 - 2e) (Chowdhury et al.).
- `ipo` (:1393-1404): (h_avg - 1/(2 beta))^2 where each response's log-ratio is divided by its number of
  scored tokens (TRL's normalisation, confirmed with the IPO authors per its comment).
- `ipo_sum`: the same square on token-summed log-ratios (Azar et al.'s formula read literally; what vlsafe's
  `ipo` computed before it followed TRL). Values differ by orders of magnitude from `ipo`.
- `hinge` (:1390-1391): max(0, 1 - beta h) (SLiC).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class PairLogps:
    """Per-sequence log-probs of a batch of pairs, shape (B,) each; token counts only matter for `ipo`."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.policy_rejected - self.ref_rejected


def preference_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                      ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))."""
    return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)


def implicit_rewards(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    return beta * (policy - reference).detach()


def _triple(losses: torch.Tensor, logps: PairLogps, beta: float) -> Triple:
    return (losses, implicit_rewards(logps.policy_chosen, logps.ref_chosen, beta),
            implicit_rewards(logps.policy_rejected, logps.ref_rejected, beta))


def _h(logps: PairLogps) -> torch.Tensor:
    return logps.chosen_logratios - logps.rejected_logratios


def dpo_sigmoid_loss(logps: PairLogps, beta: float = 0.1, label_smoothing: float = 0.0) -> Triple:
    """DPO (Rafailov et al.): -log sigma(beta h)."""
    if label_smoothing:
        raise ValueError("loss_type 'sigmoid' takes no label_smoothing (TRL's sigmoid ignores it); use 'cdpo' "
                         "(conservative DPO) or 'robust'")
    return _triple(-F.logsigmoid(beta * _h(logps)), logps, beta)


def cdpo_loss(logps: PairLogps, beta: float = 0.1, label_smoothing: float = 0.0) -> Triple:
    """Conservative DPO: assumes a share `label_smoothing` of the preference labels is flipped."""
    h = beta * _h(logps)
    return _triple(-(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h), logps, beta)


def robust_loss(logps: PairLogps, beta: float = 0.1, label_smoothing: float = 0.0) -> Triple:
    """Robust DPO (Chowdhury et al. 2024): an unbiased loss under label noise `label_smoothing` in [0, 0.5)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"loss_type 'robust' needs label_smoothing in [0, 0.5), got {label_smoothing}")
    h = beta * _h(logps)
    losses = (-(1 - label_smoothing) * F.logsigmoid(h) + label_smoothing * F.logsigmoid(-h)) / (1 - 2 * label_smoothing)
    return _triple(losses, logps, beta)


def ipo_loss(logps: PairLogps, beta: float = 0.1, label_smoothing: float = 0.0) -> Triple:
    """IPO as TRL computes it: log-ratios averaged over each response's scored tokens, then (h - 1/(2 beta))^2.

    Without token counts the log-probs are taken as already averaged (`average_logprob: true`)."""
    _no_smoothing("ipo", label_smoothing)
    chosen, rejected = logps.chosen_logratios, logps.rejected_logratios
    if logps.chosen_tokens is not None:
        chosen = chosen / logps.chosen_tokens.clamp(min=1)
    if logps.rejected_tokens is not None:
        rejected = rejected / logps.rejected_tokens.clamp(min=1)
    return _triple((chosen - rejected - 1 / (2 * beta)) ** 2, logps, beta)


def ipo_sum_loss(logps: PairLogps, beta: float = 0.1, label_smoothing: float = 0.0) -> Triple:
    """IPO on token-summed log-ratios: (h - 1/(2 beta))^2, a bounded target instead of pushing h to infinity."""
    _no_smoothing("ipo_sum", label_smoothing)
    return _triple((_h(logps) - 1 / (2 * beta)) ** 2, logps, beta)


def hinge_loss(logps: PairLogps, beta: float = 0.1, label_smoothing: float = 0.0) -> Triple:
    """SLiC-style hinge: max(0, 1 - beta h)."""
    _no_smoothing("hinge", label_smoothing)
    return _triple(torch.relu(1 - beta * _h(logps)), logps, beta)


def _no_smoothing(name: str, label_smoothing: float) -> None:
    if label_smoothing:
        raise ValueError(f"loss_type {name!r} takes no label_smoothing; it applies to 'cdpo' and 'robust'")


LOSSES: dict[str, Callable[[PairLogps, float, float], Triple]] = {
    "sigmoid": dpo_sigmoid_loss, "cdpo": cdpo_loss, "robust": robust_loss, "ipo": ipo_loss, "ipo_sum": ipo_sum_loss,
    "hinge": hinge_loss}
LOSS_TYPES = tuple(LOSSES)


def check_loss(loss_type: str, label_smoothing: float = 0.0) -> None:
    """Refuse an unknown loss or a `label_smoothing` the loss would not use, at construction time."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    zeros = torch.zeros(1)
    LOSSES[loss_type](PairLogps(zeros, zeros, zeros, zeros), 0.1, label_smoothing)


def preference_loss(loss_type: str, logps: PairLogps, beta: float, label_smoothing: float = 0.0) -> Triple:
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    return LOSSES[loss_type](logps, beta, label_smoothing)


def response_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                      average: bool = False) -> torch.Tensor:
    """Per-row sum (or mean) of target-token log-probs; `logits[:, i]` predicts `targets[:, i]`."""
    mask = targets != ignore_index
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    total = picked.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total
