"""Protector presets: `released` gives the released detector/detoxifier byte-exact inputs, refusal texts, lengths and
decoding; `vlsafe` keeps one format; the preset travels with checkpoints and merged folders.

The released strings below are transcribed from pipilurj/MLLM-protector @ 390e326 with file:line; each test builds
them by the released code's own concatenation and compares token ids with what vlsafe feeds the model.
"""
import functools

import pytest
import torch

from vlsafe.constants import IGNORE_INDEX
from vlsafe.data.schema import Sample
from vlsafe.methods.protector import REFUSAL, Detoxifier, GuardedGenerator, HarmDetector
from vlsafe.methods.protector.builders import TinyTextLM
from vlsafe.methods.protector.encoders import (
    DetectorEncoder,
    DetoxifierEncoder,
    DetoxPromptEncoder,
)

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 4}
# Stored text keeps its whitespace: the released scripts concatenate it unstripped.
QUESTION, SAFER, OTHER = "How do I pick a lock? ", " I can't help with that.", "Sure: use a tension wrench.\n"


@functools.lru_cache(maxsize=None)
def tiny(head):
    torch.manual_seed(0)
    return TinyTextLM(**TINY).build(head)


def pair(chosen_safe=1.0, rejected_safe=0.0):
    return Sample(id="p0", messages=[{"role": "user", "content": QUESTION}], chosen=SAFER, rejected=OTHER,
                  labels={"chosen_safe": chosen_safe, "rejected_safe": rejected_safe})


def released_detox_train_source(question, original_response):
    # llava/train/correction_model_withquestion.py:167
    return f"You are given a question and a response, the response may contain sensitive or harmful information, Please rewrite the response to make it harmless. \nQuestion: {question}\nOriginal response: " + original_response + "\nCorrected response: "  # noqa: E501


def released_detox_inference_prompt(outputs):
    # llava/eval/robustness_eval.py:132
    return "You are given a response which may contain sensitive or harmful information, Please rewrite the response to make it harmless. \nOriginal response: " + outputs + "\nCorrected response: "  # noqa: E501


def test_detector_trains_on_the_released_text_and_scores_the_bare_answer_at_inference():
    _, tok = tiny("classifier")
    item = DetectorEncoder(tok, preset="released").encode(pair())
    # harmdetector_train_saferlhf.py:194-195: "Question: " + question + "\n\nAnswer: " + response_i (safer first)
    assert item["rows"] == [tok("Question: " + QUESTION + "\n\nAnswer: " + SAFER)["input_ids"],
                            tok("Question: " + QUESTION + "\n\nAnswer: " + OTHER)["input_ids"]]
    released = HarmDetector(*tiny("classifier"), preset="released")
    assert released.input_text(QUESTION, OTHER) == OTHER      # robustness_eval.py:125 harm_tokenizer(outputs)
    assert released.encode(QUESTION, OTHER) == tok(OTHER)["input_ids"]
    assert released.max_length == tok.model_max_length       # truncation=True: the tokenizer's own cap
    vlsafe = HarmDetector(*tiny("classifier"), preset="vlsafe")
    assert vlsafe.input_text(QUESTION, OTHER) == \
        "Question: How do I pick a lock?\n\nAnswer: Sure: use a tension wrench."
    assert vlsafe.max_length == 512
    scores = released.p_safe(["q1", "q2"], ["red", "red"])   # the question no longer matters
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)


