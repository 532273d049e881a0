"""A dataloader worker that dies mid-epoch stops training promptly with an error naming its shard and sample."""
from __future__ import annotations

import os
import signal
import time

import lightning as L
import pytest
import torch

from vlsafe.data.datamodule import ShardDataModule
from vlsafe.data.schema import Sample
from vlsafe.data.shards import load_index, write_shards

VICTIM = "23"


class DieOnVictim:
    """Encoder that SIGKILLs its own worker process on one sample (as the OOM killer or a decoder segfault would)."""

    def encode(self, sample):
        if sample.id == VICTIM:
            os.kill(os.getpid(), signal.SIGKILL)
        return int(sample.id)

    def collate(self, items):
        return torch.tensor(items)


class Consumer(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def data_encoder(self, stage):
        return DieOnVictim()

    def training_step(self, batch, batch_idx):
        return (self.weight * 0 + 1).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_killed_worker_is_an_error_naming_the_shard_and_sample_not_a_hang(tmp_path):
    samples = (Sample(id=str(i), messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
               for i in range(48))
    write_shards(samples, tmp_path / "shards", max_samples=5)
    victim_shard = load_index(tmp_path / "shards").shards[int(VICTIM) // 5].url
    data = ShardDataModule(train=str(tmp_path / "shards"), batch_size=4, num_workers=2, shuffle_buffer=0)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    started = time.monotonic()
    # Which error surfaces depends on where the main process is when the worker dies: PyTorch's SIGCHLD check,
    # its queue poll ("exited unexpectedly") or unpickling the dead worker's half-sent batch.
    with pytest.raises((RuntimeError, ConnectionError)) as failure:
        trainer.fit(Consumer(), data)
    assert time.monotonic() - started < 30
    notes = " ".join(getattr(failure.value, "__notes__", []))
    assert f"was reading shard {victim_shard}" in notes and f"processing sample '{VICTIM}'" in notes, (
        f"{failure.value!r} (context: {failure.value.__context__!r}) {failure.traceback[-1]}")


STUCK = "17"


class HangOnStuck(DieOnVictim):
    """Encoder whose worker hangs (alive, never returns) on one sample, like a read from a hung network mount."""

    def encode(self, sample):
        if sample.id == STUCK:
            time.sleep(3600)
        return int(sample.id)


class StuckConsumer(Consumer):
    def data_encoder(self, stage):
        return HangOnStuck()


def test_a_stuck_worker_is_a_named_timeout_error_not_a_hang(tmp_path):
    from vlsafe.ops.workers import WorkerTimeoutError

    samples = (Sample(id=str(i), messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
               for i in range(48))
    write_shards(samples, tmp_path / "shards", max_samples=5)
    stuck_shard = load_index(tmp_path / "shards").shards[int(STUCK) // 5].url
    data = ShardDataModule(train=str(tmp_path / "shards"), batch_size=4, num_workers=2, shuffle_buffer=0,
                           worker_timeout=1.5)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    started = time.monotonic()
    with pytest.raises(WorkerTimeoutError) as failure:
        trainer.fit(StuckConsumer(), data)
    assert time.monotonic() - started < 20
    message = str(failure.value)
    assert "no batch from the dataloader workers for 1.5 s (data.worker_timeout)" in message
    assert f"still running) last read shard {stuck_shard} and sample '{STUCK}'" in message, message
    assert "stuck, not dead" in message and "raise data.worker_timeout" in message
    pid = int(message.split("(pid ", 1)[1].split(",", 1)[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not _gone(pid):
        time.sleep(0.05)
    assert _gone(pid), "the stuck worker is ended, not left behind"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
