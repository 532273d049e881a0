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

Each loss is also a class (`DPOLoss`, `CDPOLoss`, `RobustDPOLoss`, `IPOLoss`, `IPOSumLoss`, `HingeLoss`) that a
recipe names with `loss: {class_path: ..., init_args: {...}}`, with its own hyperparameters and two flags:
`needs_reference` (False: the module builds no reference model) and `uses_average_logprob` (divides each
response's log-prob by its scored tokens). The reference-free ones:
- `SimPOLoss` (Meng et al. 2024): -log sigma(beta (avg_w - avg_l) - gamma) on token-averaged log-probs; TRL 1.16
  `trl/experimental/cpo/cpo_trainer.py:715-722` (CPO with `loss_type="simpo"`, averages at :850).
- `ORPOLoss` (Hong et al. 2024): -beta log sigma(log odds(avg_w) - log odds(avg_l)) with odds(p) = p / (1 - p),
  plus `nll_weight` x the chosen NLL, which the module adds; TRL 1.16 `trl/experimental/orpo/orpo_trainer.py:690-701`
  (loss at :848, averages at :805).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args

import torch
import torch.nn.functional as F

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class PairLogps:
    """Per-sequence log-probs of a batch of pairs, shape (B,) each; token counts only matter for `ipo`."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None  # None for a reference-free loss (no reference model built)
    ref_rejected: torch.Tensor | None = None
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None

    def _reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this loss needs reference log-probs, but the pair has none (reference-free setup)")
        return self.ref_chosen, self.ref_rejected

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.policy_chosen - self._reference()[0]

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.policy_rejected - self._reference()[1]

    @property
    def average_chosen(self) -> torch.Tensor:
        """Token-averaged chosen log-prob (taken as already averaged when no token counts are given)."""
        return _per_token(self.policy_chosen, self.chosen_tokens)

    @property
    def average_rejected(self) -> torch.Tensor:
        return _per_token(self.policy_rejected, self.rejected_tokens)


def _per_token(logps: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    return logps if tokens is None else logps / tokens.clamp(min=1)


def preference_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                      ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))."""
    return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)