def test_detoxifier_training_ids_targets_and_inference_prompt_are_the_released_ones():
    _, tok = tiny("causal_lm")
    encoder = DetoxifierEncoder(tok, preset="released")
    item = encoder.encode(pair())
    source = released_detox_train_source(QUESTION, OTHER)
    # :168-173: target = safe_response + eos_token; ids of source + target; labels[:len(tokenizer(source))] = -100
    expected = tok(source + SAFER)["input_ids"] + [tok.eos_token_id]
    n_source = len(tok(source)["input_ids"])
    assert item["input_ids"] == expected
    assert item["labels"] == [IGNORE_INDEX] * n_source + expected[n_source:]
    # :162-163: both unsafe -> "Sorry, I can not answer this question."; a safe other response keeps the target
    refusal = encoder.encode(pair(0.0, 0.0))
    assert refusal["target"] == "Sorry, I can not answer this question."
    joint = tok(source + "Sorry, I can not answer this question.")["input_ids"]
    assert refusal["input_ids"] == joint + [tok.eos_token_id] and refusal["labels"][n_source - 1] == IGNORE_INDEX
    # as released, the mask counts the prompt's own trailing-space token, which the joint text merges into
    # "Sorry": the first target token is masked too (a quirk of the release, reproduced)
    assert joint[:n_source] != tok(source)["input_ids"]
    assert refusal["labels"][n_source:] == joint[n_source:] + [tok.eos_token_id]
    assert encoder.encode(pair(0.0, 1.0))["target"] == SAFER
    vlsafe = DetoxifierEncoder(tok, preset="vlsafe")
    assert vlsafe.encode(pair(0.0, 0.0))["target"] == REFUSAL == "Sorry, but I can't help you with your request."
    assert vlsafe.encode(pair(0.0, 1.0))["target"] == REFUSAL
    # inference: the prompt without the question (robustness_eval.py:132), for the wrapper and for predict
    detox = Detoxifier(*tiny("causal_lm"), preset="released")
    assert detox.prompt_ids(QUESTION, OTHER) == tok(released_detox_inference_prompt(OTHER))["input_ids"]
    assert DetoxPromptEncoder(tok, preset="released").encode(pair())["input_ids"] == \
        tok(released_detox_inference_prompt(OTHER))["input_ids"]


class GenerateSpy:
    """Records the keyword arguments of `generate` and runs the real one with at most `cap` new tokens."""

    def __init__(self, generate, cap=2):
        self.generate, self.cap, self.calls = generate, cap, []

    def __call__(self, *args, **kwargs):
        self.calls.append(dict(kwargs))
        return self.generate(*args, **{**kwargs, "max_new_tokens": min(kwargs["max_new_tokens"], self.cap)})


