"""LLaVA instruction JSON (`llava_v1_5_mix665k.json` and everything shaped like it) -> `Sample`s.

Input: a JSON list of `{"id", "image"?: "coco/train2017/x.jpg", "conversations": [{"from": "human"|"gpt",
"value": ...}]}`. The `<image>` placeholder is moved to the front of its turn, as LLaVA's
`preprocess_multimodal` does; images stay paths and are read (and checked) by the shard writer.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterator, MutableMapping

from vlsafe.constants import IMAGE_PLACEHOLDER
from vlsafe.data.encoding.templates import move_image_first
from vlsafe.data.schema import Sample, SampleError
from vlsafe.data.sources import skip_or_raise
from vlsafe.data.sources.base import DataSource

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def load_json_list(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON list (or JSON Lines) file with errors that name the file and position."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
                         f"re-encode the file as UTF-8") from None
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: malformed JSON line ({err.msg})") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno} column {err.colno} ({err.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    return data


def llava_record_to_sample(record: dict[str, Any], image_folder: str | Path | None, source: str = "llava") -> Sample:
    """One LLaVA record -> a `Sample` (not yet validated), or `SampleError` naming the record and field."""
    if not isinstance(record, dict):
        raise SampleError("?", "record", f"must be a JSON object, got {type(record).__name__}")
    sample_id = str(record.get("id", "?"))
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(sample_id, "conversations", "is missing or empty")
    messages = []
    for i, turn in enumerate(conversations):
        role = ROLE_NAMES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise SampleError(sample_id, f"conversations[{i}]", f"needs 'from' in {sorted(ROLE_NAMES)} and a string "
                                                                f"'value', got {turn!r:.120}")
        messages.append({"role": role, "content": move_image_first(turn["value"])})
    images = record.get("image") or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(name, str) and name for name in images):
        raise SampleError(sample_id, "image", f"must be a path or a list of paths, got {images!r:.80}")
    folder = Path(image_folder) if image_folder else None
    for name in images:
        if folder and (Path(name).is_absolute() or ".." in Path(name).parts):
            # A downloaded JSON must not pull files from outside the image folder into the shards.
            raise SampleError(sample_id, "image", f"{name!r} points outside the image folder")
    paths = [str(folder / name) if folder else str(name) for name in images]
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if paths and placeholders == 0:
        raise SampleError(sample_id, "conversations",
                          f"has {len(paths)} image(s) but no {IMAGE_PLACEHOLDER} placeholder")
    meta = {"source": source}
    for key in ("task", "category", "source_dataset"):
        if key in record:
            meta[key] = record[key]
    return Sample(id=sample_id, messages=messages, images=paths, meta=meta)


def read_llava_json(json_path: str | Path, image_folder: str | Path | None = None,
                    errors: list[dict[str, str]] | None = None) -> Iterator[Sample]:
    """Yield samples; with `errors` given, unusable records are appended there instead of raising."""
    for record in load_json_list(json_path):
        try:
            yield llava_record_to_sample(record, image_folder)
        except SampleError as err:
            skip_or_raise(err, str(json_path), errors)


# ------------------------------------------------------------------------------ vlsafe make-shards llava
class LlavaSource(DataSource):
    name = "llava"
    help = "LLaVA-format JSON + image folder"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", required=True, help="LLaVA JSON list or JSONL file")
        parser.add_argument("--images", default=None, help="folder the 'image' paths are relative to")

    def samples(self, args: argparse.Namespace, errors: list[dict[str, str]] | None,
                stats: MutableMapping[str, int]) -> Iterator[Sample]:
        return read_llava_json(args.json, args.images, errors)
