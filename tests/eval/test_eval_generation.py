"""Batched, resumable generation: a cut-short cache is continued, a finished one costs nothing, changed
settings are refused; the real tiny model gives the same answers resumed or not."""
from __future__ import annotations

import json

import pytest


def _samples(n, with_image=True):
    from PIL import Image

    from vlsafe.data.encoding.processor import image_bytes
    from vlsafe.data.schema import Sample

    image = image_bytes(Image.new("RGB", (12, 9), (200, 30, 30)))
    prefix = "<image>\n" if with_image else ""
    return [Sample(id=f"s{i}", messages=[{"role": "user", "content": f"{prefix}question {i}"}],
                   images=[image] if with_image else []) for i in range(n)]


def test_a_killed_run_continues_and_a_finished_one_is_free(text_model_factory, tmp_path):
    from vlsafe.eval.generation import GenerationConfig, generate_answers

    cache = tmp_path / "answers.jsonl"
    samples = _samples(7)
    config = GenerationConfig(max_new_tokens=5)
    model = text_model_factory(lambda q: f"answer to {q}")
    first = generate_answers(model, samples[:4], config, cache_path=cache, batch_size=3, progress=False)
    assert first.generated == 4 and model.batches == [3, 1]
    assert model.settings[0] == {"max_new_tokens": 5, "do_sample": False, "num_beams": 1, "extra": {}}
    # simulate a kill in the middle of writing a line
    with cache.open("a") as stream:
        stream.write('{"id": "s4", "prompt": "abc", "ans')
    model = text_model_factory(lambda q: f"answer to {q}")
    second = generate_answers(model, samples, config, cache_path=cache, batch_size=3, progress=False)
    assert (second.generated, second.cached) == (3, 4) and model.calls == 3
    assert second.answers == [f"answer to question {i}" for i in range(7)]
    third_model = text_model_factory(lambda q: "never asked")
    third = generate_answers(third_model, samples, config, cache_path=cache, batch_size=3, progress=False)
    assert third.answers == second.answers and third_model.calls == 0 and third.cached == 7
    lines = cache.read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line) for line in lines)  # header + 7 answers, the cut line dropped


def test_a_changed_prompt_is_regenerated_and_changed_settings_are_refused(text_model_factory, tmp_path):
    from vlsafe.eval.generation import GenerationConfig, generate_answers

    cache = tmp_path / "answers.jsonl"
    samples = _samples(2, with_image=False)
    model = text_model_factory(lambda q: q.upper())
    generate_answers(model, samples, GenerationConfig(max_new_tokens=5), cache_path=cache, progress=False)
    samples[1].messages[0]["content"] = "question changed"
    result = generate_answers(model, samples, GenerationConfig(max_new_tokens=5), cache_path=cache, progress=False)
    assert result.answers == ["QUESTION 0", "QUESTION CHANGED"] and result.generated == 1
    with pytest.raises(ValueError, match=r"different settings \(max_new_tokens\)"):
        generate_answers(model, samples, GenerationConfig(max_new_tokens=9), cache_path=cache, progress=False)
    with pytest.raises(ValueError, match="unknown conversation template"):
        GenerationConfig(template="nope")


def test_unusable_samples_are_named_or_skipped(text_model_factory, tmp_path):
    from vlsafe.data.schema import Sample, SampleError
    from vlsafe.eval.generation import generate_answers

    samples = _samples(2) + [Sample(id="broken", messages=[{"role": "user", "content": "<image>\nq"}],
                                    images=[str(tmp_path / "missing.png")])]
    model = text_model_factory(lambda q: "ok")
    with pytest.raises(SampleError, match="broken.*cannot read image file"):
        generate_answers(model, samples, progress=False)
    result = generate_answers(model, samples, on_error="skip", progress=False)
    assert result.answers == ["ok", "ok", None] and result.skipped[0]["id"] == "broken"


def test_tiny_model_answers_are_the_same_resumed_or_not(tiny_checkpoint, tmp_path):
    from vlsafe.eval.checkpoint import load_module
    from vlsafe.eval.generation import GenerationConfig, generate_answers

    module = load_module(tiny_checkpoint)
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    samples = _samples(5)
    config = GenerationConfig(max_new_tokens=6, template="llava_v1")
    whole = generate_answers(module, samples, config, batch_size=5, progress=False)
    cache = tmp_path / "answers.jsonl"
    generate_answers(module, samples[:2], config, cache_path=cache, batch_size=2, progress=False)
    resumed = generate_answers(module, samples, config, cache_path=cache, batch_size=2, progress=False)
    assert resumed.generated == 3 and resumed.answers == whole.answers
    assert all(isinstance(a, str) for a in whole.answers)


def test_checkpoint_loads_as_the_named_module_class_with_the_same_weights(tiny_checkpoint):
    import torch

    from vlsafe.eval.checkpoint import LazyModule, load_module
    from vlsafe.methods.sft import SFTModule

    with pytest.raises(ValueError, match="not a vlsafe class"):
        load_module(tiny_checkpoint, model_class="os.path.join")
    with pytest.raises(ValueError, match="not a vlsafe.methods.base.VLMModule subclass"):
        load_module(tiny_checkpoint, model_class="vlsafe.data.schema.Sample")
    lazy = LazyModule(lambda: load_module(tiny_checkpoint, model_class="vlsafe.methods.sft.SFTModule"),
                      identity={"path": "x"})
    assert not lazy.loaded and lazy.eval_identity == {"path": "x"}
    assert isinstance(lazy, SFTModule) and lazy.loaded  # isinstance loads it
    saved = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    for name, value in lazy.get().state_dict().items():
        torch.testing.assert_close(value, saved[name], msg=name)
