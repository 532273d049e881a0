"""Operations: surviving preemption and crashes, and resuming exactly where a run stopped.

- `rng.RNGStateCheckpoint` — RNG states in every checkpoint, restored before the first resumed step.
- `preemption.PreemptionCheckpoint` — SIGUSR1/SIGTERM become a checkpoint at the next step boundary,
  a SLURM requeue (SIGUSR1) and a clean exit.
- `checkpoint_io.AtomicCheckpointIO` — checkpoints written to a temporary file beside the target, fsynced
  and renamed into place; disk-full errors name the file and leave earlier checkpoints untouched.
- `workers.ShardTracker` — which shard each dataloader worker reads, so a dead worker is named.
- `steplog.StepLog` — per-step loss as JSON lines (what the exact-resume tests compare).

`vlsafe.cli.VLSafeCLI` turns the first three on for every recipe.
"""
