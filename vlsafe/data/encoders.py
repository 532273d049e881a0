"""Per-sample encoders shared by methods: supervised conversations and generation prompts.

An encoder is the picklable object the data pipeline runs in its workers: `encode(sample)` makes
tensors-to-be for one sample, `collate(items)` pads them into a batch.
"""
from __future__ import annotations

from typing import Any

import torch

from vlsafe.data.processor import VLMProcessor
from vlsafe.data.schema import Sample


def stack_images(items: list[dict[str, Any]], processor: VLMProcessor, normalized: bool = True) -> torch.Tensor:
    """Concatenate per-sample image stacks in sample order (the order `VLM.embed` consumes them)."""
    stacks = [item["pixel_values"] for item in items if item["pixel_values"].shape[0]]
    if not stacks:
        dtype = torch.float32 if normalized else torch.uint8
        return torch.zeros(0, 3, processor.image_size, processor.image_size, dtype=dtype)
    return torch.cat(stacks)


class ImageEncoding:
    """`normalize_images`: True (default) gives normalised float32 `pixel_values`; `ShardDataModule` turns it
    off in its loader workers, ships uint8 (a quarter of the bytes) and normalises after the device transfer."""

    normalize_images: bool = True
    processor: VLMProcessor

    def pixels(self, sample: Sample) -> torch.Tensor:
        return self.processor.preprocess_images(sample.images, sample.id, normalize=self.normalize_images)


class ConversationEncoder(ImageEncoding):
    """SFT: the whole conversation, labels on assistant replies only, right padding."""

    def __init__(self, processor: VLMProcessor):
        self.processor = processor

    def encode(self, sample: Sample) -> dict[str, Any]:
        encoded = self.processor.encode_conversation(sample.messages, sample.id)
        return {"id": sample.id, "input_ids": encoded.input_ids, "labels": encoded.labels,
                "pixel_values": self.pixels(sample),
                "truncated": encoded.truncated}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.processor.collate_text([i["input_ids"] for i in items], [i["labels"] for i in items], "right")
        batch["pixel_values"] = stack_images(items, self.processor, self.normalize_images)
        batch["ids"] = [i["id"] for i in items]
        batch["num_truncated"] = sum(bool(i["truncated"]) for i in items)
        return batch


def split_reference(sample: Sample) -> tuple[list[dict[str, str]], str | None]:
    """A prompt is the conversation up to its last user turn; a trailing assistant turn is the reference."""
    messages = list(sample.messages)
    reference = None
    if messages and messages[-1]["role"] == "assistant":
        reference = messages.pop()["content"]
    return messages, reference


class PromptEncoder(ImageEncoding):
    """Generation: the prompt up to `ASSISTANT:`, left padding, the reference answer kept aside."""

    def __init__(self, processor: VLMProcessor):
        self.processor = processor

    def encode(self, sample: Sample) -> dict[str, Any]:
        messages, reference = split_reference(sample)
        encoded = self.processor.encode_prompt(messages, sample.id)
        return {"id": sample.id, "input_ids": encoded.input_ids,
                "pixel_values": self.pixels(sample),
                "reference": reference if reference is not None else sample.meta.get("answer"),
                "meta": sample.meta}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.processor.collate_text([i["input_ids"] for i in items], None, "left")
        batch["pixel_values"] = stack_images(items, self.processor, self.normalize_images)
        batch["ids"] = [i["id"] for i in items]
        batch["references"] = [i["reference"] for i in items]
        batch["meta"] = [i["meta"] for i in items]
        return batch


PREFERENCE_RESPONSES = ("chosen", "rejected", "blind")


