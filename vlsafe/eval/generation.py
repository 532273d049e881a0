"""Batched, resumable greedy generation over `Sample` prompts, with a progress bar.

Answers are appended to a JSON Lines cache after every batch. The first line records the settings
(template, token budget, model identity); the other lines are `{"id", "prompt", "answer"}`, where
`prompt` is a hash of the sample's messages and images, so an answer is reused only for the prompt it
was generated for. A killed run therefore continues where it stopped, a finished one costs nothing to
re-run, and a cache written with other settings is refused instead of silently mixed in.

(`vlsafe.methods.preference.blind.run_chunked` resumes shard-to-shard tools; evaluation needs a per-answer cache
keyed by sample id, which is what this module keeps.)
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from vlsafe.data.encoding.encoders import PromptEncoder
from vlsafe.data.encoding.templates import get_template
from vlsafe.data.images import encoded_image
from vlsafe.data.schema import Sample, SampleError
from vlsafe.eval.image_preprocess import check_image_preprocess, processor_for

log = logging.getLogger(__name__)

CACHE_FORMAT = "vlsafe-answers/1"


#: decoding presets (`GenerationConfig.preset`): overrides handed to the model's `generate_batch`
PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {"do_sample": False, "num_beams": 1, "extra": {}},
    # LRV-Instruction's answer generation (utils/inference.py:420-427, the mPLUG-Owl "V2" model): sampling
    # with top-k 3, top-p 0.9, temperature 1, no repeated 2-grams (length_penalty 1.0 is the default)
    "lrv": {"do_sample": True, "top_k": 3, "top_p": 0.9, "temperature": 1.0, "num_beams": 1,
            "extra": {"no_repeat_ngram_size": 2}},
}


@dataclass
class GenerationConfig:
    """Decoding settings of an evaluation: greedy unless a suite names a sampling `preset`.

    `template` overrides the model's chat template (VLGuard evaluates with `llava_v1`);
    `min_new_tokens` is VLGuard's `min_new_tokens=1`; `image_preprocess` is `pad`, `crop` or `resize`
    (`vlsafe.eval.image_preprocess`); `seed` makes a sampling preset repeatable (the generator is re-seeded
    with `seed + index of the batch's first prompt` before each batch). `max_length` is the longest prompt
    (image tokens included) the evaluation accepts; None keeps the model's training limit, which may be
    shorter than what a benchmark's released script allows (MMSafe-PO trains at 768, infers at 2048).
    """

    max_new_tokens: int = 256
    min_new_tokens: int | None = None
    template: str | None = None
    image_preprocess: str = "pad"
    preset: str = "greedy"
    seed: int = 0
    max_length: int | None = None

    def __post_init__(self) -> None:

        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if self.preset not in PRESETS:
            raise ValueError(f"generation preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        check_image_preprocess(self.image_preprocess, "generation")
        if self.template is not None:

            get_template(self.template)  # unknown names fail before any work


@dataclass
class GenerationResult:
    """Answers aligned with the input samples (None for a skipped sample) and what it cost."""

    answers: list[str | None]
    generated: int = 0  # answers produced by this call
    cached: int = 0  # answers read back from the cache
    skipped: list[dict[str, str]] = field(default_factory=list)


def prompt_fingerprint(sample: Sample) -> str:
    """Hash of what the model sees: messages and image bytes (or paths, for images not yet read)."""
    digest = hashlib.sha256(json.dumps(sample.messages, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    for image in sample.images:
        digest.update(b"\0image\0")
        digest.update(image if isinstance(image, bytes) else str(image).encode("utf-8"))
    return digest.hexdigest()[:20]


class AnswerCache:
    """The JSON Lines answer cache of one suite (see the module docstring)."""

    def __init__(self, path: str | Path, settings: dict[str, Any]):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))
        self.answers: dict[tuple[str, str], str] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            raise ValueError(f"{self.path}: not an answer cache (bad first line); delete it to start over") from None
        if header.get("format") != CACHE_FORMAT:
            raise ValueError(f"{self.path}: not a vlsafe answer cache (format {header.get('format')!r})")
        if header.get("settings") != self.settings:
            old = header.get("settings") or {}
            changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
            raise ValueError(f"{self.path} holds answers generated with different settings ({', '.join(changed)}); "
                             f"use another output folder or delete the file to regenerate (tools/evaluate.py --fresh)")
        broken = 0
        for number, line in enumerate(lines[1:], 2):
            try:
                row = json.loads(line)
                self.answers[(row["id"], row["prompt"])] = row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                broken += 1  # a line cut short by a killed run: regenerated
                log.warning("%s:%d: unreadable cache line ignored", self.path, number)
        if broken:
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as stream:
            stream.write(json.dumps({"format": CACHE_FORMAT, "settings": self.settings}) + "\n")
            for (sample_id, prompt), answer in self.answers.items():
                stream.write(json.dumps({"id": sample_id, "prompt": prompt, "answer": answer}, ensure_ascii=False)
                             + "\n")
        os.replace(tmp, self.path)

    def get(self, sample_id: str, prompt: str) -> str | None:
        return self.answers.get((sample_id, prompt))

    def add(self, rows: list[tuple[str, str, str]]) -> None:
        """Append `(id, prompt, answer)` rows and flush, so a kill loses at most the batch in flight."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"format": CACHE_FORMAT, "settings": self.settings}) + "\n",
                                 encoding="utf-8")
        with self.path.open("a", encoding="utf-8") as stream:
            for sample_id, prompt, answer in rows:
                self.answers[(sample_id, prompt)] = answer
                stream.write(json.dumps({"id": sample_id, "prompt": prompt, "answer": answer}, ensure_ascii=False)
                             + "\n")
            stream.flush()


