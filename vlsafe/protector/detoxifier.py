"""`Detoxifier`: batched greedy rewrites of harmful answers, with the exact training prompt."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from vlsafe.data.text_encoders import DEFAULT_MAX_LENGTH, DETOX_TEMPLATE, REFUSAL, format_detox_prompt, pad_batch


class Detoxifier:
    """Rewrite (question, harmful answer) into a harmless answer.

    The prompt is `format_detox_prompt(question, answer, template)` — the same function the training
    encoder uses. A prompt longer than `max_length` tokens gets the fixed `refusal` instead of a rewrite
    and is counted in `self.too_long`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, template: str = DETOX_TEMPLATE,
                 refusal: str = REFUSAL, max_length: int = DEFAULT_MAX_LENGTH, max_new_tokens: int = 128,
                 batch_size: int = 8):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.template, self.refusal, self.max_length = template, refusal, max_length
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.too_long = 0

    @classmethod
    def from_module(cls, module: Any, **kwargs: Any) -> "Detoxifier":
        """Wrap a (trained) `DetoxifierModule`, sharing its weights and using its template."""
        for name in ("template", "refusal", "max_length", "max_new_tokens"):
            kwargs.setdefault(name, getattr(module, name))
        return cls(module.model, module.tokenizer, **kwargs)

    @classmethod
    def load(cls, path: str | Path, torch_dtype: str | None = None, device: str | None = None,
             **kwargs: Any) -> "Detoxifier":
        """From a vlsafe training checkpoint (`.ckpt`) or a standalone merged model folder (then pass the
        `template` it was trained with if it is not vlsafe's default)."""
        from vlsafe.protector.loading import load_hf_folder, load_text_module

        if Path(path).is_file():
            from vlsafe.methods.detoxifier import DetoxifierModule

            detoxifier = cls.from_module(load_text_module(path, DetoxifierModule), **kwargs)
        else:
            detoxifier = cls(*load_hf_folder(path, "causal_lm", torch_dtype), **kwargs)
        if device:
            detoxifier.model.to(device)
        return detoxifier

    @torch.no_grad()
    def rewrite(self, questions: Sequence[str], answers: Sequence[str]) -> list[str]:
        from vlsafe.methods.detoxifier import greedy_generate

        if len(questions) != len(answers):
            raise ValueError(f"got {len(questions)} questions but {len(answers)} answers")
        prompts = [self.tokenizer(format_detox_prompt(q, a, self.template))["input_ids"]
                   for q, a in zip(questions, answers)]
        out = [self.refusal] * len(prompts)
        usable = [i for i, p in enumerate(prompts) if len(p) <= self.max_length]
        self.too_long += len(prompts) - len(usable)
        usable.sort(key=lambda i: len(prompts[i]))
        for start in range(0, len(usable), self.batch_size):
            chunk = usable[start:start + self.batch_size]
            batch = pad_batch([list(prompts[i]) for i in chunk], self.tokenizer.pad_token_id, "left")
            texts = greedy_generate(self.model, self.tokenizer, batch["input_ids"], batch["attention_mask"],
                                    self.max_new_tokens)
            for i, text in zip(chunk, texts):
                out[i] = text if text.strip() else self.refusal  # an empty rewrite is no answer at all
        return out