class PreferenceEncoder(ImageEncoding):
    """Preference pairs: one prompt, several responses, labels on the final response only.

    A batch holds the sequences grouped by response (all chosen, then all rejected, then all blind),
    right-padded together, plus each sample's images once. Reference log-probs stored in the sample
    (`labels["ref_logp_<response>"]`, written by tools/precompute_reference.py) ride along when present.
    """

    def __init__(self, processor: VLMProcessor, responses: tuple[str, ...] = ("chosen", "rejected"),
                 require_reference: bool = False, average_logprob: bool = False,
                 response_format: str = "released", length_rule: str = "released"):
        from vlsafe.data.preference_encoding import LENGTH_RULES, RESPONSE_FORMATS, check_choice

        unknown = set(responses) - set(PREFERENCE_RESPONSES)
        if unknown or responses[:2] != ("chosen", "rejected"):
            raise ValueError(f"responses must start with ('chosen', 'rejected') and use {PREFERENCE_RESPONSES}")
        self.processor = processor
        self.responses = tuple(responses)
        self.require_reference = require_reference
        self.average_logprob = average_logprob
        # which tokens are scored and what a too-long pair becomes: vlsafe/data/preference_encoding.py
        self.response_format = check_choice("response_format", response_format, RESPONSE_FORMATS)
        self.length_rule = check_choice("length_rule", length_rule, LENGTH_RULES)

    def encode(self, sample: Sample) -> dict[str, Any]:
        from vlsafe.data.preference_encoding import encode_pair
        from vlsafe.data.schema import SampleError, is_blank

        messages, _ = split_reference(sample)
        texts = {}
        for name in self.responses:
            text = getattr(sample, name)
            if text is None or is_blank(text):
                raise SampleError(sample.id, name, "is missing; preference training needs it")
            texts[name] = text
        if texts["chosen"].strip() == texts["rejected"].strip():
            raise SampleError(sample.id, "rejected", "is identical to chosen; the pair carries no preference")
        self.processor.check_text_lengths(messages + [{"role": "assistant", "content": t} for t in texts.values()],
                                          sample.id)
        pair = encode_pair(self.processor, messages, texts, sample.id, self.response_format, self.length_rule)
        reference = {name: sample.labels.get(f"ref_logp_{name}") for name in self.responses}
        if self.require_reference:
            self._check_reference(sample, reference)
        return {"id": sample.id, "sequences": pair.sequences, "truncated": pair.truncated, "reference": reference,
                "meta": sample.meta, "pixel_values": self.pixels(sample)}

    def _check_reference(self, sample: Sample, reference: dict[str, float | None]) -> None:
        from vlsafe.data.schema import SampleError

        for name, value in reference.items():
            if value is None:
                raise SampleError(sample.id, f"labels.ref_logp_{name}", "is missing; reference='precomputed' needs "
                                                                        "shards written by tools/precompute_reference.py")
        provenance = sample.meta.get("reference") or {}
        written_with = provenance.get("average_logprob")
        if written_with is not None and bool(written_with) != self.average_logprob:
            raise SampleError(sample.id, "meta.reference.average_logprob",
                              f"reference log-probs were computed with average_logprob={written_with} but the "
                              f"module uses {self.average_logprob}")
        for name in ("response_format", "length_rule"):  # other scored tokens -> other log-probs
            if provenance.get(name) is not None and provenance[name] != getattr(self, name):
                raise SampleError(sample.id, f"meta.reference.{name}",
                                  f"reference log-probs were computed with {name}={provenance[name]!r} but the "
                                  f"module uses {getattr(self, name)!r}")

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [item["sequences"][name][0] for name in self.responses for item in items]
        labels = [item["sequences"][name][1] for name in self.responses for item in items]
        batch = self.processor.collate_text(ids, labels, "right")
        batch["pixel_values"] = stack_images(items, self.processor, self.normalize_images)
        batch["ids"] = [item["id"] for item in items]
        batch["responses"] = list(self.responses)
        # responses the length rule cut, per name: the module reports them at the end of the run
        batch["truncated_responses"] = {name: sum(name in item["truncated"] for item in items)
                                        for name in self.responses}
        values = [[item["reference"][name] for item in items] for name in self.responses]
        batch["ref_logps"] = (torch.tensor(values, dtype=torch.float32)
                              if all(v is not None for row in values for v in row) else None)
        return batch
