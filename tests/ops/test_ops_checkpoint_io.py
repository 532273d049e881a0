"""Checkpoints are complete or absent: a failed or interrupted save never replaces a good checkpoint."""
from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from vlsafe.ops.checkpoint_io import (
    PARTIAL_PREFIX,
    AtomicCheckpointIO,
    CheckpointWriteError,
    _host_tag,
)


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


def _mount_tmpfs(folder, options: str) -> bool:
    """A real tmpfs at `folder` (needs root/CAP_SYS_ADMIN); False where the sandbox refuses."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


class Wide(Linear):
    """~40 KB of weights: one checkpoint fits a 64 KiB tmpfs, a second one beside it does not."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.ballast = torch.nn.Parameter(torch.zeros(10_000), requires_grad=False)


def test_a_real_full_disk_is_a_checkpoint_write_error_through_the_exception_chain(tmp_path):
    """Issue 16.7: on a real ENOSPC torch raises `RuntimeError: [enforce fail at inline_container.cc] unexpected
    pos`, with the OSError only in `__context__`; it must still be the documented CheckpointWriteError."""
    tiny = tmp_path / "tiny"
    if not _mount_tmpfs(tiny, "size=64k"):
        pytest.skip("cannot mount a 64 KiB tmpfs here (needs root); the ENOSPC chain is then untested")
    try:
        trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                            callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tiny, every_n_train_steps=2,
                                                                           save_top_k=-1)])
        with pytest.raises(CheckpointWriteError) as failure:
            trainer.fit(Wide())
        assert failure.value.errno == errno.ENOSPC and "No space left on device" in str(failure.value)
        assert "epoch=0-step=4.ckpt" in str(failure.value)
        assert sorted(p.name for p in tiny.iterdir()) == ["epoch=0-step=2.ckpt"], "no partial file is left"
        assert load_step(tiny / "epoch=0-step=2.ckpt") == 2
    finally:
        subprocess.run(["umount", str(tiny)], check=True)


def test_a_read_only_checkpoint_folder_is_named_before_the_first_step(tmp_path, monkeypatch):
    """Issue 16.7: a read-only checkpoint folder used to surface only at the first save (hours in)."""
    import os

    from vlsafe.cli import VLSafeCLI

    monkeypatch.setattr(sys, "argv", ["tools/fit.py"])
    frozen = tmp_path / "frozen"
    mounted = _mount_tmpfs(frozen, "ro,size=64k")
    if not mounted:
        frozen.chmod(0o555)  # not root: permission bits are enforced
        if os.access(frozen, os.W_OK):
            pytest.skip("neither a read-only mount nor permission bits can make a folder read-only here")
    steps = []
    monkeypatch.setattr("vlsafe.methods.sft.SFTModule.training_step",
                        lambda self, batch, batch_idx: steps.append(batch_idx) or None)
    recipe = tmp_path / "recipe.yaml"  # the demo SFT recipe's shape, tiny, checkpoints into the frozen folder
    recipe.write_text(f"""
trainer:
  accelerator: cpu
  max_steps: 1
  logger: false
  default_root_dir: {tmp_path / "root"}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {frozen}/checkpoints, save_last: true}}
model:
  class_path: vlsafe.methods.sft.SFTModule
  init_args:
    vlm:
      class_path: vlsafe.builders.TinyVLM
      init_args: {{hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2}}
data:
  class_path: vlsafe.data.synthetic.module.SyntheticWorld
  init_args: {{root: {tmp_path / "world"}, kinds: [qa], train_samples: 8, val_samples: 0, batch_size: 4,
              num_workers: 0}}
""")
    try:
        with pytest.raises(OSError, match=f"checkpoint folder {frozen}/checkpoints is not writable") as failure:
            VLSafeCLI(args=["fit", "--config", str(recipe)])
        assert type(failure.value).__name__ == "CheckpointFolderError"
        assert steps == [], "no training step runs before the folder is checked"
    finally:
        if mounted:
            subprocess.run(["umount", str(frozen)], check=True)
        else:
            frozen.chmod(0o755)
