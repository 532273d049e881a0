"""Shikra-style REC/RES JSON Lines (RefCOCO, RefCOCO+, RefCOCOg) -> `Sample`s with a box and a mask.

One line per referring sentence: `{"img_path", "expression", "bbox": [x, y, w, h] (COCO pixels), "height",
"width", "segmentation": COCO polygons [[x1, y1, x2, y2, ...], ...] or RLE {"size": [h, w], "counts": ...},
"dataset_name", ...}` (PerceptionGPT's `prepare_data/data_process_shikra.py` output). Each line becomes a
one-turn sample: a REC or RES instruction about the expression, and an answer whose `<boxes>`/`<masks>`
placeholder stands for the object (`--box-format text` writes Shikra's normalised text coordinates
instead, for text-coordinate baselines). The mask is rasterised to a PNG of the image size.

`meta["dataset_name"]` is `<dataset_name>/<split>` (split: the file's stem unless `--split` is given), which
is what the grounding suite's per-dataset tables group by.
"""
from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path
from typing import Any, Iterator, MutableMapping

from PIL import Image, ImageDraw

from vlsafe.constants import IMAGE_PLACEHOLDER
from vlsafe.data.grounding import (
    BOXES_PLACEHOLDER,
    MASKS_PLACEHOLDER,
    REC_ANSWER,
    REC_TEMPLATES,
    RES_ANSWER,
    RES_TEMPLATES,
    fill_expression,
    normalise_boxes,
)
from vlsafe.data.schema import Sample, SampleError, is_blank
from vlsafe.data.sources import skip_or_raise
from vlsafe.data.sources.base import DataSource


# ------------------------------------------------------------------------------ COCO RLE
def rle_string_to_counts(text: str) -> list[int]:
    """COCO's compressed RLE string (6-bit chunks, deltas after the second run) -> run lengths."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            chunk = ord(text[position]) - 48
            value |= (chunk & 0x1F) << (5 * shift)
            more = bool(chunk & 0x20)
            position += 1
            shift += 1
            if not more and chunk & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def counts_to_rle_string(counts: list[int]) -> str:
    """Inverse of `rle_string_to_counts` (used to write test fixtures in the released format)."""
    out = []
    for i, value in enumerate(counts):
        if i > 2:
            value -= counts[i - 2]
        more = True
        while more:
            chunk = value & 0x1F
            value >>= 5
            more = value != -1 if chunk & 0x10 else value != 0
            if more:
                chunk |= 0x20
            out.append(chr(chunk + 48))
    return "".join(out)


def rle_to_mask(rle: dict[str, Any]) -> Image.Image:
    """COCO RLE (compressed string or uncompressed list of counts; column-major runs, starting with 0s)."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = rle_string_to_counts(counts)
    if sum(counts) != height * width or any(c < 0 for c in counts):
        raise ValueError(f"RLE runs sum to {sum(counts)} pixels, expected {height} x {width} = {height * width}")
    column_major = bytearray()
    value = 0
    for run in counts:
        column_major += bytes([value]) * run
        value = 255 - value
    # column-major (Fortran) order: build the transposed image and flip it back
    transposed = Image.frombytes("L", (height, width), bytes(column_major))
    return transposed.transpose(Image.Transpose.TRANSPOSE)


