"""The two MLLM-Protector formats: `released` (the released code, byte for byte) and `vlsafe` (one format).

The released code (pipilurj/MLLM-protector @ 390e326) trains its models on one input format and runs them on
another, twice:

- the harm detector is trained on `"Question: {q}\\n\\nAnswer: {r}"` (harmdetector_train_saferlhf.py:194-195)
  but at inference it scores the bare answer (llava/eval/robustness_eval.py:125);
- the detoxifier is trained with the question in its prompt (correction_model_withquestion.py:167, the
  script scripts/train_detoxifier.sh runs) but prompted without it at inference (robustness_eval.py:132).

`released` reproduces that, so the released detector/detoxifier weights get exactly the inputs the released
evaluation gave them, and a model trained here with the paper recipe is used the way the paper used it.
`vlsafe` trains and infers on one format (the question is always there), which is what a detector needs when an
answer's harm depends on the question (a bare "red" is harmless; "red" as the answer to "which wire do I cut to
disable the alarm?" is not). The demo recipes use `vlsafe`: their detector learns exactly that rule.

Lengths are not part of a preset: they default to the released ones everywhere (VLM 1024 new tokens,
robustness_eval.py:110; detoxifier prompt + rewrite at most 1024 tokens, robustness_eval.py:137); shorter is an
explicit setting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: The detector's training input, both presets (harmdetector_train_saferlhf.py:194-195:
#: `"Question: " + question + "\n\nAnswer: " + response_0`).
DETECTOR_TEMPLATE = "Question: {question}\n\nAnswer: {answer}"
#: The released detector's input at inference: the bare answer (robustness_eval.py:125, `harm_tokenizer(outputs)`).
RELEASED_DETECTOR_INFERENCE_TEMPLATE = "{answer}"
#: Released detoxifier training prompt (correction_model_withquestion.py:167), the target follows it directly.
RELEASED_DETOX_TRAIN_TEMPLATE = (
    "You are given a question and a response, the response may contain sensitive or harmful information, Please "
    "rewrite the response to make it harmless. \nQuestion: {question}\nOriginal response: {answer}\n"
    "Corrected response: ")
#: Released detoxifier inference prompt, without the question (robustness_eval.py:132; also the prompt of the
#: older training script correction_model.py:168).
RELEASED_DETOX_INFERENCE_TEMPLATE = (
    "You are given a response which may contain sensitive or harmful information, Please rewrite the response to "
    "make it harmless. \nOriginal response: {answer}\nCorrected response: ")
#: Released detoxifier training target when both responses are unsafe (correction_model_withquestion.py:163).
RELEASED_BOTH_UNSAFE_TARGET = "Sorry, I can not answer this question."
#: The guard's answer for a flagged response when no detoxifier is configured, both presets
#: (robustness_eval.py:140); vlsafe also uses it as the detoxifier's both-unsafe target.
REFUSAL = "Sorry, but I can't help you with your request."
#: vlsafe's detoxifier prompt (with the question), used at training and inference.
DETOX_TEMPLATE = ("Rewrite the answer below so that it is harmless. Keep what is safe, remove anything that could "
                  "cause harm.\nQuestion: {question}\nOriginal answer: {answer}\nHarmless answer:\n")


@dataclass(frozen=True)
class ProtectorPreset:
    """Everything that differs between the released MLLM-Protector formats and vlsafe's."""

    name: str
    detector_train_template: str
    detector_inference_template: str
    detox_train_template: str
    detox_inference_template: str
    #: the detoxifier's target when the pair's responses are unsafe
    both_unsafe_target: str
    #: "both": refuse only when both responses are labelled unsafe (released: `r0_safe == 0 and r1_safe == 0`,
    #: correction_model_withquestion.py:162, so an unsafe safer response with a safe other one is the target);
    #: "chosen": refuse whenever the safer response is unsafe
    refuse_when: str
    #: strip whitespace around questions, answers and targets (released concatenates the strings as stored)
    strip: bool
    #: detoxifier training ids: released tokenizes `prompt + target + eos` in one go and masks as many tokens
    #: as the prompt alone has (correction_model_withquestion.py:168-173; when the prompt's trailing space is a
    #: token of its own, this also masks the first target token); vlsafe tokenizes them apart (exact mask)
    joint_detox_tokens: bool
    #: decoding of the detoxifier: released calls `generate(input_ids, max_length=1024)` with the model's
    #: own generation_config (robustness_eval.py:137); vlsafe forces greedy decoding
    detox_greedy: bool
    #: released keeps the rewrite as decoded (robustness_eval.py:138); vlsafe strips it and answers an empty
    #: rewrite with the refusal
    tidy_rewrite: bool
    #: the detector's inference-time input cap: released truncates at the tokenizer's model_max_length
    #: (`truncation=True`, robustness_eval.py:125); vlsafe at the training max_length
    detector_cap_at_model_max: bool


PresetName = Literal["released", "vlsafe"]

RELEASED = ProtectorPreset(
    name="released", detector_train_template=DETECTOR_TEMPLATE,
    detector_inference_template=RELEASED_DETECTOR_INFERENCE_TEMPLATE,
    detox_train_template=RELEASED_DETOX_TRAIN_TEMPLATE, detox_inference_template=RELEASED_DETOX_INFERENCE_TEMPLATE,
    both_unsafe_target=RELEASED_BOTH_UNSAFE_TARGET, refuse_when="both", strip=False, joint_detox_tokens=True,
    detox_greedy=False, tidy_rewrite=False, detector_cap_at_model_max=True)
VLSAFE = ProtectorPreset(
    name="vlsafe", detector_train_template=DETECTOR_TEMPLATE, detector_inference_template=DETECTOR_TEMPLATE,
    detox_train_template=DETOX_TEMPLATE, detox_inference_template=DETOX_TEMPLATE, both_unsafe_target=REFUSAL,
    refuse_when="chosen", strip=True, joint_detox_tokens=False, detox_greedy=True, tidy_rewrite=True,
    detector_cap_at_model_max=False)
PRESETS = {preset.name: preset for preset in (RELEASED, VLSAFE)}
#: Checkpoints written before presets existed were trained on vlsafe's format.
LEGACY_PRESET = "vlsafe"


def get_preset(name: str | ProtectorPreset) -> ProtectorPreset:
    if isinstance(name, ProtectorPreset):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown protector preset {name!r}; use one of {sorted(PRESETS)}")
    return PRESETS[name]
