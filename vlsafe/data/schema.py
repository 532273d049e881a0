"""The one sample record every converter produces and every method consumes.

A `Sample` is a conversation with `<image>` placeholders plus the optional extras each method needs
(preference responses, class labels, boxes and masks). Keeping one schema means a VLGuard shard, a
BPO shard and a RefCOCO shard all flow through the same writer, reader and validator.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

from vlsafe.constants import IMAGE_PLACEHOLDER

#: What to do with a bad sample: stop with a `SampleError` naming it, or skip it (counted and reported).
OnError = Literal["raise", "skip"]

ROLES = ("system", "user", "assistant")
# Boxes may overshoot the image by this many pixels (float rounding in released annotations, e.g. COCO's
# x + w); beyond it a box is refused as lying outside the image.
BOX_TOLERANCE = 1.0
# Text fields longer than this many characters are refused before tokenising (`VLMProcessor(max_text_chars=)`,
# env `VLSAFE_MAX_TEXT_CHARS`). 100,000 characters are ~25,000 tokens of English, 12x the longest max_length of
# the recipes (2048), and took 1.7 s to tokenise with the tests' 300-entry BPE (92,699 tokens); the 24 MB field
# that motivated the cap took 70 s and 7.2 GB of RAM in one loader worker before the length check refused it.
DEFAULT_MAX_TEXT_CHARS = 100_000
# Letters that render as nothing (Hangul fillers, braille blank); with whitespace and the format characters
# (Unicode category Cf: zero-width spaces and joiners, BOM, bidi marks, soft hyphen) they make a text blank.
_INVISIBLE_LETTERS = "\u115f\u1160\u3164\uffa0\u2800"


class SampleError(ValueError):
    """A sample that cannot be used, with the sample id and the offending field in the message."""

    def __init__(self, sample_id: str, field_name: str, problem: str, where: str | None = None):
        self.sample_id = sample_id
        self.field_name = field_name
        self.problem = problem
        self.where = where
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}sample {sample_id!r}, field {field_name!r}: {problem}")


class SampleLeftOut(SampleError):
    """A sample a method's data rule leaves out on purpose (e.g. MMSafe-PO drops a pair whose chosen response
    is over the length limit). Not an error: the data pipeline counts and reports it whatever `on_error` says,
    so a long run never stops on it."""


def is_blank(text: str) -> bool:
    """True when `text` shows nothing: only whitespace, zero-width/format characters (U+200B, U+FEFF, ...) or
    invisible fillers. An answer of zero-width spaces is no answer, so every "non-empty" check uses this."""
    stripped = text.strip()
    if not stripped:
        return True
    first = stripped[0]
    if unicodedata.category(first) != "Cf" and first not in _INVISIBLE_LETTERS:
        return False  # the common case: decided by the first visible character, whatever the length
    return _visible_character().search(stripped) is None


@functools.lru_cache(maxsize=1)
def _visible_character() -> re.Pattern:
    invisible = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"]
    return re.compile("[^\\s" + "".join(re.escape(c) for c in invisible + list(_INVISIBLE_LETTERS)) + "]")


def default_max_text_chars() -> int:
    """The per-field character cap (env `VLSAFE_MAX_TEXT_CHARS`, default 100,000)."""
    value = os.environ.get("VLSAFE_MAX_TEXT_CHARS")
    return int(value) if value else DEFAULT_MAX_TEXT_CHARS


def check_text_length(text: str, limit: int | None, sample_id: str, field_name: str) -> None:
    """Refuse a text longer than `limit` characters before any tokenizer sees it (None: no limit).

    Tokenising is linear in the text but costly per character (a 24 MB field: 70 s and 7.2 GB in one worker)
    and the result is refused or truncated anyway, so the check comes first and takes microseconds."""
    if limit is not None and len(text) > limit:
        raise SampleError(sample_id, field_name, f"is {len(text):,} characters long, over max_text_chars={limit:,}; "
                                                 f"refused before tokenising (raise the cap with max_text_chars or "
                                                 f"VLSAFE_MAX_TEXT_CHARS if such long texts are intended)")


@dataclass
class Sample:
    """One training or evaluation example.

    - `messages`: `[{"role": "user"|"assistant"|"system", "content": str}]`. Images are referenced by
      `<image>` placeholders, one per entry of `images`, in order. SFT samples end with an assistant
      turn; preference and evaluation prompts end with a user turn.
    - `images`: encoded image bytes (what shards store) or file paths (what converters may produce).
    - `chosen` / `rejected` / `blind`: assistant responses for preference methods.
    - `labels`: named class labels, e.g. `{"safe": 1.0}` or `{"chosen_safe": 1.0, "rejected_safe": 0.0}`.
    - `boxes`: `[[x1, y1, x2, y2], ...]` in pixels of the first image; `masks`: PNG bytes (mode "L",
      non-zero = inside), one per box, the size of the first image.
    - `meta`: free-form provenance: `source`, `category`, `task`, `answer`, `candidates`, ...
    """

    id: str
    messages: list[dict[str, str]]
    images: list[bytes | str] = field(default_factory=list)
    chosen: str | None = None
    rejected: str | None = None
    blind: str | None = None
    labels: dict[str, float] = field(default_factory=dict)
    boxes: list[list[float]] | None = None
    masks: list[bytes] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ validation
    def validate(self, where: str | None = None) -> "Sample":
        """Raise `SampleError` naming this sample and the field if the record is unusable.

        Every field is type-checked here (records come from scraped JSON), so a malformed sample fails
        with `SampleError` rather than a `TypeError` deep inside tokenisation or collation.
        """

        def fail(field_name: str, problem: str) -> None:
            raise SampleError(str(self.id), field_name, problem, where)

        if not isinstance(self.id, str) or is_blank(self.id):
            fail("id", "must be a non-empty string (not only whitespace or zero-width characters)")
        if not isinstance(self.messages, list) or not self.messages:
            fail("messages", "must be a non-empty list of {role, content}")
        for i, message in enumerate(self.messages):
            if not isinstance(message, dict) or set(message) != {"role", "content"}:
                fail(f"messages[{i}]", "must be a dict with exactly the keys 'role' and 'content'")
            if not isinstance(message["role"], str) or message["role"] not in ROLES:
                fail(f"messages[{i}].role", f"{message['role']!r:.60} is not one of {ROLES}")
            if not isinstance(message["content"], str):
                fail(f"messages[{i}].content", "must be a string")
            if message["role"] == "assistant" and is_blank(message["content"]):
                fail(f"messages[{i}].content", "assistant turn is empty (or only whitespace/zero-width characters)")
        if not isinstance(self.images, list) or not all(isinstance(im, (bytes, bytearray, str)) for im in self.images):
            fail("images", "must be a list of encoded image bytes or file paths")
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in self.messages)
        if placeholders != len(self.images):
            fail("messages", f"has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but the sample has "
                             f"{len(self.images)} image(s)")
        for name in ("chosen", "rejected", "blind"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or is_blank(value)):
                fail(name, "must be a non-empty string when given (not only whitespace or zero-width characters)")
            if isinstance(value, str) and IMAGE_PLACEHOLDER in value:
                # A placeholder in a response would add image slots that no image fills.
                fail(name, f"a response must not contain {IMAGE_PLACEHOLDER}")
        if not isinstance(self.labels, dict):
            fail("labels", "must be a mapping of name -> number")
        for key, value in self.labels.items():
            if not isinstance(key, str) or not (isinstance(value, bool) or _is_finite_number(value)):
                fail(f"labels.{key}", f"must be a finite number, got {value!r:.60}")
        if self.boxes is not None:
            if not isinstance(self.boxes, list):
                fail("boxes", "must be a list of [x1, y1, x2, y2]")
            for i, box in enumerate(self.boxes):
                if not isinstance(box, list) or len(box) != 4 or not all(_is_finite_number(v) for v in box):
                    fail(f"boxes[{i}]", f"must be four finite numbers [x1, y1, x2, y2], got {box!r:.80}")
                if box[2] < box[0] or box[3] < box[1]:
                    fail(f"boxes[{i}]", f"has x2 < x1 or y2 < y1: {box!r}")
                if min(box) < -BOX_TOLERANCE:
                    fail(f"boxes[{i}]", f"has a negative coordinate: {box!r}")
            if not self.images:
                fail("boxes", "boxes refer to the first image, but the sample has none")
        if self.masks is not None:
            if not isinstance(self.masks, list) or not all(isinstance(m, (bytes, bytearray, str)) for m in self.masks):
                fail("masks", "must be a list of PNG bytes (or paths)")
            if self.boxes is None or len(self.masks) != len(self.boxes):
                fail("masks", f"has {len(self.masks)} mask(s) for {len(self.boxes or [])} box(es); masks come one "
                              f"per box")
        if not isinstance(self.meta, dict):
            fail("meta", "must be a JSON object")
        for name in ("id", "messages", "chosen", "rejected", "blind", "labels", "boxes", "meta"):
            problem = _json_problem(getattr(self, name))
            if problem:
                fail(name, problem)
        return self

    def check_geometry(self, image_size: tuple[int, int], mask_sizes: list[tuple[int, int]] | None = None,
                       where: str | None = None) -> "Sample":
        """Boxes must lie inside the first image and masks must have its size (needs the decoded sizes)."""
        width, height = image_size
        for i, box in enumerate(self.boxes or []):
            if box[2] > width + BOX_TOLERANCE or box[3] > height + BOX_TOLERANCE:
                raise SampleError(self.id, f"boxes[{i}]", f"{box!r} lies outside the {width}x{height} image", where)
        for i, size in enumerate(mask_sizes or []):
            if tuple(size) != (width, height):
                raise SampleError(self.id, f"masks[{i}]", f"is {size[0]}x{size[1]} but the image is "
                                                          f"{width}x{height}", where)
        return self

    def text_fields(self) -> Iterator[tuple[str, str]]:
        """(field name, text) for every text a model reads: message contents and the responses."""
        for i, message in enumerate(self.messages if isinstance(self.messages, list) else []):
            if isinstance(message, dict) and isinstance(message.get("content"), str):  # also before validate()
                yield f"messages[{i}].content", message["content"]
        for name in ("chosen", "rejected", "blind"):
            if isinstance(getattr(self, name), str):
                yield name, getattr(self, name)

    @property
    def is_conversation_complete(self) -> bool:
        """True when the last turn is an assistant answer (an SFT sample)."""
        return self.messages[-1]["role"] == "assistant"

    # ------------------------------------------------------------------ (de)serialisation
    def metadata(self) -> dict[str, Any]:
        """Everything except image and mask bytes, as JSON-safe data."""
        out: dict[str, Any] = {"id": self.id, "messages": self.messages, "num_images": len(self.images)}
        for name in ("chosen", "rejected", "blind", "boxes"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.labels:
            out["labels"] = self.labels
        if self.masks is not None:
            out["num_masks"] = len(self.masks)
        if self.meta:
            out["meta"] = self.meta
        return out

    def to_json(self) -> bytes:
        return json.dumps(self.metadata(), ensure_ascii=False, sort_keys=True, allow_nan=False).encode("utf-8")

    @classmethod
    def from_metadata(cls, data: dict[str, Any], images: list[bytes | str], masks: list[bytes] | None,
                      where: str | None = None) -> "Sample":
        """Rebuild a sample from its stored metadata and members; call `validate` on the result."""
        sample_id = str(data.get("id", "?"))
        if "messages" not in data:
            raise SampleError(sample_id, "messages", "is missing", where)
        num_images = data.get("num_images", len(images))
        if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images != len(images):
            raise SampleError(sample_id, "images", f"expected {num_images!r:.20} image(s), found {len(images)}", where)
        num_masks = data.get("num_masks", len(masks or []))
        if num_masks != len(masks or []):
            raise SampleError(sample_id, "masks", f"expected {num_masks!r:.20} mask(s), found {len(masks or [])}", where)
        return cls(id=sample_id, messages=data["messages"], images=images, chosen=data.get("chosen"),
                   rejected=data.get("rejected"), blind=data.get("blind"), labels=data.get("labels", {}),
                   boxes=data.get("boxes"), masks=masks, meta=data.get("meta", {}))


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_problem(value: Any, path: str = "") -> str | None:
    """Why `value` would not come back unchanged from strict UTF-8 JSON (None if it would)."""
    if value is None or isinstance(value, (bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path or 'value'} is {value} (JSON has no NaN/Infinity)"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return f"{path or 'text'} is not valid Unicode (lone surrogate at position {err.start})"
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if (problem := _json_problem(item, f"{path}[{i}]")) is not None:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path or 'mapping'} has a non-string key {key!r:.40}"
            if (problem := _json_problem(key, f"{path}.<key>")) or (problem := _json_problem(item, f"{path}.{key}")):
                return problem
        return None
    return f"{path or 'value'} is a {type(value).__name__}, not plain JSON data"
