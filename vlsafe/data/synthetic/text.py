"""Synthetic text data for MLLM-Protector demos: single labelled (question, answer) responses.

The world's `harm_text` kind gives PKU-SafeRLHF-shaped *pairs*, where every unsafe answer is a "Sure! ..."
compliance. A VLM trained on the shapes world answers a harmful request differently — with a colour, a
count or a caption — and by the world's ground truth **any non-refusal to a harmful request is a harmful
answer**. `harm_qa_samples` writes harmful_vs_unharmful-style single responses that state that rule:

- a harmful request (the `safety` kind's `safe_unsafes` instructions, text only) answered with the refusal
  -> safe (1), or with an ordinary world answer (a word or a caption of a random scene) -> unsafe (0);
- a benign question (the `safety` kind's `safe_safes`) answered with its correct answer -> safe (1), or
  with the refusal -> safe (1) (over-refusal is unhelpful, not harmful).

The `unsafes` subset (a hazard sign in the image) is left out: its harm is in the image, which a text
detector cannot see. Samples are `Sample(messages=[user q, assistant a], labels={"safe": 0|1})`.
`ProtectorWorld` writes these next to `harm_text` pairs, so a recipe can train on both.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Iterator

from vlsafe.constants import IMAGE_PLACEHOLDER
from vlsafe.data.datamodule import ShardDataModule, Source
from vlsafe.data.schema import OnError, Sample
from vlsafe.data.shards import INDEX_NAME, write_shards
from vlsafe.data.synthetic.world import (
    REQUEST_REFUSAL,
    WORLD_VERSION,
    WorldConfig,
    generate,
)

_STAMP = "world.json"


def _text_only(content: str) -> str:
    return content.replace(IMAGE_PLACEHOLDER, "").strip()


def harm_qa_samples(n: int, seed: int = 0, split: str = "train", refusal_rate: float = 0.5) -> Iterator[Sample]:
    """`n` single labelled responses (label 1 = safe), deterministic in (seed, split)."""
    rng = random.Random(f"harm-qa-{seed}-{split}")
    questions = generate(4 * n + 64, seed=seed, kinds=["safety"], split=f"{split}-harmqa")
    answers = (s.meta["answer"] for s in generate(4 * n + 64, seed=seed, kinds=["qa", "caption"],
                                                  split=f"{split}-harmqa-answers"))
    made = 0
    for sample in questions:
        if made == n:
            return
        subset = sample.meta["subset"]
        if subset == "unsafes":
            continue
        question = _text_only(sample.messages[0]["content"])
        refuse = rng.random() < refusal_rate
        if subset == "safe_unsafes":
            answer, safe = (REQUEST_REFUSAL, 1.0) if refuse else (next(answers), 0.0)
        else:
            answer = REQUEST_REFUSAL if rng.random() < 0.2 else sample.meta["answer"]
            safe = 1.0
        yield Sample(id=f"harmqa-{split}-{seed}-{made:07d}", messages=[
            {"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            labels={"safe": safe}, meta={"source": "synthetic-harmqa", "subset": subset, "split": split,
                                         "category": sample.meta.get("category", "none")})
        made += 1


class ProtectorWorld(ShardDataModule):
    """Shards for the demo harm detector / detoxifier: `harm_text` pairs and (optionally) `harm_qa` singles.

    Writes `root/{split}/pairs` (`harm_text_samples` per split) and `root/{split}/singles`
    (`harm_qa_samples`), once; each non-empty part becomes one source of that split.
    """

    def __init__(self, root: str = ".cache/vlsafe/protector", harm_text_samples: int = 2000,
                 harm_qa_samples: int = 0, val_fraction: float = 0.1, world_seed: int = 0, batch_size: int = 16,
                 eval_batch_size: int | None = None, num_workers: int = 1, shuffle_buffer: int = 1000,
                 seed: int = 0, on_error: OnError = "raise"):
        self.root = Path(root)
        self.counts = {"pairs": harm_text_samples, "singles": harm_qa_samples}
        self.val_fraction, self.world_seed = val_fraction, world_seed
        sizes = {"train": 1.0, "val": val_fraction}
        self.sizes = {split: {part: int(round(n * f)) for part, n in self.counts.items()} for split, f in sizes.items()}
        sources = {split: [Source(str(self.root / split / part)) for part, n in parts.items() if n > 0] or None
                   for split, parts in self.sizes.items()}
        super().__init__(train=sources["train"], val=sources["val"], test=sources["val"], predict=sources["val"],
                         batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         shuffle_buffer=shuffle_buffer, seed=seed, on_error=on_error)

    def prepare_data(self) -> None:
        for split, parts in self.sizes.items():
            for part, n in parts.items():
                if n <= 0:
                    continue
                out = self.root / split / part
                stamp = {"n": n, "seed": self.world_seed, "part": part, "world_version": WORLD_VERSION}
                if (out / INDEX_NAME).exists() and (out / _STAMP).exists() and \
                        json.loads((out / _STAMP).read_text()) == stamp:
                    continue
                if out.exists():
                    shutil.rmtree(out)
                if part == "pairs":
                    samples = generate(n, seed=self.world_seed, kinds=["harm_text"], cfg=WorldConfig(), split=split)
                else:
                    samples = harm_qa_samples(n, seed=self.world_seed, split=split)
                write_shards(samples, out, max_samples=1000)
                (out / _STAMP).write_text(json.dumps(stamp))
