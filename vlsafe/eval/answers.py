"""Closed-set answer accuracy: rank candidate answers by likelihood, and greedy exact match.

Likelihood ranking gives an accuracy whose chance level is known (1 / #candidates), so "before
training" and "after training" numbers mean something even for a random model; exact match on greedy
generations checks that the model also *says* the answer.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F

from vlsafe.constants import IGNORE_INDEX
from vlsafe.core.vlm import VLM
from vlsafe.data.encoding.encoders import PromptEncoder, split_reference
from vlsafe.data.encoding.processor import VLMProcessor
from vlsafe.data.schema import Sample


def normalise_answer(text: str) -> str:
    """Lower-case, drop punctuation and surrounding space: "Red." == "red"."""
    return re.sub(r"[^\w\s]", "", text.lower()).strip()


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the labelled tokens per row (`labels` unshifted, as built)."""
    targets = labels[:, 1:]
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    mask = targets != IGNORE_INDEX
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


@dataclass
class AnswerReport:
    """Accuracy overall and per task, with the chance level of the candidate sets."""

    n: int = 0
    correct: int = 0
    exact: int = 0
    chance: float = 0.0
    generated: bool = True
    per_task: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)

    @property
    def exact_match(self) -> float:
        return self.exact / max(self.n, 1)

    def summary(self) -> str:
        tasks = ", ".join(f"{t} {c}/{n}" for t, (c, n) in sorted(self.per_task.items()))
        exact = f"greedy exact match {self.exact_match:.3f}; " if self.generated else ""
        return f"answer accuracy {self.accuracy:.3f} (chance {self.chance:.3f}, n={self.n}); {exact}by task: {tasks}"


@torch.no_grad()
def choose_answers(vlm: VLM, processor: VLMProcessor, samples: list[Sample]) -> list[int]:
    """Index of the most likely candidate (`meta["candidates"]`) for each sample; images encoded once."""
    device = next(vlm.parameters()).device
    choices = []
    for sample in samples:
        prompt, _ = split_reference(sample)
        candidates = sample.meta["candidates"]
        encoded = [processor.encode_conversation(prompt + [{"role": "assistant", "content": c}], sample.id)
                   for c in candidates]
        batch = processor.collate_text([e.input_ids for e in encoded], [e.labels for e in encoded], "right")
        batch = {k: v.to(device) for k, v in batch.items()}
        features = None
        if sample.images:
            pixels = processor.preprocess_images(sample.images, sample.id).to(device)
            features = vlm.encode_images(pixels).repeat(len(candidates), 1, 1)
        logits = vlm(batch["input_ids"], batch["attention_mask"], image_features=features).logits
        choices.append(int(sequence_logprobs(logits, batch["labels"]).argmax()))
    return choices


@torch.no_grad()
def greedy_answers(vlm: VLM, processor: VLMProcessor, samples: list[Sample], batch_size: int = 16,
                   max_new_tokens: int = 16) -> list[str]:
    device = next(vlm.parameters()).device
    encoder = PromptEncoder(processor)
    out: list[str] = []
    for start in range(0, len(samples), batch_size):
        batch = encoder.collate([encoder.encode(s) for s in samples[start:start + batch_size]])
        new_tokens = vlm.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                  batch["pixel_values"].to(device), max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=processor.pad_token_id, eos_token_id=processor.tokenizer.eos_token_id)
        out += [processor.decode(row) for row in new_tokens]
    return out


def evaluate_answers(vlm: VLM, processor: VLMProcessor, samples: Iterable[Sample], *, generate: bool = True,
                     batch_size: int = 16) -> AnswerReport:
    """Score samples that carry `meta["answer"]` and `meta["candidates"]`; others are ignored."""
    usable = [s for s in samples if s.meta.get("candidates") and s.meta.get("answer") in s.meta["candidates"]]
    report = AnswerReport(generated=generate)
    if not usable:
        return report
    was_training = vlm.training
    vlm.eval()
    try:
        choices = choose_answers(vlm, processor, usable)
        generated = greedy_answers(vlm, processor, usable, batch_size) if generate else [""] * len(usable)
    finally:
        vlm.train(was_training)
    for sample, choice, text in zip(usable, choices, generated):
        candidates = sample.meta["candidates"]
        hit = candidates[choice] == sample.meta["answer"]
        report.n += 1
        report.correct += hit
        report.exact += normalise_answer(text) == normalise_answer(sample.meta["answer"])
        report.chance += 1 / len(candidates)
        task = report.per_task[str(sample.meta.get("task", "all"))]
        task[0] += hit
        task[1] += 1
    report.chance /= report.n
    return report
