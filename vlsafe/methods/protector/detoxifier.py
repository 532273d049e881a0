"""`Detoxifier`: batched rewrites of harmful answers, prompted as the preset says.

`released` (vlsafe.methods.protector.presets) reproduces the released evaluation (robustness_eval.py:132-138): the
prompt without the question, `generate(max_length=1024)` with the model's own generation_config, the rewrite kept
as decoded. `vlsafe` prompts with the question, exactly as in training, decodes greedily and strips the rewrite.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from vlsafe.data.schema import is_blank
from vlsafe.methods.protector.detoxifier_module import (
    DetoxifierModule,
    generate_rewrites,
    rewrite_budgets,
)
from vlsafe.methods.protector.encoders import (
    DEFAULT_MAX_LENGTH,
    format_detox_prompt,
    pad_batch,
    plain_text_ids,
)
from vlsafe.methods.protector.loading import (
    load_hf_folder,
    load_text_module,
    recorded_settings,
)
from vlsafe.methods.protector.presets import REFUSAL, get_preset

_UNSET: Any = object()


class Detoxifier:
    """Rewrite (question, harmful answer) into a harmless answer.

    The prompt is `format_detox_prompt(question, answer, template)` — the function the training encoder uses;
    `template` defaults to the preset's inference prompt. Lengths default to the release: prompt + rewrite at
    most `max_total_tokens` (1024); `max_new_tokens` optionally caps the rewrite. A prompt that leaves no room
    (or, with `vlsafe`, is over `max_length` tokens, the training cap) gets the fixed `refusal` instead of a
    rewrite and is counted in `self.too_long`; with `vlsafe` an empty rewrite gets the refusal too.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, template: str | None = None,
                 refusal: str = REFUSAL, max_length: int | None = _UNSET, max_new_tokens: int | None = None,
                 batch_size: int = 8, preset: str = "vlsafe", max_total_tokens: int | None = 1024):
        self.preset = get_preset(preset)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.template = template if template is not None else self.preset.detox_inference_template
        if max_length is _UNSET:  # the release has no prompt cap besides max_total_tokens
            max_length = DEFAULT_MAX_LENGTH if self.preset.name == "vlsafe" else None
        self.refusal, self.max_length = refusal, max_length
        self.max_new_tokens, self.max_total_tokens, self.batch_size = max_new_tokens, max_total_tokens, batch_size
        self.too_long = 0

    @classmethod
    def from_module(cls, module: Any, **kwargs: Any) -> "Detoxifier":
        """Wrap a (trained) `DetoxifierModule`, sharing its weights; the preset and lengths default to the
        module's, the prompt to its inference prompt."""
        kwargs.setdefault("preset", module.preset)
        if kwargs["preset"] == module.preset:
            kwargs.setdefault("template", module.inference_template)
        if kwargs["preset"] == "vlsafe":
            kwargs.setdefault("max_length", module.max_length)
        for name in ("max_new_tokens", "max_total_tokens"):
            kwargs.setdefault(name, getattr(module, name))
        return cls(module.model, module.tokenizer, **kwargs)

    @classmethod
    def load(cls, path: str | Path, torch_dtype: str | None = None, device: str | None = None,
             preset: str | None = None, fallback_preset: str = "vlsafe", **kwargs: Any) -> "Detoxifier":
        """From a vlsafe training checkpoint (`.ckpt`; its preset unless `preset` is given) or a standalone
        merged model folder (the preset tools/merge_adapter.py recorded there, else `fallback_preset`; pass the
        `template` it was trained with if it is neither preset's)."""

        if Path(path).is_file():

            if preset is not None:
                kwargs["preset"] = preset
            detoxifier = cls.from_module(load_text_module(path, DetoxifierModule), **kwargs)
        else:
            recorded = recorded_settings(path)
            preset = preset or recorded.get("preset") or fallback_preset
            if recorded.get("template") and recorded.get("preset") == preset:
                kwargs.setdefault("template", recorded["template"])
            detoxifier = cls(*load_hf_folder(path, "causal_lm", torch_dtype), preset=preset, **kwargs)
        if device:
            detoxifier.model.to(device)
        return detoxifier

    def prompt_ids(self, question: str, answer: str) -> list[int]:
        """Token ids as training makes them (`plain_text_ids`): a `</s>` quoted in the answer stays text, so the
        model is not shown an end of sequence in the middle of its prompt."""
        return plain_text_ids(self.tokenizer, format_detox_prompt(question, answer, self.template, self.preset.strip))

    @torch.no_grad()
    def rewrite(self, questions: Sequence[str], answers: Sequence[str]) -> list[str]:

        if len(questions) != len(answers):
            raise ValueError(f"got {len(questions)} questions but {len(answers)} answers")
        prompts = [self.prompt_ids(q, a) for q, a in zip(questions, answers)]
        budgets = rewrite_budgets([len(p) for p in prompts], self.max_new_tokens, self.max_total_tokens)
        out = [self.refusal] * len(prompts)
        usable = [i for i, p in enumerate(prompts)
                  if budgets[i] > 0 and (self.max_length is None or len(p) <= self.max_length)]
        self.too_long += len(prompts) - len(usable)
        usable.sort(key=lambda i: len(prompts[i]))
        tidy = self.preset.tidy_rewrite
        for start in range(0, len(usable), self.batch_size):
            chunk = usable[start:start + self.batch_size]
            batch = pad_batch([prompts[i] for i in chunk], self.tokenizer.pad_token_id, "left")
            texts = generate_rewrites(self.model, self.tokenizer, batch["input_ids"], batch["attention_mask"],
                                      self.max_new_tokens, self.max_total_tokens, greedy=self.preset.detox_greedy,
                                      tidy=tidy)
            for i, text in zip(chunk, texts):
                out[i] = text if (not is_blank(text) or not tidy) else self.refusal  # vlsafe: empty is no answer
        return out
