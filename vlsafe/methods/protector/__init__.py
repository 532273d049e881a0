"""MLLM-Protector for vlsafe: a harm detector and a detoxifier that guard any VLM's answers at inference.

- `HarmDetector.p_safe(questions, answers)`: P(safe) per answer (label semantics 1 = safe everywhere);
- `Detoxifier.rewrite(questions, answers)`: harmless rewrites;
- `GuardedGenerator`: VLM → detector → detoxifier (or the fixed refusal `REFUSAL`).

What the detector and the detoxifier read is set by a preset (`vlsafe.methods.protector.presets`): `released`
reproduces the released code's inputs byte for byte, `vlsafe` uses one format for training and inference.

Training lives in `vlsafe.methods.protector.detector_module.HarmDetectorModule` and
`vlsafe.methods.protector.detoxifier_module.DetoxifierModule` (over `text_module.TextLMModule`); input formats in
`vlsafe.methods.protector.encoders`; the guard's rates in `metrics`. Elsewhere by layer: the `vlsafe guard` command
(`vlsafe.tools.guard`), the guarded eval suite (`vlsafe.eval.suites.guarded`), the PKU-SafeRLHF and MM-SafetyBench
converters (`vlsafe.data.sources`), the synthetic harm world (`vlsafe.data.synthetic.text`).
"""
from __future__ import annotations

from vlsafe.methods.protector.detector import HarmDetector
from vlsafe.methods.protector.detoxifier import Detoxifier
from vlsafe.methods.protector.encoders import DETECTOR_TEMPLATE, DETOX_TEMPLATE, REFUSAL
from vlsafe.methods.protector.guard import GuardedAnswer, GuardedGenerator
from vlsafe.methods.protector.presets import (
           PRESETS,
           RELEASED,
           VLSAFE,
           ProtectorPreset,
           get_preset,
)

__all__ = ["HarmDetector", "Detoxifier", "GuardedGenerator", "GuardedAnswer", "REFUSAL", "DETECTOR_TEMPLATE",
           "DETOX_TEMPLATE", "PRESETS", "RELEASED", "VLSAFE", "ProtectorPreset", "get_preset"]