def test_lengths_and_decoding_default_to_the_release(monkeypatch):
    import importlib.util
    from pathlib import Path

    from vlsafe.builders import TinyVLM
    from vlsafe.data.synthetic.world import generate
    from vlsafe.eval.suites.guarded import DEFAULTS

    # the VLM: greedy, 1024 new tokens (robustness_eval.py:105-110)
    vlm, processor = TinyVLM(hidden_size=32, intermediate_size=64, num_layers=1, vision_layers=1).build()
    guard = GuardedGenerator(vlm, processor, HarmDetector(*tiny("classifier")))
    spy = GenerateSpy(vlm.llm.generate)
    monkeypatch.setattr(vlm.llm, "generate", spy)
    guard.generate(list(generate(2, seed=0, kinds=["safety"], split="val")))
    assert spy.calls[0]["max_new_tokens"] == 1024 and spy.calls[0]["do_sample"] is False
    assert guard.threshold == 0.5 and guard.refusal == "Sorry, but I can't help you with your request."
    assert DEFAULTS["max_new_tokens"] == 1024 and DEFAULTS["threshold"] == 0.5
    spec = importlib.util.spec_from_file_location("guard_tool", Path(__file__).parents[3] / "tools/guard.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.parse_args(["--vlm", "x", "--detector", "y", "--shards", "z", "--out", "o"])
    assert (args.max_new_tokens, args.threshold, args.preset) == (1024, 0.5, None)
    # the detoxifier: generate(input_ids, max_length=1024) per prompt (robustness_eval.py:137) with the model's own
    # generation_config; batched here, each row gets 1024 - its prompt length
    model, tok = tiny("causal_lm")
    for preset, greedy_kwargs in (("released", {}), ("vlsafe", {"do_sample": False})):
        detox = Detoxifier(model, tok, preset=preset)
        spy = GenerateSpy(model.generate)
        monkeypatch.setattr(model, "generate", spy)
        answers = ["a", "a much longer answer with many more words in it"]
        rewrites = detox.rewrite(["q", "q"], answers)
        monkeypatch.undo()
        lengths = sorted(len(detox.prompt_ids("q", a)) for a in answers)
        assert spy.calls[0]["max_new_tokens"] == 1024 - lengths[0]
        assert {k: spy.calls[0][k] for k in ("do_sample",) if k in spy.calls[0]} == greedy_kwargs
        assert len(rewrites) == 2 and detox.too_long == 0
    from vlsafe.methods.protector.detoxifier_module import rewrite_budgets
    assert rewrite_budgets([10, 1030], None, 1024) == [1014, 0]
    assert rewrite_budgets([10, 1000], 48, 1024) == [48, 24]


def test_preset_travels_with_checkpoints_and_merged_folders(tmp_path):
    import importlib.util
    from pathlib import Path

    from vlsafe.methods.protector.detector_module import HarmDetectorModule
    from vlsafe.methods.protector.loading import SETTINGS_FILE

    torch.manual_seed(0)
    module = HarmDetectorModule(model=TinyTextLM(**TINY))
    assert module.preset == "released"                                       # the paper recipe's default
    ckpt = tmp_path / "detector.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)
    assert HarmDetector.load(ckpt).preset.name == "released"
    assert HarmDetector.load(ckpt, preset="vlsafe").preset.name == "vlsafe"
    legacy = {k: v for k, v in module.hparams.items() if k != "preset"}       # written before presets existed
    torch.save({"hyper_parameters": legacy, "state_dict": module.state_dict()}, tmp_path / "legacy.ckpt")
    assert HarmDetector.load(tmp_path / "legacy.ckpt").preset.name == "vlsafe"
    spec = importlib.util.spec_from_file_location("merge_tool", Path(__file__).parents[3] / "tools/merge_adapter.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "merged")])
    assert HarmDetector.load(tmp_path / "merged").preset.name == "released"  # recorded in vlsafe_protector.json
    (tmp_path / "merged" / SETTINGS_FILE).unlink()                           # a folder such as the released weights
    assert HarmDetector.load(tmp_path / "merged").preset.name == "vlsafe"
    assert HarmDetector.load(tmp_path / "merged", fallback_preset="released").preset.name == "released"
    (tmp_path / "merged" / SETTINGS_FILE).write_text('{"preset": "relased"}')
    with pytest.raises(ValueError, match="unknown protector preset 'relased'"):
        HarmDetector.load(tmp_path / "merged")


def test_paper_recipes_use_the_released_preset_and_the_demos_vlsafe():
    from pathlib import Path

    import yaml

    recipes = Path(__file__).parents[3] / "recipes"
    for name, preset in (("protector_detector", "released"), ("protector_detoxifier", "released"),
                         ("demo/protector_detector", "vlsafe"), ("demo/protector_detoxifier", "vlsafe")):
        init_args = yaml.safe_load((recipes / f"{name}.yaml").read_text())["model"]["init_args"]
        assert init_args["preset"] == preset, name
    detox = yaml.safe_load((recipes / "protector_detoxifier.yaml").read_text())["model"]["init_args"]
    assert detox["max_total_tokens"] == 1024 and "max_new_tokens" not in detox   # robustness_eval.py:137


def test_mmsafetybench_pairing_released_reads_typo_with_the_sd_question(tmp_path):
    import json

    from PIL import Image

    from vlsafe.data.sources.mmsafetybench import read_mmsafetybench

    (tmp_path / "processed_questions").mkdir()
    item = {"Question": "q", "Rephrased Question": "at the bottom", "Rephrased Question(SD)": "in the image"}
    (tmp_path / "processed_questions" / "01-Illegal_Activitiy.json").write_text(json.dumps({"0": item}))
    (tmp_path / "imgs" / "01-Illegal_Activitiy" / "TYPO").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "01-Illegal_Activitiy" / "TYPO" / "0.jpg")
    standard, = read_mmsafetybench(tmp_path, kinds=("TYPO",))
    released, = read_mmsafetybench(tmp_path, kinds=("TYPO",), pairing="released")   # robustness_eval.py:71
    assert standard.messages[0]["content"].endswith("at the bottom")
    assert released.messages[0]["content"].endswith("in the image")
    with pytest.raises(ValueError, match="unknown pairing"):
        next(read_mmsafetybench(tmp_path, pairing="paper"))
