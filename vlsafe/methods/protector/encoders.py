"""Encoders for the text-only models of MLLM-Protector: the harm detector and the detoxifier.

Both follow `vlsafe.data.encoding.encoders`: `encode(sample)` runs in the dataloader workers, `collate(items)` pads.
The input formats are defined once, per preset, in `vlsafe.methods.protector.presets`: `released` reproduces the
released MLLM-Protector code byte for byte (it trains and infers with different formats, twice); `vlsafe` uses
one format for training and inference. The inference wrappers in `vlsafe.methods.protector` call the same functions.

Which samples they read (`vlsafe.data.schema.Sample`):

- a **pair**: `messages` ending with the user's question, `chosen` = the safer response, `rejected` = the
  other one, `labels = {"chosen_safe": 0|1, "rejected_safe": 0|1}` (PKU-SafeRLHF, synthetic `harm_text`);
- a **single labelled response**: `messages = [user question, assistant response]`, `labels = {"safe": 0|1}`
  (harmful_vs_unharmful-style data).

Label semantics everywhere: **1 = safe**, so the detector's `sigmoid(logit)` is P(safe).
"""
from __future__ import annotations

from typing import Any

import torch

from vlsafe.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
from vlsafe.data.schema import (
    Sample,
    SampleError,
    check_text_length,
    default_max_text_chars,
    is_blank,
)
from vlsafe.methods.protector.presets import (  # noqa: F401
    DETECTOR_TEMPLATE,
    DETOX_TEMPLATE,
    REFUSAL,
    VLSAFE,
    ProtectorPreset,
    get_preset,
)

DEFAULT_MAX_LENGTH = 512


def format_detector_input(question: str, answer: str, template: str = DETECTOR_TEMPLATE, strip: bool = True) -> str:
    """The detector's input text; `strip=False` keeps the strings as stored (the released concatenation)."""
    if strip:
        question, answer = question.strip(), answer.strip()
    return template.format(question=question, answer=answer)


def format_detox_prompt(question: str, answer: str, template: str = DETOX_TEMPLATE, strip: bool = True) -> str:
    """The detoxifier's prompt (the target follows it directly)."""
    if strip:
        question, answer = question.strip(), answer.strip()
    return template.format(question=question, answer=answer)


def sample_question(sample: Sample, strip: bool = True) -> str:
    """The question a response answers: the last user turn, `<image>` placeholders removed (with the newline
    after one); `strip=False` keeps the rest of the turn exactly as stored."""
    users = [m["content"] for m in sample.messages if m["role"] == "user"]
    if not users:
        raise SampleError(sample.id, "messages", "has no user turn to take the question from")
    check_text_length(users[-1], default_max_text_chars(), sample.id, "messages")
    question = users[-1].replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
    if is_blank(question):
        raise SampleError(sample.id, "messages", "the last user turn is empty once <image> is removed")
    return question.strip() if strip else question


def _label(sample: Sample, key: str, required: bool) -> float | None:
    value = sample.labels.get(key)
    if value is None:
        if required:
            raise SampleError(sample.id, f"labels.{key}", "is missing (1 = safe, 0 = unsafe)")
        return None
    if not 0.0 <= float(value) <= 1.0:
        raise SampleError(sample.id, f"labels.{key}", f"must be in [0, 1] (1 = safe), got {value!r}")
    return float(value)


def labelled_responses(sample: Sample, require_labels: bool = True) -> tuple[list[tuple[str, str, float | None]], bool]:
    """`([(field, response, p_safe_label), ...], is_pair)`: (chosen, rejected) for a pair, else the final
    assistant turn with `labels["safe"]`."""
    if sample.chosen is not None or sample.rejected is not None:
        out = []
        for name in ("chosen", "rejected"):
            text = getattr(sample, name)
            if text is None or is_blank(text):
                raise SampleError(sample.id, name, "is missing; a response pair needs chosen and rejected")
            check_text_length(text, default_max_text_chars(), sample.id, name)
            out.append((name, text, _label(sample, f"{name}_safe", require_labels)))
        return out, True
    if sample.messages[-1]["role"] != "assistant" or is_blank(sample.messages[-1]["content"]):
        raise SampleError(sample.id, "messages", "needs a final assistant response (or chosen/rejected) to score")
    check_text_length(sample.messages[-1]["content"], default_max_text_chars(), sample.id, "messages[-1]")
    return [("messages[-1]", sample.messages[-1]["content"], _label(sample, "safe", require_labels))], False


