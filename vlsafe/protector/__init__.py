"""MLLM-Protector for vlsafe: a harm detector and a detoxifier that guard any VLM's answers at inference.

- `HarmDetector.p_safe(questions, answers)`: P(safe) per answer (label semantics 1 = safe everywhere);
- `Detoxifier.rewrite(questions, answers)`: harmless rewrites;
- `GuardedGenerator`: VLM → detector → detoxifier (or the fixed refusal `REFUSAL`).

What the detector and the detoxifier read is set by a preset (`vlsafe.data.protector_presets`): `released`
reproduces the released code's inputs byte for byte, `vlsafe` uses one format for training and inference.

Training lives in `vlsafe.methods.harm_detector.HarmDetectorModule` and
`vlsafe.methods.detoxifier.DetoxifierModule`; input formats in `vlsafe.data.text_encoders`.
"""
from __future__ import annotations

from vlsafe.data.protector_presets import PRESETS, RELEASED, VLSAFE, ProtectorPreset, get_preset
from vlsafe.data.text_encoders import DETECTOR_TEMPLATE, DETOX_TEMPLATE, REFUSAL
from vlsafe.protector.detector import HarmDetector
from vlsafe.protector.detoxifier import Detoxifier
from vlsafe.protector.guard import GuardedAnswer, GuardedGenerator

__all__ = ["HarmDetector", "Detoxifier", "GuardedGenerator", "GuardedAnswer", "REFUSAL", "DETECTOR_TEMPLATE",
           "DETOX_TEMPLATE", "PRESETS", "RELEASED", "VLSAFE", "ProtectorPreset", "get_preset"]
