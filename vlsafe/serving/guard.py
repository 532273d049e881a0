"""The MLLM-Protector guard in front of every answer the server returns.

`AnswerGuard.check` is `GuardedGenerator.guard` (vlsafe.methods.protector.guard), the same code `tools/guard.py`
runs in batch: P(safe) of each (question, answer) from the harm detector, batched; answers below the threshold
rewritten by the detoxifier, or replaced by the fixed refusal when there is none. It runs on the model thread,
once per batch.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlsafe.methods.protector import (
    REFUSAL,
    Detoxifier,
    GuardedAnswer,
    GuardedGenerator,
    HarmDetector,
)
from vlsafe.serving.backends import model_executor


class AnswerGuard:
    """Harm detector + (detoxifier | fixed refusal) over a batch of answers."""

    def __init__(self, detector: HarmDetector, detoxifier: Detoxifier | None = None, threshold: float = 0.5,
                 refusal: str = REFUSAL):
        self.guard = GuardedGenerator(None, None, detector, detoxifier, threshold=threshold, refusal=refusal)
        self.threshold = threshold

    @classmethod
    def load(cls, detector: str | Path, detoxifier: str | Path | None = None, threshold: float = 0.5,
             preset: str | None = None, device: str = "cpu", batch_size: int = 16, **detox_lengths: Any
             ) -> AnswerGuard:
        """From vlsafe checkpoints or merged folders, with `tools/guard.py`'s loading rules (each model's own
        preset, `released` for folders that record none)."""
        harm = HarmDetector.load(detector, device=device, batch_size=batch_size, threshold=threshold, preset=preset,
                                 fallback_preset="released")
        detox = (Detoxifier.load(detoxifier, device=device, preset=preset, fallback_preset="released", **detox_lengths)
                 if detoxifier else None)
        return cls(harm, detox, threshold)

    @property
    def mode(self) -> str:
        return "rewrite" if self.guard.detoxifier is not None else "refuse"

    async def check(self, questions: Sequence[str], answers: Sequence[str]) -> list[GuardedAnswer]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(model_executor(), self.guard.guard, list(questions), list(answers))


def verdict(answer: GuardedAnswer, threshold: float) -> dict[str, Any]:
    """The `guard` field of a response choice."""
    return {"flagged": answer.flagged, "score": answer.score, "rewritten": answer.action != "pass",
            "action": answer.action, "threshold": threshold}