def tokenize(tokenizer, text: str, sample_id: str, field_name: str, max_length: int | None,
             add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; longer than `max_length` is a `SampleError` (counted skip with on_error=skip)."""
    ids = plain_text_ids(tokenizer, text, add_special_tokens)
    if max_length is not None and len(ids) > max_length:
        raise SampleError(sample_id, field_name, f"is {len(ids)} tokens long with its question, over the "
                                                 f"max_length of {max_length}")
    return list(ids)


def plain_text_ids(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of user text with special-token strings read as text: a `</s>` inside an answer must not end
    it. The tokenizer's own BOS/EOS (`add_special_tokens`) are still added as ids. Inference uses it too."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"])


def pad(sequences: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in sequences)
    rows = [(s + [value] * (width - len(s))) if side == "right" else ([value] * (width - len(s)) + s)
            for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


def pad_batch(sequences: list[list[int]], pad_token_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    input_ids = pad(sequences, pad_token_id, side)
    mask = pad([[1] * len(s) for s in sequences], 0, side)
    return {"input_ids": input_ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------- detector
class DetectorEncoder:
    """Harm-detector inputs: every response becomes `"Question: {q}\n\nAnswer: {r}"`, right-padded.

    Accepts pairs (two rows) and single labelled responses (one row). A batch is the flat list of rows
    plus `pairs`, a `[P, 2]` tensor of (safer row, other row) indices for the samples that are pairs.
    `require_labels=False` (predict) allows unlabelled responses (label NaN). Over-long inputs raise
    `SampleError` — never silently truncated in training (the released script drops them too). Both presets
    train on the same template; `released` keeps question and response as stored, `vlsafe` strips them.
    """

    def __init__(self, tokenizer, max_length: int = DEFAULT_MAX_LENGTH, category_key: str = "category",
                 require_labels: bool = True, preset: str | ProtectorPreset = VLSAFE):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.category_key, self.require_labels = category_key, require_labels
        self.preset = get_preset(preset)

    def encode(self, sample: Sample) -> dict[str, Any]:
        strip, template = self.preset.strip, self.preset.detector_train_template
        question = sample_question(sample, strip)
        responses, is_pair = labelled_responses(sample, self.require_labels)
        rows = [tokenize(self.tokenizer, format_detector_input(question, text, template, strip), sample.id, name,
                         self.max_length)
                for name, text, _ in responses]
        labels = [float("nan") if label is None else label for _, _, label in responses]
        return {"id": sample.id, "rows": rows, "labels": labels, "pair": is_pair,
                "category": str(sample.meta.get(self.category_key, "none"))}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        rows, labels, categories, pairs, row_ids = [], [], [], [], []
        for item in items:
            start = len(rows)
            rows += item["rows"]
            labels += item["labels"]
            categories += [item["category"]] * len(item["rows"])
            row_ids += [item["id"]] * len(item["rows"])
            if item["pair"]:
                pairs.append((start, start + 1))
        batch = pad_batch(rows, self.tokenizer.pad_token_id, "right")
        batch["labels"] = torch.tensor(labels, dtype=torch.float32)
        batch["pairs"] = torch.tensor(pairs, dtype=torch.long).view(-1, 2)
        batch["categories"] = categories
        batch["ids"] = [item["id"] for item in items]
        batch["row_ids"] = row_ids
        return batch


# ---------------------------------------------------------------------------------------- detoxifier
def detox_pair(sample: Sample, refusal: str = REFUSAL, refuse_when: str = "chosen") -> tuple[str, str]:
    """(original, target) for detoxifier training from a labelled pair.

    original = the less safe response (`rejected`); target = the safer response (`chosen`), or `refusal` when
    the safer one is unsafe too (`refuse_when="chosen"`, vlsafe) or when both are labelled unsafe
    (`refuse_when="both"`, the released rule).
    """
    responses, is_pair = labelled_responses(sample, require_labels=True)
    if not is_pair:
        raise SampleError(sample.id, "chosen", "is missing; detoxifier training needs (safer, less safe) pairs")
    (_, chosen, chosen_safe), (_, rejected, rejected_safe) = responses
    if refuse_when == "both":
        refuse = chosen_safe < 0.5 and rejected_safe < 0.5
    elif refuse_when == "chosen":
        refuse = chosen_safe < 0.5
    else:
        raise ValueError(f"refuse_when must be 'both' or 'chosen', got {refuse_when!r}")
    return rejected, (refusal if refuse else chosen)


class DetoxifierEncoder:
    """Detoxifier SFT: `prompt(question, original) + target + EOS`; loss on the target and EOS only.

    `template` and `refusal` default to the preset's training prompt and both-unsafe target. With the
    `released` preset the ids are those of the released script: `prompt + target` tokenized in one go, EOS
    appended, and as many leading tokens masked as the prompt has on its own.
    """

    def __init__(self, tokenizer, template: str | None = None, refusal: str | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH, preset: str | ProtectorPreset = VLSAFE):
        if tokenizer.eos_token_id is None:
            raise ValueError("the detoxifier's tokenizer needs an eos token (the target ends with it)")
        self.preset = get_preset(preset)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.template = template if template is not None else self.preset.detox_train_template
        self.refusal = refusal if refusal is not None else self.preset.both_unsafe_target

    def encode(self, sample: Sample) -> dict[str, Any]:
        strip = self.preset.strip
        question = sample_question(sample, strip)
        original, target = detox_pair(sample, self.refusal, self.preset.refuse_when)
        target = target.strip() if strip else target
        prompt_text = format_detox_prompt(question, original, self.template, strip)
        prompt = tokenize(self.tokenizer, prompt_text, sample.id, "rejected", None)
        if self.preset.joint_detox_tokens:
            # released: tokenizer(source + target + eos_token) with labels[:len(tokenizer(source))] = -100;
            # the EOS text is a special token, so appending its id is the same as tokenizing it
            input_ids = tokenize(self.tokenizer, prompt_text + target, sample.id, "chosen", None)
            input_ids.append(self.tokenizer.eos_token_id)
            n_masked = min(len(prompt), len(input_ids))
            labels = [IGNORE_INDEX] * n_masked + input_ids[n_masked:]
        else:
            answer = tokenize(self.tokenizer, target, sample.id, "chosen", None, add_special_tokens=False)
            answer.append(self.tokenizer.eos_token_id)
            input_ids, labels = prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
        if len(input_ids) > self.max_length:
            raise SampleError(sample.id, "chosen", f"prompt + target are {len(input_ids)} tokens, over "
                                                   f"the max_length of {self.max_length}")
        return {"id": sample.id, "input_ids": input_ids, "labels": labels, "target": target}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pad_batch([i["input_ids"] for i in items], self.tokenizer.pad_token_id, "right")
        batch["labels"] = pad([i["labels"] for i in items], IGNORE_INDEX, "right")
        batch["ids"] = [i["id"] for i in items]
        batch["targets"] = [i["target"] for i in items]
        return batch


class DetoxPromptEncoder:
    """Detoxifier generation prompts (left-padded): the preset's inference prompt (vlsafe: the training
    prompt), without the target; the reference target comes from the preset's training rule."""

    def __init__(self, tokenizer, template: str | None = None, refusal: str | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH, preset: str | ProtectorPreset = VLSAFE):
        self.preset = get_preset(preset)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.template = template if template is not None else self.preset.detox_inference_template
        self.refusal = refusal if refusal is not None else self.preset.both_unsafe_target

    def encode(self, sample: Sample) -> dict[str, Any]:
        strip = self.preset.strip
        question = sample_question(sample, strip)
        if sample.chosen is not None or sample.rejected is not None:
            original, target = detox_pair(sample, self.refusal, self.preset.refuse_when)
        else:
            original, target = labelled_responses(sample, require_labels=False)[0][0][1], None
        ids = tokenize(self.tokenizer, format_detox_prompt(question, original, self.template, strip), sample.id,
                       "rejected", self.max_length)
        return {"id": sample.id, "input_ids": ids, "original": original, "target": target}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pad_batch([i["input_ids"] for i in items], self.tokenizer.pad_token_id, "left")
        batch["ids"] = [i["id"] for i in items]
        batch["originals"] = [i["original"] for i in items]
        batch["targets"] = [i["target"] for i in items]
        return batch
