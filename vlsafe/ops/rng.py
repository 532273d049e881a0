"""Random-number-generator states in checkpoints, so a resumed run draws what an uninterrupted one would.

Lightning checkpoints hold the model, optimisers, schedulers, loop counters and callback states, but not the
global RNGs; after a resume, dropout (e.g. LoRA dropout) would draw different masks than the uninterrupted run.
`RNGStateCheckpoint` stores torch (CPU and CUDA), numpy and Python `random` states as plain data (tensors, ints,
floats), so checkpoints still load with `torch.load(weights_only=True)`. It restores them right before the first
resumed training step: Lightning's own set-up (sanity check, dataloader iterators) runs between loading a
checkpoint and training and may draw from the RNGs.

Under DDP the checkpoint holds rank 0's states and every rank restores them; ranks seeded by
`seed_everything` (the CLI's `seed_everything:`) hold identical states, so this is exact for them.
"""
from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def capture_rng_states() -> dict[str, Any]:
    """The global RNG states of this process as plain data (safe for `weights_only` loading)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of `capture_rng_states`."""
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state(("MT19937", np.asarray(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCheckpoint(L.Callback):
    """Save the RNG states with every checkpoint; restore them before the first step after a resume."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None
