"""The one sample record every converter produces and every method consumes.

A `Sample` is a conversation with `<image>` placeholders plus the optional extras each method needs
(preference responses, class labels, boxes and masks). Keeping one schema means a VLGuard shard, a
BPO shard and a RefCOCO shard all flow through the same writer, reader and validator.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")


class SampleError(ValueError):
    """A sample that cannot be used, with the sample id and the offending field in the message."""

    def __init__(self, sample_id: str, field_name: str, problem: str, where: str | None = None):
        self.sample_id = sample_id
        self.field_name = field_name
        self.problem = problem
        self.where = where
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}sample {sample_id!r}, field {field_name!r}: {problem}")


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
        """Raise `SampleError` naming this sample and the field if the record is unusable."""

        def fail(field_name: str, problem: str) -> None:
            raise SampleError(str(self.id), field_name, problem, where)

        if not isinstance(self.id, str) or not self.id:
            fail("id", "must be a non-empty string")
        if not isinstance(self.messages, list) or not self.messages:
            fail("messages", "must be a non-empty list of {role, content}")
        for i, message in enumerate(self.messages):
            if not isinstance(message, dict) or set(message) != {"role", "content"}:
                fail(f"messages[{i}]", "must be a dict with exactly the keys 'role' and 'content'")
            if message["role"] not in ROLES:
                fail(f"messages[{i}].role", f"{message['role']!r} is not one of {ROLES}")
            if not isinstance(message["content"], str):
                fail(f"messages[{i}].content", "must be a string")
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in self.messages)
        if placeholders != len(self.images):
            fail("messages", f"has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but the sample has "
                             f"{len(self.images)} image(s)")
        for name in ("chosen", "rejected", "blind"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                fail(name, "must be a non-empty string when given")
        for key, value in self.labels.items():
            if not isinstance(value, (int, float)) or value != value:  # NaN check
                fail(f"labels.{key}", f"must be a number, got {value!r}")
        if self.boxes is not None:
            for i, box in enumerate(self.boxes):
                if len(box) != 4 or any(not isinstance(v, (int, float)) or v != v for v in box):
                    fail(f"boxes[{i}]", f"must be four finite numbers [x1, y1, x2, y2], got {box!r}")
                if box[2] < box[0] or box[3] < box[1]:
                    fail(f"boxes[{i}]", f"has x2 < x1 or y2 < y1: {box!r}")
        if self.masks is not None and self.boxes is not None and len(self.masks) != len(self.boxes):
            fail("masks", f"has {len(self.masks)} masks for {len(self.boxes)} boxes")
        return self

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
        return json.dumps(self.metadata(), ensure_ascii=False, sort_keys=True).encode("utf-8")

    @classmethod
    def from_metadata(cls, data: dict[str, Any], images: list[bytes | str], masks: list[bytes] | None,
                      where: str | None = None) -> "Sample":
        sample_id = str(data.get("id", "?"))
        if "messages" not in data:
            raise SampleError(sample_id, "messages", "is missing", where)
        if len(images) != int(data.get("num_images", len(images))):
            raise SampleError(sample_id, "images", f"expected {data['num_images']} image(s), found {len(images)}",
                              where)
        return cls(id=sample_id, messages=data["messages"], images=images, chosen=data.get("chosen"),
                   rejected=data.get("rejected"), blind=data.get("blind"), labels=data.get("labels", {}),
                   boxes=data.get("boxes"), masks=masks, meta=data.get("meta", {}))
