"""Operations: surviving preemption and crashes, and resuming exactly where a run stopped.

- `rng.RNGStateCheckpoint` — RNG states in every checkpoint, restored before the first resumed step.
- `preemption.PreemptionCheckpoint` — SIGUSR1/SIGTERM become a checkpoint at the next step boundary,
  a SLURM requeue (SIGUSR1) and a clean exit.
- `checkpoint_io.AtomicCheckpointIO` — checkpoints written to a temporary file beside the target, fsynced
  and renamed into place; disk-full errors name the file and leave earlier checkpoints untouched.
- `checkpoint_guard` — every checkpoint read with `weights_only=True` (http(s) URLs, `last`, `hpc` too);
  `CheckpointGuard` records the method in each checkpoint, refuses resuming another method's, reports
  settings a resume ignores, and checks checkpoint folders are writable before step 1.
- `resume.newest_resume_checkpoint` — `--ckpt_path hpc|last` and a requeued SLURM job restore the newest state
  by global step; superseded `hpc_ckpt_*` files are moved to `superseded_hpc/`.
- `workers.ShardTracker` — which shard each dataloader worker reads, so a dead worker is named; the workers
  ignore the signals SLURM sends the whole process group, and a stuck one ends in `WorkerTimeoutError`.
- `steplog.StepLog` — per-step loss as JSON lines (what the exact-resume tests compare).

`vlsafe.cli.VLSafeCLI` turns the first three and `CheckpointGuard` on for every recipe.
"""
