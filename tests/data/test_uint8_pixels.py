"""Loader workers ship uint8 images and the batch is normalised after the device transfer: steps must see
exactly the floats the encoder alone produces, and the caller's encoder must keep returning floats."""
import lightning as L
import torch

from vlsafe.core.vision import normalize_pixels
from vlsafe.data.datamodule import ShardDataModule
from vlsafe.data.encoding.encoders import ConversationEncoder
from vlsafe.data.encoding.processor import VLMProcessor
from vlsafe.data.shards import read_samples


class PixelRecorder(L.LightningModule):
    """Records what `training_step` receives; one dummy weight so the optimizer has something to step."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.seen = encoder, []
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def data_encoder(self, stage):
        return self.encoder

    def training_step(self, batch, batch_idx):
        self.seen.append((list(batch["ids"]), batch["pixel_values"].clone()))
        return self.weight ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_steps_get_the_encoders_floats_while_workers_ship_uint8(world_dir, tokenizer):
    processor = VLMProcessor(tokenizer, image_size=32, num_image_tokens=4)
    encoder = ConversationEncoder(processor)
    data = ShardDataModule(train=str(world_dir / "train"), batch_size=8, num_workers=1, shuffle_buffer=0)
    module = PixelRecorder(encoder)
    L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, data)

    by_id = {s.id: s for s in read_samples(world_dir / "train")}
    assert len(module.seen) == 3
    for ids, pixels in module.seen:
        assert pixels.dtype == torch.float32
        expected = encoder.collate([encoder.encode(by_id[i]) for i in ids])["pixel_values"]
        assert torch.equal(pixels, expected)
    assert encoder.normalize_images  # the data module shipped uint8 through its own copy

    data.connect(encoder)
    raw = next(iter(data.train_dataloader()))
    assert raw["pixel_values"].dtype == torch.uint8  # a quarter of the bytes through the worker queue
    assert data.normalize_batch(raw)["pixel_values"].dtype == torch.float32


def test_normalize_pixels_matches_the_textbook_formula_and_passes_floats_through():
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    pixels = torch.arange(256, dtype=torch.uint8).repeat(3, 4, 1)  # every value in every channel
    mean_t, std_t = torch.tensor(mean).double().view(3, 1, 1), torch.tensor(std).double().view(3, 1, 1)
    textbook = (pixels.double() / 255 - mean_t) / std_t
    torch.testing.assert_close(normalize_pixels(pixels, mean, std).double(), textbook, atol=1e-6, rtol=0)
    already = torch.randn(3, 4, 4)
    assert normalize_pixels(already, mean, std) is already
