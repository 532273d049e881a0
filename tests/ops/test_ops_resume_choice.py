"""Which checkpoint `--ckpt_path hpc|last` and a requeued SLURM job restore: the newest by global step.

The end-to-end requeue is in test_ops_group_signals.py; these pin the rules on checkpoint files alone.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import ops_harness as h
from vlsafe.ops.resume import newest_resume_checkpoint, retire_superseded_hpc


def trainer_with(root: Path, hpc: dict[int, int], last: int | None) -> L.Trainer:
    """A trainer over `root` holding `hpc_ckpt_<N>.ckpt` at the given steps and `checkpoints/last.ckpt`."""
    (root / "checkpoints").mkdir(parents=True)
    for number, step in hpc.items():
        torch.save({"global_step": step}, root / f"hpc_ckpt_{number}.ckpt")
    if last is not None:
        torch.save({"global_step": last}, root / "checkpoints" / "last.ckpt")
    return L.Trainer(default_root_dir=str(root), logger=False, enable_progress_bar=False,
                     callbacks=[ModelCheckpoint(dirpath=str(root / "checkpoints"), save_last=True)])


@pytest.mark.parametrize("hpc, last, slurm, ckpt_path, expected", [
    ({1: 7}, 20, {}, None, "checkpoints/last.ckpt"),              # requeued job: a newer last beats a stale hpc
    ({1: 7, 2: 0}, None, {}, None, "hpc_ckpt_1.ckpt"),            # a higher-numbered but older hpc file loses
    ({1: 12}, 10, {}, None, "hpc_ckpt_1.ckpt"),                   # a newer hpc beats last
    ({1: 10}, 10, {}, None, "hpc_ckpt_1.ckpt"),                   # a tie: the hpc file, as Lightning picks
    ({}, 10, {"SLURM_RESTART_COUNT": "1"}, None, "checkpoints/last.ckpt"),  # restarted after a node failure
    ({}, 10, {}, None, None),                                      # a new job: no resume
    ({1: 7}, 20, {}, "hpc", "checkpoints/last.ckpt"),             # `--ckpt_path hpc` asks for the newest state
    ({1: 12}, 10, {}, "last", "hpc_ckpt_1.ckpt"),                 # so does `--ckpt_path last`
    ({1: 7}, 20, {}, "checkpoints/last.ckpt", "checkpoints/last.ckpt"),  # a path is taken as given
])
def test_resume_picks_the_newest_state_by_global_step(tmp_path, monkeypatch, hpc, last, slurm, ckpt_path, expected):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    for name, value in {**h.SLURM_ENV, **slurm}.items():
        monkeypatch.setenv(name, value)
    trainer = trainer_with(tmp_path, hpc, last)
    chosen = newest_resume_checkpoint(trainer, ckpt_path)
    assert chosen == (None if expected is None else expected if ckpt_path == expected else str(tmp_path / expected))


def test_outside_slurm_no_ckpt_path_starts_fresh(tmp_path, monkeypatch):
    for name in h.SLURM_ENV:
        monkeypatch.delenv(name, raising=False)
    assert newest_resume_checkpoint(trainer_with(tmp_path, {1: 7}, 20), None) is None


def test_superseded_hpc_checkpoints_are_moved_aside_not_deleted(tmp_path):
    trainer_with(tmp_path, {1: 7, 2: 0, 3: 20}, None)
    moved = retire_superseded_hpc(tmp_path, restored_step=20)
    assert sorted(p.name for p in moved) == ["hpc_ckpt_1-step7.ckpt", "hpc_ckpt_2-step0.ckpt"]
    assert all(p.parent == tmp_path / "superseded_hpc" for p in moved)
    assert sorted(p.name for p in tmp_path.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_3.ckpt"], "the restored one stays"


def test_an_unreadable_candidate_is_named(tmp_path, monkeypatch):
    for name, value in h.SLURM_ENV.items():
        monkeypatch.setenv(name, value)
    trainer = trainer_with(tmp_path, {1: 7}, 20)
    (tmp_path / "hpc_ckpt_2.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read global_step from checkpoint .*hpc_ckpt_2.ckpt"):
        newest_resume_checkpoint(trainer, None)


def test_sharded_checkpoint_folders_are_left_to_lightning(tmp_path, monkeypatch):
    for name, value in h.SLURM_ENV.items():
        monkeypatch.setenv(name, value)
    trainer = trainer_with(tmp_path, {1: 7}, 20)
    (tmp_path / "hpc_ckpt_2.ckpt").mkdir()  # what FSDP/DeepSpeed save: a folder
    assert newest_resume_checkpoint(trainer, "hpc") == "hpc"
    assert retire_superseded_hpc(tmp_path, restored_step=20)[0].name == "hpc_ckpt_1-step7.ckpt"
    assert (tmp_path / "hpc_ckpt_2.ckpt").is_dir(), "a folder is never moved"
