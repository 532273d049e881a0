#!/usr/bin/env python
"""Train, validate, test or predict from a YAML recipe.

    python tools/fit.py recipes/demo/sft.yaml                       # = fit --config recipes/demo/sft.yaml
    python tools/fit.py fit --config recipes/sft.yaml --trainer.max_steps 10
    python tools/fit.py recipes/demo/sft.yaml --print_config
    python tools/fit.py validate --config recipes/demo/sft.yaml --ckpt_path runs/demo-sft/.../last.ckpt

Resuming: after a crash, add `--ckpt_path last` (the recipe's ModelCheckpoint); after SIGTERM, which saves
`<default_root_dir>/hpc_ckpt_<N>.ckpt` and exits, add `--ckpt_path hpc`; a requeued SLURM job resumes by
itself (tools/slurm/README.md).
"""
from vlsafe.cli import main

if __name__ == "__main__":
    main()
