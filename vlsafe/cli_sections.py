"""The sections the vlsafe command line adds to Lightning's: callbacks every run gets ("forced callbacks"),
each configurable under its own recipe key.

Kept apart from `vlsafe.cli` so the recipe-key checker (`vlsafe.reliability.recipe_keys`), which the CLI runs
before parsing, can know these keys without importing the CLI.
"""
from __future__ import annotations

from vlsafe.ops.nonfinite import NonFiniteGuard
from vlsafe.ops.preemption import PreemptionCheckpoint
from vlsafe.ops.rng import RNGStateCheckpoint

FORCED_CALLBACKS: dict[str, type] = {
    "rng_state": RNGStateCheckpoint,    # RNG state in every checkpoint: exact resume
    "preemption": PreemptionCheckpoint,  # SIGUSR1/SIGTERM -> checkpoint at the step's end (+ SLURM requeue)
    "nonfinite": NonFiniteGuard,         # skip NaN/Inf steps, stop with a checkpoint when they persist
}