def polygons_to_mask(polygons: list[list[float]], width: int, height: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for polygon in polygons:
        if len(polygon) < 6 or len(polygon) % 2:
            raise ValueError(f"a polygon needs an even number (>= 6) of coordinates, got {len(polygon)}")
        draw.polygon([(float(polygon[i]), float(polygon[i + 1])) for i in range(0, len(polygon), 2)], fill=255)
    return mask


def segmentation_mask(segmentation: Any, width: int, height: int) -> Image.Image:
    """Polygons (list of lists) or RLE (dict) -> mode "L" mask of the image size."""
    if isinstance(segmentation, dict):
        mask = rle_to_mask(segmentation)
        if mask.size != (width, height):
            raise ValueError(f"RLE size {list(segmentation['size'])} is not the image's [height, width] "
                             f"[{height}, {width}]")
        return mask
    if isinstance(segmentation, list) and segmentation and all(isinstance(p, list) for p in segmentation):
        return polygons_to_mask(segmentation, width, height)
    if isinstance(segmentation, list) and segmentation and all(isinstance(v, (int, float)) for v in segmentation):
        return polygons_to_mask([segmentation], width, height)
    raise ValueError("must be COCO polygons ([[x1, y1, ...], ...]) or RLE ({'size', 'counts'})")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------ records
def _number(record: dict[str, Any], key: str, sample_id: str) -> int:
    value = record.get(key)
    if not isinstance(value, (int, float)) or value <= 0:
        raise SampleError(sample_id, key, f"must be a positive number, got {value!r}")
    return int(value)


def refcoco_record_to_sample(record: dict[str, Any], sample_id: str, image_folder: str | Path | None,
                             task: str = "res", box_format: str = "loc", split: str = "",
                             rng: random.Random | None = None) -> Sample:
    """One jsonl line -> one sample (see the module docstring)."""
    rng = rng or random.Random(sample_id)
    for key in ("img_path", "expression", "bbox"):
        if key not in record:
            raise SampleError(sample_id, key, "is missing")
    expression = record["expression"]
    if not isinstance(expression, str) or is_blank(expression):
        raise SampleError(sample_id, "expression", f"must be a non-empty string (not only whitespace or zero-width "
                                                   f"characters), got {expression!r:.60}")
    width, height = _number(record, "width", sample_id), _number(record, "height", sample_id)
    bbox = record["bbox"]
    if (not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox)
            or bbox[2] <= 0 or bbox[3] <= 0):
        raise SampleError(sample_id, "bbox", f"must be [x, y, w, h] with w, h > 0 (COCO pixels), got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    box = [max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)]
    masks = None
    if task == "res" or record.get("segmentation") is not None:
        if record.get("segmentation") is None:
            raise SampleError(sample_id, "segmentation", "is missing; --task res needs a mask per sample")
        try:
            masks = [png_bytes(segmentation_mask(record["segmentation"], width, height))]
        except (ValueError, TypeError, KeyError) as err:
            raise SampleError(sample_id, "segmentation", str(err)) from None
    templates, answer = (RES_TEMPLATES, RES_ANSWER) if task == "res" else (REC_TEMPLATES, REC_ANSWER)
    question = f"{IMAGE_PLACEHOLDER}\n{fill_expression(rng.choice(templates), expression)}"
    if box_format == "text":
        normalised = normalise_boxes([box], width, height)[0].tolist()
        text_box = "[" + ", ".join(f"{v:.3f}" for v in normalised) + "]"
        answer = answer.replace(BOXES_PLACEHOLDER, text_box).replace(MASKS_PLACEHOLDER, text_box)
    folder = Path(image_folder) if image_folder else None
    image = str(folder / record["img_path"]) if folder else str(record["img_path"])
    dataset = str(record.get("dataset_name") or "refcoco")
    meta = {"source": "refcoco", "dataset_name": f"{dataset}/{split}" if split else dataset, "task": task,
            "expression": expression.strip()}
    for key in ("cat", "segment_id", "img_path"):
        if key in record:
            meta[key] = record[key]
    return Sample(id=sample_id, messages=[{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}],
                  images=[image], boxes=[box], masks=masks, meta=meta)


def read_refcoco_jsonl(path: str | Path, image_folder: str | Path | None = None, *, task: str = "res",
                       box_format: str = "loc", split: str | None = None, seed: int = 0,
                       errors: list[dict[str, str]] | None = None, stats=None) -> Iterator[Sample]:
    """Yield samples; with `errors` given, unusable lines are appended there instead of raising."""
    if task not in ("rec", "res"):
        raise ValueError(f"task must be 'rec' or 'res', got {task!r}")
    if box_format not in ("loc", "text"):
        raise ValueError(f"box_format must be 'loc' or 'text', got {box_format!r}")
    path = Path(path)
    split = path.stem if split is None else split
    with path.open(encoding="utf-8") as stream:
        for line_no, line in enumerate(stream, 1):
            if not line.strip():
                continue
            sample_id = f"{split}-{line_no:07d}"
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SampleError(sample_id, "line", f"malformed JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise SampleError(sample_id, "line", "must be a JSON object")
                sample = refcoco_record_to_sample(record, sample_id, image_folder, task, box_format, split,
                                                  random.Random(f"{seed}-{sample_id}"))
            except SampleError as err:
                skip_or_raise(err, f"{path}:{line_no}", errors)
                continue
            if stats is not None:
                stats[sample.meta["dataset_name"]] += 1
            yield sample


# ------------------------------------------------------------------------------ vlsafe make-shards refcoco
class RefCocoSource(DataSource):
    name = "refcoco"
    help = "Shikra-style REC/RES jsonl (RefCOCO/+/g) + COCO image folder"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--jsonl", required=True, nargs="+",
                            help="one or more Shikra-style REC/RES .jsonl files")
        parser.add_argument("--images", default=None, help="folder the 'img_path' values are relative to")
        parser.add_argument("--task", choices=["rec", "res"], default="res",
                            help="instruction and answer style: box (rec) or mask (res); masks are kept whenever "
                                 "the line has a segmentation (default res, as PerceptionGPT trains)")
        parser.add_argument("--box-format", choices=["loc", "text"], default="loc",
                            help="answers with <boxes>/<masks> placeholders (loc, default) or text coordinates")
        parser.add_argument("--split", default=None, help="split name in meta.dataset_name (default: file stem)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the template choice")

    def samples(self, args: argparse.Namespace, errors: list[dict[str, str]] | None,
                stats: MutableMapping[str, int]) -> Iterator[Sample]:
        for path in args.jsonl:
            yield from read_refcoco_jsonl(path, args.images, task=args.task, box_format=args.box_format,
                                          split=args.split, seed=args.seed, errors=errors, stats=stats)
