"""A mid-epoch resume continues the epoch exactly where the checkpoint left it."""
from collections import Counter

import lightning as L
import torch

from vlsafe.data.datamodule import ShardDataModule
from vlsafe.data.schema import Sample
from vlsafe.data.shards import write_shards


class IndexEncoder:
    def encode(self, sample):
        return int(sample.id)

    def collate(self, items):
        return torch.tensor(items)


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[int]]] = []

    def data_encoder(self, stage):
        return IndexEncoder()

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch.tolist()))
        return (self.weight * 0 + 1).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_mid_epoch_resume_reads_every_sample_once(tmp_path):
    samples = (Sample(id=str(i), messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
               for i in range(48))
    write_shards(samples, tmp_path / "shards", max_samples=5)
    data = lambda: ShardDataModule(train=str(tmp_path / "shards"), batch_size=4, num_workers=2,  # noqa: E731
                                   shuffle_buffer=6, seed=3)
    quiet = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)

    first = Recorder()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5)
    L.Trainer(max_steps=5, callbacks=[checkpoint], **quiet).fit(first, data())
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    second = Recorder()
    L.Trainer(max_epochs=2, enable_checkpointing=False, **quiet).fit(second, data(), ckpt_path=ckpt)

    epoch0 = [x for _, batch in first.seen + [s for s in second.seen if s[0] == 0] for x in batch]
    assert len(first.seen) == 5 and Counter(epoch0) == Counter(range(48)), "each sample exactly once in epoch 0"
    epoch1 = [x for e, batch in second.seen if e == 1 for x in batch]
    assert sorted(epoch1) == list(range(48)) and epoch1 != epoch0, "the next epoch is complete and reshuffled"