def implicit_rewards(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    return beta * (policy - reference).detach()


def _triple(losses: torch.Tensor, logps: PairLogps, beta: float) -> Triple:
    ref_chosen, ref_rejected = logps._reference()
    return (losses, implicit_rewards(logps.policy_chosen, ref_chosen, beta),
            implicit_rewards(logps.policy_rejected, ref_rejected, beta))


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
LossType = Literal["sigmoid", "cdpo", "robust", "ipo", "ipo_sum", "hinge"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
assert set(LOSS_TYPES) == set(LOSSES), "LossType and LOSSES must name the same losses"


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


# ---------------------------------------------------------------------- losses as configured objects
class PreferenceLoss:
    """A configured preference loss: `loss(pair) -> (losses, chosen_rewards, rejected_rewards)`, each (B,).

    `needs_reference`: whether the module must build a reference model (copy, adapter or precomputed).
    `uses_average_logprob`: whether the loss works on token-averaged log-probs (it divides by the pair's token
    counts itself, or takes the log-probs as averaged when the module already averages them).
    `nll_weight`: weight of the chosen responses' token-mean NLL the module adds once per batch (ORPO's SFT term;
    the module's `sft_weight`, RPO's, adds to it).
    """

    needs_reference: bool = True
    uses_average_logprob: bool = False
    nll_weight: float = 0.0
    loss_type: str = ""  # the `loss_type:` string this class stands for, if any

    def __init__(self, beta: float = 0.1):
        if beta <= 0:
            raise ValueError(f"{type(self).__name__}: beta must be > 0, got {beta}")
        self.beta = beta
        self.label_smoothing = 0.0

    def __call__(self, pair: PairLogps) -> Triple:
        raise NotImplementedError

    def init_args(self) -> dict[str, float]:
        return {"beta": self.beta}

    def hparams(self) -> dict[str, Any]:
        """Plain data a recipe (and a checkpoint's resume) can rebuild this loss from."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": self.init_args()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"


class DPOLoss(PreferenceLoss):
    """DPO (Rafailov et al.): -log sigma(beta h); `loss_type: sigmoid`."""

    loss_type = "sigmoid"

    def __call__(self, pair: PairLogps) -> Triple:
        return dpo_sigmoid_loss(pair, self.beta)


class _SmoothedLoss(PreferenceLoss):
    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        super().__init__(beta)
        check_loss(self.loss_type, label_smoothing)
        self.label_smoothing = label_smoothing

    def init_args(self) -> dict[str, float]:
        return {"beta": self.beta, "label_smoothing": self.label_smoothing}

    def __call__(self, pair: PairLogps) -> Triple:
        return LOSSES[self.loss_type](pair, self.beta, self.label_smoothing)


class CDPOLoss(_SmoothedLoss):
    """Conservative DPO, a share `label_smoothing` of labels taken as flipped; `loss_type: cdpo`."""

    loss_type = "cdpo"


class RobustDPOLoss(_SmoothedLoss):
    """Robust DPO (Chowdhury et al. 2024, TRL's `robust`): unbiased under label noise in [0, 0.5);
    `loss_type: robust`."""

    loss_type = "robust"


class IPOLoss(PreferenceLoss):
    """IPO as TRL computes it (per-token log-ratios); `loss_type: ipo`."""

    loss_type = "ipo"
    uses_average_logprob = True

    def __call__(self, pair: PairLogps) -> Triple:
        return ipo_loss(pair, self.beta)


class IPOSumLoss(PreferenceLoss):
    """IPO on token-summed log-ratios; `loss_type: ipo_sum`."""

    loss_type = "ipo_sum"

    def __call__(self, pair: PairLogps) -> Triple:
        return ipo_sum_loss(pair, self.beta)


class HingeLoss(PreferenceLoss):
    """SLiC hinge max(0, 1 - beta h); `loss_type: hinge`."""

    loss_type = "hinge"

    def __call__(self, pair: PairLogps) -> Triple:
        return hinge_loss(pair, self.beta)


class SimPOLoss(PreferenceLoss):
    """SimPO: a reference-free DPO on length-normalised log-probs with a target margin `gamma`.

    -(1 - e) log sigma(z) - e log sigma(-z), z = beta (avg_w - avg_l) - gamma (e = `label_smoothing`, as TRL's CPO
    trainer has it; 0 is the paper's loss). Rewards are beta x the averaged log-probs (TRL's `rewards/*`). Defaults
    are TRL's (`simpo_gamma` 0.5); the paper tunes beta in 2-10 with gamma / beta in 0.3-1.
    """

    needs_reference = False
    uses_average_logprob = True

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0):
        super().__init__(beta)
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"SimPOLoss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.gamma, self.label_smoothing = gamma, label_smoothing

    def init_args(self) -> dict[str, float]:
        return {"beta": self.beta, "gamma": self.gamma, "label_smoothing": self.label_smoothing}

    def __call__(self, pair: PairLogps) -> Triple:
        chosen, rejected = pair.average_chosen, pair.average_rejected
        z = self.beta * (chosen - rejected) - self.gamma
        e = self.label_smoothing
        losses = -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012, "Accurately computing
    log(1-exp(-|a|))").

    x is kept below -1e-7 so that a response the model is certain of (average log-prob 0) gives a large finite odds
    rather than infinity."""
    x = x.clamp(max=-1e-7)
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 log-probs lose the odds near p = 1; TRL upcasts them (to float32, also float64 down)."""
    return x.float() if x.element_size() < 4 else x


class ORPOLoss(PreferenceLoss):
    """ORPO: reference-free; an odds-ratio preference term on token-averaged log-probs plus the chosen NLL.

    The triple's losses are -beta log sigma(log odds_w - log odds_l), odds = p / (1 - p) with p = exp(avg log-prob);
    the module adds `nll_weight` x the chosen responses' token-mean NLL (1.0 is the paper's L_SFT + beta L_OR).
    TRL's NLL also scores the prompt tokens (orpo_trainer.py:798-800); vlsafe's scores the response only.
    Rewards are beta x the averaged log-probs, as TRL logs them.
    """

    needs_reference = False
    uses_average_logprob = True

    def __init__(self, beta: float = 0.1, nll_weight: float = 1.0):
        super().__init__(beta)
        if nll_weight < 0:
            raise ValueError(f"ORPOLoss: nll_weight must be >= 0, got {nll_weight}")
        self.nll_weight = nll_weight

    def init_args(self) -> dict[str, float]:
        return {"beta": self.beta, "nll_weight": self.nll_weight}

    def log_odds(self, pair: PairLogps) -> torch.Tensor:
        chosen, rejected = _at_least_float32(pair.average_chosen), _at_least_float32(pair.average_rejected)
        return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))

    def __call__(self, pair: PairLogps) -> Triple:
        chosen, rejected = pair.average_chosen, pair.average_rejected
        losses = -self.beta * F.logsigmoid(self.log_odds(pair))
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()


LOSS_CLASSES: dict[str, type[PreferenceLoss]] = {
    cls.loss_type: cls for cls in (DPOLoss, CDPOLoss, RobustDPOLoss, IPOLoss, IPOSumLoss, HingeLoss)}


def loss_from_type(loss_type: str, beta: float = 0.1, label_smoothing: float = 0.0) -> PreferenceLoss:
    """The loss object a `loss_type:` string (with `beta`, `label_smoothing`) stands for; refuses what it would
    ignore."""
    check_loss(loss_type, label_smoothing)
    cls = LOSS_CLASSES[loss_type]
    return cls(beta, label_smoothing) if issubclass(cls, _SmoothedLoss) else cls(beta)
