"""Skip optimizer steps whose loss or gradients are not finite; stop with a checkpoint when they persist.

One NaN batch in a week-long run should cost one step, not the run: the guard drops that step's
gradients (so the optimizer leaves weights *and* its moment estimates untouched) and warns. A run that
keeps producing NaN/Inf has diverged, and carrying on only burns compute, so after `max_consecutive`
skipped steps in a row (or `max_total` in the run) it saves the last good weights and stops with an
error saying where they are.

Works with Lightning's automatic optimization: `on_before_backward` sees the loss, and
`on_before_optimizer_step` runs after backward (and after DDP's gradient all-reduce, and after
gradient accumulation) but before `optimizer.step` updates anything. Setting every gradient to `None`
there makes torch optimizers skip the parameters entirely. The decision is reduced over ranks, so
all DDP ranks skip together. With fp16 mixed precision the GradScaler already skips overflow steps, so
only non-finite losses are counted then. DeepSpeed owns its optimizer step and is not supported.

Cost per optimizer step: one pass over the gradients (a fused multi-tensor norm, about 1% of a step) and
one host synchronisation, at the step boundary where the optimizer needs the gradients anyway. The loss is
only kept (as a device tensor) before backward and checked together with the gradients, so on a GPU the
backward pass is queued without waiting for the forward pass to finish.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


class NonFiniteStepWarning(UserWarning):
    """An optimizer step was skipped because its loss or gradients were NaN/Inf."""


class NonFiniteTrainingError(RuntimeError):
    """Training produced NaN/Inf too often; the message names the checkpoint with the last good weights."""


class NonFiniteGuard(L.Callback):
    """Skip optimizer steps with a non-finite loss or gradient; stop after too many, with a checkpoint.

    Args:
        max_consecutive: stop after this many skipped steps in a row.
        max_total: stop after this many skipped steps in the whole run (None: no total limit).
        dirpath: where the stop checkpoint goes (default: the ModelCheckpoint folder, else the
            trainer's `default_root_dir`).
        save_checkpoint: write the checkpoint before stopping.
    """

    def __init__(self, max_consecutive: int = 5, max_total: int | None = 100, dirpath: str | None = None,
                 save_checkpoint: bool = True):
        if max_consecutive < 1 or (max_total is not None and max_total < 1):
            raise ValueError("max_consecutive and max_total must be >= 1")
        self.max_consecutive, self.max_total = max_consecutive, max_total
        self.dirpath, self.save_checkpoint = dirpath, save_checkpoint
        self.skipped_steps: list[dict[str, Any]] = []
        self.consecutive = 0
        self._losses: list[torch.Tensor] = []  # this optimizer step's (accumulated) losses, checked at the step
        self._batch_ids: list[str] = []
        self._stop_reason: str | None = None

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        ids = batch.get("ids") if isinstance(batch, dict) else None
        if ids:  # remembered until the next optimizer step, to name the samples of a skipped step
            self._batch_ids.extend(str(i) for i in ids)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())  # no host sync here: checked with the gradients at the step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        check_gradients = getattr(trainer.precision_plugin, "scaler", None) is None
        problem = _non_finite_problem(self._losses, optimizer if check_gradients else None)
        bad = trainer.strategy.reduce_boolean_decision(problem is not None, all=False)
        ids, self._batch_ids, self._losses = self._batch_ids, [], []
        if not bad:
            self.consecutive = 0
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        self.consecutive += 1
        record = {"step": trainer.global_step, "problem": problem or "another rank's loss/gradients",
                  "ids": ids[:8]}
        self.skipped_steps.append(record)
        warnings.warn(f"step {record['step']}: skipped the optimizer step because of a non-finite "
                      f"{record['problem']} (samples {', '.join(record['ids']) or 'unknown'}); "
                      f"{self.consecutive} in a row, {len(self.skipped_steps)} in this run", NonFiniteStepWarning,
                      stacklevel=2)
        if self.consecutive >= self.max_consecutive:
            self._stop_reason = f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradients"
        elif self.max_total is not None and len(self.skipped_steps) >= self.max_total:
            self._stop_reason = f"{len(self.skipped_steps)} optimizer steps in this run had a non-finite loss or gradients"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._stop_reason is None:
            return
        where = "no checkpoint was written (save_checkpoint=False)"
        if self.save_checkpoint:
            path = self._checkpoint_path(trainer)
            trainer.save_checkpoint(path)
            where = f"the last good weights (skipped steps never update them) are in {path}"
        steps = ", ".join(str(r["step"]) for r in self.skipped_steps[-self.max_consecutive:])
        raise NonFiniteTrainingError(
            f"training stopped: {self._stop_reason} (last at steps {steps}: "
            f"{self.skipped_steps[-1]['problem']}); {where}. Lower the learning rate, enable gradient "
            f"clipping (trainer.gradient_clip_val) or check the samples named in the warnings above.")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = list(state_dict.get("skipped_steps", []))
        self.consecutive = int(state_dict.get("consecutive", 0))

    def _checkpoint_path(self, trainer: L.Trainer) -> Path:
        folder = self.dirpath or getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        return Path(folder) / f"nonfinite-stop-step{trainer.global_step}.ckpt"


def _non_finite_problem(losses: list[torch.Tensor], optimizer: torch.optim.Optimizer | None) -> str | None:
    """What is NaN/Inf in this step's losses or (when `optimizer` is given) its gradients, or None.

    All checks stay on the device and are read back with a single host sync; naming the culprit costs more
    syncs, but only on the rare bad step.
    """
    norm = _grad_norm_tensor(optimizer) if optimizer is not None else None
    checks = [torch.isfinite(loss).all() for loss in losses] + ([torch.isfinite(norm)] if norm is not None else [])
    if not checks:
        return None
    device = checks[0].device
    if bool(torch.stack([c.to(device) for c in checks]).all()):
        return None
    for loss in losses:
        if not bool(torch.isfinite(loss).all()):
            return f"loss={loss.float().mean().item()}"
    return f"gradient norm={float(norm)}"


def _grad_norm_tensor(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The total L2 norm of the gradients the optimizer would apply (NaN/Inf if any entry is), as a tensor."""
    grads = [p.grad.detach() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
    device = norms[0].device
    norm = torch.linalg.vector_norm(torch.stack([n.float().to(device) for n in norms]))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: DTensor grads give a DTensor

