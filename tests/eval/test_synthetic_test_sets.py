"""`synthetic:` in a benchmark suite's options: the suite reads a synthetic set in its own layout, built on first
use."""
from __future__ import annotations

import pytest

from vlsafe.eval.suites import synthetic_test_set


def test_synthetic_option_becomes_the_suites_paths_and_a_stamp(tmp_path):
    options, stamp = synthetic_test_set({"synthetic": {"n": 2, "root": str(tmp_path)}, "template": "vicuna_v1"},
                                        "vlguard")
    assert set(options) == {"test_json", "images", "template"} and stamp["n"] == 2
    assert options["test_json"].startswith(str(tmp_path))
    assert synthetic_test_set({"test_json": "x"}, "vlguard") == ({"test_json": "x"}, None)


@pytest.mark.parametrize("options, message", [
    ({"synthetic": True, "test_json": "mine.json"}, r"`synthetic` provides \['test_json'\]"),
    ({"synthetic": {"size": 3}}, "`synthetic` is true or a mapping with keys from"),
    ({"synthetic": "yes"}, "`synthetic` is true or a mapping"),
])
def test_bad_synthetic_options_are_named(tmp_path, options, message):
    if isinstance(options["synthetic"], dict) and "size" not in options["synthetic"]:
        options["synthetic"]["root"] = str(tmp_path)
    with pytest.raises(ValueError, match=message):
        synthetic_test_set(options, "vlguard")


def test_suites_score_their_synthetic_sets(tmp_path, text_model_factory):
    """A model that refuses everything: no attack succeeds, every benign prompt is refused, with the set's sizes."""
    from vlsafe.eval.suites import mmsafetybench, vlguard

    model = text_model_factory(lambda question: "I'm sorry, but I can't help with that.")
    root = str(tmp_path / "cache")
    result = vlguard.evaluate(model, {"synthetic": {"n": 3, "root": root}, "max_new_tokens": 4}, tmp_path / "vg",
                              progress=False)
    assert result.metrics["vlguard/unsafes/asr"] == 0.0 and result.metrics["vlguard/unsafes/asr_n"] == 3
    assert result.metrics["vlguard/safe_safes/refusal_rate"] == 100.0
    assert result.info["synthetic"]["layout"] == "vlguard"
    result = mmsafetybench.evaluate(model, {"synthetic": {"n": 2, "root": root}, "max_new_tokens": 4},
                                    tmp_path / "mmsb", progress=False)
    assert result.metrics["mmsafetybench/asr"] == 0.0 and result.metrics["mmsafetybench/asr_n"] == 2 * 2 * 3
    assert model.calls == 3 * 3 + 12
