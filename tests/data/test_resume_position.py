"""A mid-epoch resume continues the epoch exactly where the checkpoint left it."""
import io
import tarfile
from collections import Counter

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlsafe.data.datamodule import ShardDataModule, ShardStream, Source
from vlsafe.data.encoding.processor import image_bytes
from vlsafe.data.images import decode_image
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


class DecodingIndexEncoder(IndexEncoder):
    """Decodes the sample's image first, as a real encoder does: an undecodable one raises SampleError."""

    def encode(self, sample):
        decode_image(sample.images[0], sample.id, "images[0]")
        return int(sample.id)


class DecodingRecorder(Recorder):
    def data_encoder(self, stage):
        return DecodingIndexEncoder()

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch.tolist()))
        return ((self.weight - batch.float().mean() / 10) ** 2).sum()  # the weights depend on the order


def _corrupt_images(shard_dir, ids):
    """Replace the image bytes of samples `ids` in their tar (written valid, so the writer's check passed)."""
    for tar_path in shard_dir.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            members = [(info.name, tar.extractfile(info).read()) for info in tar.getmembers()]
        with tarfile.open(tar_path, "w") as tar:
            for name, data in members:
                if name.endswith(".img0.png") and int(name.split(".")[0]) in ids:
                    data = b"\x89PNG truncated"
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_mid_epoch_resume_is_exact_when_samples_are_skipped(tmp_path):
    """Two undecodable images under on_error='skip' (issue 16 case 5): resuming from the step-5 checkpoint trains
    exactly the rest of the uninterrupted run (same samples, same order) and ends with the same weights."""
    png = image_bytes(Image.new("RGB", (2, 2), (9, 9, 9)))
    samples = [Sample(id=str(i), messages=[{"role": "user", "content": "<image>\nq"},
                                           {"role": "assistant", "content": "a"}], images=[png]) for i in range(48)]
    write_shards(samples, tmp_path / "shards", max_samples=5)
    stream = ShardStream([Source(str(tmp_path / "shards")).planned()], IndexEncoder(), batch_size=4, num_workers=2,
                         seed=3, shuffle=True, shuffle_buffer=6, pad_to_equal=True)
    first_batch = next(iter(DataLoader(stream, batch_size=None, num_workers=2))).tolist()
    _corrupt_images(tmp_path / "shards", set(first_batch[:2]))  # both in the first batch, before the checkpoint
    data = lambda: ShardDataModule(train=str(tmp_path / "shards"), batch_size=4, num_workers=2,  # noqa: E731
                                   shuffle_buffer=6, seed=3, on_error="skip")
    quiet = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)

    whole = DecodingRecorder()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    L.Trainer(max_epochs=1, callbacks=[checkpoint], **quiet).fit(whole, data())
    resumed = DecodingRecorder()
    L.Trainer(max_epochs=1, enable_checkpointing=False, **quiet).fit(resumed, data(),
                                                                   ckpt_path=tmp_path / "ckpt" / "epoch=0-step=5.ckpt")

    assert len(whole.seen) == 12 and all(len(batch) == 4 for _, batch in whole.seen)
    trained = Counter(x for _, batch in whole.seen for x in batch)
    assert set(trained) == set(range(48)) - set(first_batch[:2]), "every readable sample is trained"
    assert resumed.seen == whole.seen[5:], "the resumed run trains exactly the rest of the epoch"
    assert torch.equal(resumed.weight, whole.weight)
