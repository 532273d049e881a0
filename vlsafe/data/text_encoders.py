"""Encoders for the text-only models of MLLM-Protector: the harm detector and the detoxifier.

Both follow `vlsafe.data.encoders`: `encode(sample)` runs in the dataloader workers, `collate(items)` pads.
The input formats live here, once, and the inference wrappers in `vlsafe.protector` import them, so the
text a model is trained on and the text it scores or rewrites at inference are built by the same function
(the released MLLM-Protector code trains and infers with different prompts twice; we do not).

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

from vlsafe.core.vlm import IGNORE_INDEX
from vlsafe.data.schema import IMAGE_PLACEHOLDER, Sample, SampleError

#: The one detector input format, used at training and inference.
DETECTOR_TEMPLATE = "Question: {question}\n\nAnswer: {answer}"
#: The one detoxifier prompt (with the question), used at training and inference; the target follows it.
DETOX_TEMPLATE = ("Rewrite the answer below so that it is harmless. Keep what is safe, remove anything that could "
                  "cause harm.\nQuestion: {question}\nOriginal answer: {answer}\nHarmless answer:\n")
#: What the guard answers when a response is judged harmful and no detoxifier is configured, and the
#: detoxifier's training target when both responses of a pair are unsafe.
REFUSAL = "Sorry, but I can't help you with your request."
DEFAULT_MAX_LENGTH = 512


def format_detector_input(question: str, answer: str) -> str:
    return DETECTOR_TEMPLATE.format(question=question.strip(), answer=answer.strip())


def format_detox_prompt(question: str, answer: str, template: str = DETOX_TEMPLATE) -> str:
    return template.format(question=question.strip(), answer=answer.strip())


def sample_question(sample: Sample) -> str:
    """The question a response answers: the last user turn, `<image>` placeholders removed."""
    users = [m["content"] for m in sample.messages if m["role"] == "user"]
    if not users:
        raise SampleError(sample.id, "messages", "has no user turn to take the question from")
    question = users[-1].replace(IMAGE_PLACEHOLDER, "").strip()
    if not question:
        raise SampleError(sample.id, "messages", "the last user turn is empty once <image> is removed")
    return question


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
            if text is None or not text.strip():
                raise SampleError(sample.id, name, "is missing; a response pair needs chosen and rejected")
            out.append((name, text, _label(sample, f"{name}_safe", require_labels)))
        return out, True
    if sample.messages[-1]["role"] != "assistant" or not sample.messages[-1]["content"].strip():
        raise SampleError(sample.id, "messages", "needs a final assistant response (or chosen/rejected) to score")
    return [("messages[-1]", sample.messages[-1]["content"], _label(sample, "safe", require_labels))], False


def tokenize(tokenizer, text: str, sample_id: str, field_name: str, max_length: int | None,
             add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; longer than `max_length` is a `SampleError` (counted skip with on_error=skip)."""
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    if max_length is not None and len(ids) > max_length:
        raise SampleError(sample_id, field_name, f"is {len(ids)} tokens long with its question, over the "
                                                 f"max_length of {max_length}")
    return list(ids)


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
    `SampleError` — never silently truncated in training.
    """

    def __init__(self, tokenizer, max_length: int = DEFAULT_MAX_LENGTH, category_key: str = "category",
                 require_labels: bool = True):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.category_key, self.require_labels = category_key, require_labels

    def encode(self, sample: Sample) -> dict[str, Any]:
        question = sample_question(sample)
        responses, is_pair = labelled_responses(sample, self.require_labels)
        rows = [tokenize(self.tokenizer, format_detector_input(question, text), sample.id, name, self.max_length)
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
def detox_pair(sample: Sample, refusal: str = REFUSAL) -> tuple[str, str]:
    """(original, target) for detoxifier training from a labelled pair.

    original = the less safe response (`rejected`); target = the safer response (`chosen`), or the fixed
    refusal when the safer one is unsafe too (`labels.chosen_safe == 0`).
    """
    responses, is_pair = labelled_responses(sample, require_labels=True)
    if not is_pair:
        raise SampleError(sample.id, "chosen", "is missing; detoxifier training needs (safer, less safe) pairs")
    (_, chosen, chosen_safe), (_, rejected, _) = responses
    return rejected, (chosen if chosen_safe >= 0.5 else refusal)


class DetoxifierEncoder:
    """Detoxifier SFT: `prompt(question, original) + target + EOS`; loss on the target and EOS only."""

    def __init__(self, tokenizer, template: str = DETOX_TEMPLATE, refusal: str = REFUSAL,
                 max_length: int = DEFAULT_MAX_LENGTH):
        if tokenizer.eos_token_id is None:
            raise ValueError("the detoxifier's tokenizer needs an eos token (the target ends with it)")
        self.tokenizer, self.template, self.refusal, self.max_length = tokenizer, template, refusal, max_length

    def encode(self, sample: Sample) -> dict[str, Any]:
        question = sample_question(sample)
        original, target = detox_pair(sample, self.refusal)
        prompt = tokenize(self.tokenizer, format_detox_prompt(question, original, self.template), sample.id,
                          "rejected", None)
        answer = tokenize(self.tokenizer, target, sample.id, "chosen", None, add_special_tokens=False)
        answer.append(self.tokenizer.eos_token_id)
        if len(prompt) + len(answer) > self.max_length:
            raise SampleError(sample.id, "chosen", f"prompt + target are {len(prompt) + len(answer)} tokens, over "
                                                   f"the max_length of {self.max_length}")
        return {"id": sample.id, "input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer,
                "target": target}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pad_batch([i["input_ids"] for i in items], self.tokenizer.pad_token_id, "right")
        batch["labels"] = pad([i["labels"] for i in items], IGNORE_INDEX, "right")
        batch["ids"] = [i["id"] for i in items]
        batch["targets"] = [i["target"] for i in items]
        return batch


class DetoxPromptEncoder:
    """Detoxifier generation prompts (left-padded): the same prompt as training, without the target."""

    def __init__(self, tokenizer, template: str = DETOX_TEMPLATE, refusal: str = REFUSAL,
                 max_length: int = DEFAULT_MAX_LENGTH):
        self.tokenizer, self.template, self.refusal, self.max_length = tokenizer, template, refusal, max_length

    def encode(self, sample: Sample) -> dict[str, Any]:
        question = sample_question(sample)
        if sample.chosen is not None or sample.rejected is not None:
            original, target = detox_pair(sample, self.refusal)
        else:
            original, target = labelled_responses(sample, require_labels=False)[0][0][1], None
        ids = tokenize(self.tokenizer, format_detox_prompt(question, original, self.template), sample.id,
                       "rejected", self.max_length)
        return {"id": sample.id, "input_ids": ids, "original": original, "target": target}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pad_batch([i["input_ids"] for i in items], self.tokenizer.pad_token_id, "left")
        batch["ids"] = [i["id"] for i in items]
        batch["originals"] = [i["original"] for i in items]
        batch["targets"] = [i["target"] for i in items]
        return batch
