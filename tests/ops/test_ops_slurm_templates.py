"""The sbatch templates launch `srun python tools/fit.py` with a Trainer that matches their #SBATCH lines."""
from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = sorted((ROOT / "tools/slurm").glob("*.sbatch"))


def directives(script: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", script.read_text(), flags=re.M))


@pytest.mark.parametrize("script", TEMPLATES, ids=lambda p: p.name)
def test_template_requeues_on_sigusr1_and_matches_devices_and_nodes(script, tmp_path):
    wanted = directives(script)
    assert wanted["signal"] == "SIGUSR1@90" and "requeue" in wanted
    # Run the script as sbatch would, with the variables sbatch sets and a fake srun that records its command.
    fake = tmp_path / "srun"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
           "SLURM_NTASKS_PER_NODE": wanted["ntasks-per-node"], "SLURM_JOB_NUM_NODES": wanted["nodes"],
           "SLURM_CPUS_PER_TASK": wanted["cpus-per-task"]}
    subprocess.run(["bash", str(script), "recipes/sft_lora.yaml", "--trainer.max_steps", "10"], cwd=ROOT, env=env,
                   check=True, timeout=30)
    argv = (tmp_path / "argv").read_text().split("\n")[:-1]
    assert argv[:3] == ["python", "tools/fit.py", "recipes/sft_lora.yaml"]
    options = dict(zip(argv[3::2], argv[4::2]))
    assert options["--trainer.devices"] == wanted["ntasks-per-node"]
    assert options["--trainer.num_nodes"] == wanted["nodes"]
    assert options["--trainer.max_steps"] == "10", "user overrides are passed through"


def test_template_without_a_recipe_says_how_to_call_it(tmp_path):
    result = subprocess.run(["bash", str(TEMPLATES[0])], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "usage: sbatch" in result.stderr
