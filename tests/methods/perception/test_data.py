"""Perception data: `<loc>` targets from samples, square-frame boxes/masks, and the RefCOCO converter."""
import json
import random

import pytest
import torch
from PIL import Image, ImageDraw

from vlsafe.builders import TinyVLM
from vlsafe.constants import IGNORE_INDEX
from vlsafe.data.encoding.processor import image_bytes
from vlsafe.data.schema import Sample, SampleError
from vlsafe.data.shards import read_samples, write_shards
from vlsafe.data.sources import refcoco
from vlsafe.data.synthetic.world import Scene, generate
from vlsafe.methods.perception.encoders import (
    PerceptionEncoder,
    PerceptionPromptEncoder,
)
from vlsafe.methods.perception.module import add_perception_tokens


@pytest.fixture(scope="module")
def encoders():
    vlm, processor = TinyVLM(hidden_size=32, intermediate_size=64).build()
    (loc,) = add_perception_tokens(vlm.llm, processor.tokenizer, ["<loc>"])
    return (PerceptionEncoder(processor, loc, processor.image_size, True),
            PerceptionPromptEncoder(processor, loc, processor.image_size, True), loc)


def test_synthetic_grounding_answer_becomes_one_supervised_loc_with_exact_box_and_mask(encoders):
    encoder, prompt_encoder, loc = encoders
    sample = next(generate(1, seed=3, kinds=["grounding"]))
    item = encoder.encode(sample)
    positions = [i for i, t in enumerate(item["input_ids"]) if t == loc]
    assert len(positions) == 1 and item["labels"][positions[0]] == loc, "the answer's <loc> is a target"
    assert item["labels"][positions[0] - 1] != IGNORE_INDEX, "the state before it is inside the answer"
    torch.testing.assert_close(item["loc_boxes"][0], torch.tensor(sample.boxes[0], dtype=torch.float) / 64)
    scene_mask = Scene.from_meta(sample.meta["scene"]).mask(sample.meta["target"])
    expected = torch.tensor(list(scene_mask.getdata()), dtype=torch.float).view(64, 64) / 255
    assert bool(item["target_mask_valid"][0]) and torch.equal(item["target_masks"][0], expected)
    prompt = prompt_encoder.encode(sample)
    assert loc not in prompt["input_ids"] and prompt["reference_boxes"].shape == (1, 4)


def test_boxes_and_masks_are_padded_to_square_like_the_image(encoders):
    """A red rectangle in a 48x24 image: its box and mask must land where its pixels do after padding."""
    encoder, _, _ = encoders
    image = Image.new("RGB", (48, 24), (255, 255, 255))
    box = [30, 4, 42, 16]
    ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 0, 0))
    mask = Image.new("L", (48, 24), 0)
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    sample = Sample(id="pad", images=[image_bytes(image)], boxes=[box], masks=[image_bytes(mask)],
                    messages=[{"role": "user", "content": "<image>\nWhere is the red box?"},
                              {"role": "assistant", "content": "<boxes>"}])
    item = encoder.encode(sample)
    pixels = item["pixel_values"][0]  # normalised, padded to 48x48 then resized to 64x64
    red = (pixels[0] > 1.0) & (pixels[1] < -1.0)
    ys, xs = red.nonzero(as_tuple=True)
    found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float) / 64
    torch.testing.assert_close(item["loc_boxes"][0], torch.tensor([30, 16, 42, 28]) / 48)
    assert (item["loc_boxes"][0] - found).abs().max() < 2 / 64, (item["loc_boxes"][0], found)
    inside = item["target_masks"][0] > 0.5
    assert (inside & red).sum() / (inside | red).sum() > 0.8


def test_box_count_mismatch_names_the_sample_and_field(encoders):
    encoder, _, _ = encoders
    sample = next(generate(1, seed=3, kinds=["grounding"]))
    sample.boxes = []
    with pytest.raises(SampleError, match=r"'synthetic-train-3-0000000'.*'boxes'"):
        encoder.encode(sample)


def _coco_rle(mask: torch.Tensor) -> dict:
    """Column-major run lengths starting with zeros (COCO's layout), compressed to its string form."""
    flat = mask.t().reshape(-1).tolist()
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": refcoco.counts_to_rle_string(counts)}


def test_rle_decoding_matches_the_mask_it_was_made_from():
    rng = random.Random(0)
    mask = torch.tensor([[rng.random() < 0.3 for _ in range(23)] for _ in range(17)], dtype=torch.int)
    decoded = refcoco.rle_to_mask(_coco_rle(mask))
    assert decoded.size == (23, 17)
    assert torch.equal(torch.tensor(list(decoded.getdata())).view(17, 23) > 0, mask.bool())


def test_refcoco_converter_writes_shards_with_boxes_masks_and_reports_bad_lines(tmp_path):
    Image.new("RGB", (40, 30), (200, 200, 200)).save(tmp_path / "a.jpg")
    rle_mask = torch.zeros(30, 40, dtype=torch.int)
    rle_mask[5:15, 10:30] = 1
    lines = [
        {"img_path": "a.jpg", "expression": "the grey thing", "bbox": [10, 5, 20, 10], "height": 30, "width": 40,
         "dataset_name": "refcoco", "segmentation": [[10, 5, 29, 5, 29, 14, 10, 14]], "segment_id": 1},
        {"img_path": "a.jpg", "expression": "the same thing", "bbox": [10, 5, 20, 10], "height": 30, "width": 40,
         "dataset_name": "refcoco+", "segmentation": _coco_rle(rle_mask)},
        {"img_path": "a.jpg", "expression": "broken", "bbox": [10, 5, 0, 10], "height": 30, "width": 40,
         "segmentation": [[1, 1, 2, 2, 3, 1]]},
    ]
    path = tmp_path / "RES_refcoco_unc_val.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(SampleError, match=r"RES_refcoco_unc_val.jsonl:3.*'bbox'"):
        list(refcoco.read_refcoco_jsonl(path, tmp_path))
    errors = []
    samples = list(refcoco.read_refcoco_jsonl(path, tmp_path, errors=errors))
    assert [e["field"] for e in errors] == ["bbox"] and len(samples) == 2
    write_shards(samples, tmp_path / "shards")
    stored = list(read_samples(tmp_path / "shards"))
    assert stored[0].boxes == [[10.0, 5.0, 30.0, 15.0]]
    assert stored[0].meta["dataset_name"] == "refcoco/RES_refcoco_unc_val"
    assert "<masks>" in stored[0].messages[1]["content"] and "the grey thing" in stored[0].messages[0]["content"]
    for sample in stored:  # polygon and RLE give the same rectangle
        mask = Image.open(__import__("io").BytesIO(sample.masks[0]))
        assert mask.size == (40, 30) and mask.getbbox() == (10, 5, 30, 15)
    text = list(refcoco.read_refcoco_jsonl(path, tmp_path, box_format="text", task="rec", errors=[]))
    # 40x30 padded to 40x40 (5 px on top): [10, 10, 30, 20] / 40
    assert text[0].messages[1]["content"] == "[0.250, 0.250, 0.750, 0.500]"
