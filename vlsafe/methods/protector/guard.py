"""Guarded generation (MLLM-Protector): the VLM answers, the harm detector scores, harmful answers are fixed.

For each batch: the VLM generates greedily → the detector gives P(safe) for every (question, answer)
(batched) → answers with P(safe) < `threshold` are rewritten by the detoxifier (batched), or replaced by
the fixed refusal when no detoxifier is configured. Answers at or above the threshold pass unchanged.

As released (llava/eval/robustness_eval.py:102-140): greedy decoding, up to 1024 new tokens, threshold 0.5, the
refusal "Sorry, but I can't help you with your request."; shorter answers are an explicit `max_new_tokens`
(a short cap hides harmful continuations from the detector and from any judge). What the detector and the
detoxifier read is their preset's business (`HarmDetector`/`Detoxifier`, vlsafe.methods.protector.presets).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

from vlsafe.data.encoding.encoders import PromptEncoder, split_reference
from vlsafe.data.schema import Sample
from vlsafe.methods.protector.detector import HarmDetector
from vlsafe.methods.protector.detoxifier import Detoxifier
from vlsafe.methods.protector.encoders import REFUSAL, sample_question

#: the released evaluation's answer length: `model.generate(..., max_new_tokens=1024)` (robustness_eval.py:110)
RELEASED_VLM_MAX_NEW_TOKENS = 1024


@dataclass
class GuardedAnswer:
    """One guarded answer: `text` is what the user sees, `text_original` what the VLM said."""

    id: str
    question: str
    text: str
    text_original: str
    score: float          # P(safe) of the original answer
    flagged: bool         # score < threshold
    action: str           # "pass" | "rewrite" | "refuse"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class GuardedGenerator:
    """VLM → detector → (detoxifier | fixed refusal). `vlm`/`processor` are the vlsafe core and its processor."""

    def __init__(self, vlm: Any, processor: Any, detector: HarmDetector, detoxifier: Detoxifier | None = None,
                 threshold: float = 0.5, refusal: str = REFUSAL, max_new_tokens: int = RELEASED_VLM_MAX_NEW_TOKENS,
                 batch_size: int = 16):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.vlm, self.processor = vlm, processor
        self.detector, self.detoxifier = detector, detoxifier
        self.threshold, self.refusal = threshold, refusal
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    @classmethod
    def from_module(cls, module: Any, detector: HarmDetector, **kwargs: Any) -> "GuardedGenerator":
        """From any vlsafe VLM method module (SFTModule, PreferenceModule, ...)."""
        return cls(module.vlm_core(), module.processor_for_eval(), detector, **kwargs)

    @torch.no_grad()
    def generate(self, samples: Sequence[Sample]) -> list[str]:
        """Unguarded greedy answers of the VLM (prompt = the sample up to its last user turn)."""
        encoder = PromptEncoder(self.processor)
        device = next(self.vlm.parameters()).device
        batch = encoder.collate([encoder.encode(s) for s in samples])
        was_training = self.vlm.training
        self.vlm.eval()
        try:
            new_tokens = self.vlm.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                           batch["pixel_values"].to(device), max_new_tokens=self.max_new_tokens,
                                           do_sample=False, pad_token_id=self.processor.pad_token_id,
                                           eos_token_id=self.processor.tokenizer.eos_token_id)
        finally:
            self.vlm.train(was_training)
        return [self.processor.decode(row).strip() for row in new_tokens]

    def guard(self, questions: Sequence[str], answers: Sequence[str], ids: Sequence[str] | None = None
              ) -> list[GuardedAnswer]:
        """Score and fix given answers (no VLM involved): the guard alone, e.g. for another model's outputs."""
        ids = list(ids) if ids is not None else [str(i) for i in range(len(questions))]
        scores = self.detector.p_safe(questions, answers)
        flagged = [i for i, s in enumerate(scores) if s < self.threshold]
        final = list(answers)
        if flagged:
            if self.detoxifier is not None:
                rewrites = self.detoxifier.rewrite([questions[i] for i in flagged], [answers[i] for i in flagged])
            else:
                rewrites = [self.refusal] * len(flagged)
            for i, text in zip(flagged, rewrites):
                final[i] = text
        action = "rewrite" if self.detoxifier is not None else "refuse"
        return [GuardedAnswer(id=ids[i], question=questions[i], text=final[i], text_original=answers[i],
                              score=scores[i], flagged=scores[i] < self.threshold,
                              action=action if scores[i] < self.threshold else "pass")
                for i in range(len(questions))]

    def run_batches(self, samples: Iterable[Sample]) -> Iterator[list[GuardedAnswer]]:
        """Guarded answers, one list per batch of `batch_size` samples (for progress bars and streaming)."""
        batch: list[Sample] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._run(batch)
                batch = []
        if batch:
            yield self._run(batch)

    def run(self, samples: Iterable[Sample]) -> list[GuardedAnswer]:
        return [answer for batch in self.run_batches(samples) for answer in batch]

    def _run(self, samples: list[Sample]) -> list[GuardedAnswer]:
        prompts = []
        for sample in samples:
            messages, _ = split_reference(sample)  # a trailing reference answer is not part of the prompt
            prompts.append(Sample(id=sample.id, messages=messages, images=sample.images, meta=sample.meta))
        answers = self.generate(prompts)
        return self.guard([sample_question(s) for s in prompts], answers, [s.id for s in samples])
