"""Preference losses as pure functions over per-sequence log-probabilities.

Every function takes policy and reference log-probs of the preferred (`chosen`) and dispreferred
(`rejected`) responses, shape (B,), and returns per-example losses (B,). Rewards are the implicit DPO
rewards `beta * (log pi - log pi_ref)`, which is what TRL logs as `rewards/chosen` etc.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def preference_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                      ref_rejected: torch.Tensor) -> torch.Tensor:
    """(log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))."""
    return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)


def dpo_sigmoid_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al.): -log sigma(beta * h). `label_smoothing` > 0 gives conservative DPO (cDPO),
    which assumes a fraction of the preference labels are flipped."""
    h = beta * preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """IPO (Azar et al.): (h - 1/(2 beta))^2, a bounded target instead of pushing h to infinity."""
    h = preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """SLiC-style hinge: max(0, 1 - beta * h)."""
    return torch.relu(1 - beta * preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def preference_loss(loss_type: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    if loss_type == "sigmoid":
        return dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing)
    if label_smoothing:
        raise ValueError("label_smoothing applies to loss_type='sigmoid' (conservative DPO) only")
    if loss_type == "ipo":
        return ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    if loss_type == "hinge":
        return hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")


def implicit_rewards(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    return beta * (policy - reference).detach()


def response_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                      average: bool = False) -> torch.Tensor:
    """Per-row sum (or mean) of target-token log-probs; `logits[:, i]` predicts `targets[:, i]`."""
    mask = targets != ignore_index
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    total = picked.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total
