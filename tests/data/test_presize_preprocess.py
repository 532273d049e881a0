"""`make_shards --presize`: images squared and resized at writing time must reach the model bit-identical to the
LLaVA-style per-file path on the original image, and shards pre-sized for another model must be refused.

Also checks that the data benchmark compares equal work (same pixels, same ids on both loaders); no timing is
asserted here.
"""
import dataclasses
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlsafe.data.encoding.encoders import ConversationEncoder
from vlsafe.data.encoding.processor import VLMProcessor
from vlsafe.data.images import image_header_size
from vlsafe.data.schema import SampleError
from vlsafe.data.shards import load_index, read_samples, write_shards
from vlsafe.data.sources.llava import llava_record_to_sample

ROOT = Path(__file__).resolve().parents[2]
SIDE = 64


def _make_shards_main():
    spec = importlib.util.spec_from_file_location("make_shards_tool", ROOT / "tools" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: enough texture that a wrong resize or padding changes many pixels."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    base = torch.stack([xs * 200, ys * 180, (1 - xs) * 150]) + torch.randn(3, height, width, generator=g) * 20
    return Image.fromarray(base.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    """LLaVA JSON + originals of several shapes and formats (landscape/portrait JPEG, RGBA PNG, two images)."""
    root = tmp_path_factory.mktemp("presize")
    images = root / "images"
    images.mkdir()
    _photo(200, 150, 0).save(images / "land.jpg", quality=90)
    _photo(90, 160, 1).save(images / "port.jpg", quality=90)
    rgba = _photo(70, 50, 2).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(images / "alpha.png")
    _photo(SIDE, SIDE, 3).save(images / "square.png")  # already the model's side, but no presize record
    turn = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A gradient."}]
    records = [{"id": "land", "image": "land.jpg", "conversations": turn},
               {"id": "port", "image": "port.jpg", "conversations": turn},
               {"id": "alpha", "image": "alpha.png", "conversations": turn},
               {"id": "two", "image": ["land.jpg", "alpha.png"], "conversations": [
                   {"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Alike."}]}]
    listing = root / "llava.json"
    listing.write_text(json.dumps(records))
    return root, listing, images, records


@pytest.fixture(scope="module")
def processor(tokenizer):
    return VLMProcessor(tokenizer, image_size=SIDE, num_image_tokens=4)


def _per_file_pixels(records, images, encoder):
    out = {}
    for record in records:
        sample = llava_record_to_sample(record, images)
        sample.images = [Path(p).read_bytes() for p in sample.images]
        out[sample.id] = encoder.encode(sample)["pixel_values"]
    return out


@pytest.mark.parametrize("storage", [[], ["--presize-format", "png"]], ids=["ppm", "png"])
def test_presized_shards_load_bit_identical_to_per_file_loading_of_the_originals(llava_folder, processor, tmp_path,
                                                                                 storage):
    root, listing, images, records = llava_folder
    _make_shards_main()(["llava", "--json", str(listing), "--images", str(images), "--out", str(tmp_path / "pre"),
                         "--presize", str(SIDE), *storage])
    index = load_index(tmp_path / "pre")
    assert index.presized == {"size": SIDE, "fill": [122, 116, 104], "pad_to_square": True, "resample": "bicubic"}
    encoder = ConversationEncoder(processor)
    expected = _per_file_pixels(records, images, encoder)
    loaded = {s.id: s for s in read_samples(tmp_path / "pre")}
    assert set(loaded) == set(expected)
    for sample_id, sample in loaded.items():
        magic = b"\x89PNG\r\n\x1a\n" if storage else b"P6\n# vlsafe:presized "
        for i, data in enumerate(sample.images):  # really stored at the model's side, losslessly
            assert data.startswith(magic) and image_header_size(data, sample_id, "img") == (SIDE, SIDE)
        got = encoder.encode(sample)["pixel_values"]
        assert got.shape == expected[sample_id].shape
        assert torch.equal(got, expected[sample_id]), f"{sample_id}: pre-sized pixels differ from the per-file path"
        # what loader workers ship: uint8, normalised later to the same floats
        raw = processor.preprocess_images(sample.images, sample_id, normalize=False)
        assert raw.dtype == torch.uint8 and torch.equal(processor.normalize(raw), expected[sample_id])


@pytest.mark.parametrize("storage", [[], ["--presize-compress-level", "1"]], ids=["ppm", "png-deflated"])
def test_presized_image_for_other_processor_settings_is_refused(llava_folder, processor, tokenizer, tmp_path,
                                                                storage):
    root, listing, images, records = llava_folder
    _make_shards_main()(["llava", "--json", str(listing), "--images", str(images), "--out", str(tmp_path / "pre"),
                         "--presize", str(SIDE), *storage])
    sample = next(s for s in read_samples(tmp_path / "pre") if s.id == "port")
    processor.preprocess_images(sample.images, sample.id)  # the matching processor takes it
    others = {"side": VLMProcessor(tokenizer, image_size=32, num_image_tokens=4),
              "mean": VLMProcessor(tokenizer, image_size=SIDE, num_image_tokens=4, image_mean=(0.5, 0.5, 0.5)),
              "squash": VLMProcessor(tokenizer, image_size=SIDE, num_image_tokens=4, pad_to_square=False)}
    for name, other in others.items():
        with pytest.raises(SampleError, match="pre-sized at shard writing") as err:
            other.preprocess_images(sample.images, sample.id)
        assert err.value.sample_id == "port" and err.value.field_name == "images[0]", name
    if not storage:  # a truncated PPM is named, not read short
        with pytest.raises(SampleError, match="truncated") as err:
            processor.preprocess_images([sample.images[0][:-5]], sample.id)
        assert err.value.sample_id == "port" and err.value.field_name == "images[0]"
    # an ordinary image that merely has the model's side is not mistaken for a pre-sized one
    plain = (images / "square.png").read_bytes()
    from_file = Image.open(io.BytesIO(plain))
    assert torch.equal(others["mean"].preprocess_image(plain), others["mean"].preprocess_image(from_file))


def test_presize_refuses_boxes_and_bad_flags(tmp_path):
    from vlsafe.data.images import Presize
    from vlsafe.data.synthetic.world import generate

    grounding = list(generate(1, seed=0, kinds=["grounding"]))
    with pytest.raises(SampleError, match="would move the boxes"):
        write_shards(grounding, tmp_path / "g", presize=Presize(SIDE, (122, 116, 104)))
    with pytest.raises(ValueError, match="PNG only"):
        Presize(SIDE, (122, 116, 104), format="ppm", compress_level=1)
    with pytest.raises(SystemExit, match="need --presize SIDE"):
        _make_shards_main()(["synthetic", "--n", "1", "--out", str(tmp_path / "s"), "--presize-mean", "0.5", "0.5",
                             "0.5"])


def test_bench_data_loaders_do_the_same_work(tmp_path):
    """The data benchmark is only fair if every loader yields the same samples with the same pixels."""
    from vlsafe.bench.contenders import (
        _data_sources,
        data_processor,
        evict_from_page_cache,
        per_file_loader,
        shard_loader,
    )
    from vlsafe.bench.setup import BenchConfig

    cfg = dataclasses.replace(BenchConfig.tiny(), data_samples=16)
    built = cfg.builder().build()[1]
    fast = data_processor(cfg)
    for name in ("image_size", "num_image_tokens", "image_mean", "image_std", "pad_to_square", "max_length"):
        assert getattr(fast, name) == getattr(built, name), name
    paths = _data_sources(cfg, tmp_path / "contender")
    originals = sorted(paths["images"].iterdir())
    assert len(originals) == cfg.data_samples
    assert Image.open(originals[0]).size == (640, 480) and Image.open(originals[0]).format == "JPEG"
    assert evict_from_page_cache([paths["presized"]]) == sum(f.stat().st_size for f in paths["presized"].iterdir())
    encoder = ConversationEncoder(fast)

    def by_id(loader):
        pixels = {}
        for batch in loader:
            pixels.update(zip(batch["ids"], batch["pixel_values"]))
        return pixels

    reference = by_id(per_file_loader(paths["listing"], paths["images"], encoder, num_workers=0))
    assert len(reference) == cfg.data_samples
    for layout in ("original", "presized"):
        got = by_id(shard_loader(paths[layout], encoder, num_workers=0))
        assert got.keys() == reference.keys(), layout
        assert all(torch.equal(got[k], reference[k]) for k in reference), layout
