"""Checkpoints are complete or absent: a failed or interrupted save never replaces a good checkpoint."""
from __future__ import annotations

import errno
import subprocess
import sys

import lightning as L
import pytest
import torch

from vlsafe.ops.checkpoint_io import PARTIAL_PREFIX, AtomicCheckpointIO, CheckpointWriteError, _host_tag


class Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=4)


class Crash(BaseException):
    """Stands in for the process dying in the middle of writing (nothing after it runs)."""


class FailingIO(AtomicCheckpointIO):
    """Writes the first `good` checkpoints, then half a checkpoint before `error` strikes."""

    def __init__(self, good: int, error: BaseException):
        super().__init__()
        self.good, self.error, self.saves = good, error, 0

    def _serialize(self, checkpoint, file):
        self.saves += 1
        if self.saves <= self.good:
            return super()._serialize(checkpoint, file)
        file.write(b"PK\x03\x04" + b"\0" * 4096)  # the start of a zip file, as torch.save begins
        raise self.error


def fit(tmp_path, io: AtomicCheckpointIO, max_steps: int = 4, ckpt_path=None) -> L.Trainer:
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[io], callbacks=[L.pytorch.callbacks.ModelCheckpoint(
                            dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1)])
    trainer.fit(Linear(), ckpt_path=ckpt_path)
    return trainer


def load_step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_disk_full_mid_save_is_a_clear_error_and_earlier_checkpoints_stay_intact(tmp_path):
    io = FailingIO(good=2, error=OSError(errno.ENOSPC, "No space left on device"))  # step 2: file + last
    with pytest.raises(CheckpointWriteError) as failure:
        fit(tmp_path, io)
    message = str(failure.value)
    assert "No space left on device" in message and "step=4.ckpt" in message and "intact" in message
    assert failure.value.errno == errno.ENOSPC
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["epoch=0-step=2.ckpt", "last.ckpt"], "no partial file is left behind"
    assert load_step(tmp_path / "ckpt/last.ckpt") == 2 and load_step(tmp_path / "ckpt/epoch=0-step=2.ckpt") == 2


def test_a_crash_while_overwriting_last_ckpt_leaves_the_previous_one(tmp_path):
    io = FailingIO(good=3, error=Crash())  # step 4: its own file is written, then last.ckpt is interrupted
    with pytest.raises(Crash):
        fit(tmp_path, io)
    assert load_step(tmp_path / "ckpt/last.ckpt") == 2, "the old last.ckpt, whole"
    assert load_step(tmp_path / "ckpt/epoch=0-step=4.ckpt") == 4


def test_resume_from_last_never_picks_a_partial_file_and_the_next_save_removes_it(tmp_path):
    fit(tmp_path, AtomicCheckpointIO(), max_steps=2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, as after a SIGKILL mid-save
    partial = tmp_path / "ckpt" / f"{PARTIAL_PREFIX}{_host_tag()}-{dead.pid}-0123abcd"
    partial.write_bytes(b"PK\x03\x04" + b"\0" * 100)  # newer than last.ckpt, as a crashed save would be
    trainer = fit(tmp_path, AtomicCheckpointIO(), max_steps=4, ckpt_path="last")
    assert trainer.global_step == 4 and not partial.exists()
    assert load_step(tmp_path / "ckpt/last.ckpt") == 4


def test_the_cli_writes_checkpoints_atomically():
    from vlsafe.cli import VLSafeCLI

    class NoFit(VLSafeCLI):
        def instantiate_classes(self) -> None:  # the trainer only: building the model is not the point here
            self.config_init = self.parser.instantiate_classes(self.config)
            self.trainer = self.instantiate_trainer()

    from pathlib import Path
    recipe = Path(__file__).resolve().parents[2] / "recipes/demo/sft.yaml"
    cli = NoFit(args=["--config", str(recipe)], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"RNGStateCheckpoint", "PreemptionCheckpoint"} <= names