def _with_image_bytes(sample: Sample) -> Sample:
    """Images given as paths (converter output) are read and checked here, one batch at a time."""
    if all(isinstance(image, bytes) for image in sample.images):
        return sample

    images = [encoded_image(image, sample.id, f"images[{i}]")[0] for i, image in enumerate(sample.images)]
    return Sample(id=sample.id, messages=sample.messages, images=images, meta=sample.meta)


def _processor_with_template(processor, template: str | None, max_length: int | None = None):
    """A copy of the model's processor with the evaluation's template and prompt limit (the model's own is
    left untouched)."""
    if template is None and max_length is None:
        return processor

    processor = copy.copy(processor)
    if template is not None:
        processor.template = get_template(template)
    if max_length is not None:
        processor.max_length = max_length
    return processor


def generate_answers(model, samples: Sequence[Sample], config: GenerationConfig | None = None, *,
                     cache_path: str | Path | None = None, model_id: Any = None, batch_size: int = 8,
                     progress: bool = True, on_error: str = "raise", desc: str = "generating") -> GenerationResult:
    """Greedy answers of `model` (a vlsafe `VLMModule`, or anything with `processor`, `device` and
    `generate_batch`) to each sample's prompt (its messages up to the last user turn).

    With `cache_path`, answers already in the cache are reused and new ones appended batch by batch;
    `model_id` (e.g. `checkpoint.file_identity(path)`) is part of the cache settings. The model is
    touched only when something is left to generate. `on_error="skip"` records unusable samples
    (`{id, field, error}`) and gives them `None`; `"raise"` stops at the first one.
    """
    from tqdm.auto import tqdm


    config = config or GenerationConfig()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"sample ids must be unique for answer caching; {duplicate!r} appears more than once")
    cache = AnswerCache(cache_path, {**asdict(config), "model": model_id}) if cache_path else None
    fingerprints = [prompt_fingerprint(s) for s in samples]
    result = GenerationResult(answers=[None] * len(samples))
    pending = []
    for i, (sample, fingerprint) in enumerate(zip(samples, fingerprints)):
        answer = cache.get(sample.id, fingerprint) if cache else None
        if answer is None:
            pending.append(i)
        else:
            result.answers[i] = answer
            result.cached += 1
    if not pending:
        return result


    encoder = PromptEncoder(processor_for(_processor_with_template(model.processor, config.template,
                                                                   config.max_length),
                                          config.image_preprocess))
    overrides: dict[str, Any] = {"max_new_tokens": config.max_new_tokens,
                                 **copy.deepcopy(PRESETS[config.preset])}
    if config.min_new_tokens is not None:
        overrides["min_new_tokens"] = config.min_new_tokens
    bar = tqdm(total=len(samples), initial=result.cached, desc=desc, unit="answer", disable=not progress)
    try:
        for start in range(0, len(pending), batch_size):
            rows, items = [], []
            for i in pending[start:start + batch_size]:
                try:
                    items.append(encoder.encode(_with_image_bytes(samples[i])))
                    rows.append(i)
                except SampleError as err:
                    if on_error == "raise":
                        raise
                    result.skipped.append({"id": err.sample_id, "field": err.field_name, "error": err.problem})
                    bar.update(1)
            if not items:
                continue
            batch = encoder.collate(items)
            if overrides["do_sample"]:
                torch.manual_seed(config.seed + rows[0])
            device = model.device
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            answers = model.generate_batch(batch, **overrides)
            for i, answer in zip(rows, answers):
                result.answers[i] = answer
            result.generated += len(rows)
            if cache:
                cache.add([(samples[i].id, fingerprints[i], answers[k]) for k, i in enumerate(rows)])
            bar.update(len(rows))
    finally:
        bar.close()
    if result.skipped:
        log.warning("%s: skipped %d unusable sample(s), e.g. %s", desc, len(result.skipped), result.skipped[0])
    return result
