"""PKU-SafeRLHF / harmful_vs_unharmful converter: mapping, label semantics (1 = safe), errors, make_shards."""
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from vlsafe.data.schema import SampleError
from vlsafe.data.shards import load_index, read_samples
from vlsafe.data.sources.saferlhf import read_saferlhf

ROOT = Path(__file__).resolve().parents[3]


def pku(i, safer, safe0, safe1, **extra):
    return {"prompt": f"How do I do thing {i}?", "response_0": f"answer zero {i}", "response_1": f"answer one {i}",
            "safer_response_id": safer, "is_response_0_safe": safe0, "is_response_1_safe": safe1, **extra}


def test_pairs_put_the_safer_response_first_with_its_own_label(tmp_path):
    rows = [pku(0, 1, False, True,
                response_0_harm_category={"Violence": True, "Privacy": False}, response_1_harm_category={}),
            pku(1, 0, False, False), pku(2, "1", "true", 1)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    stats = Counter()
    samples = list(read_saferlhf(path, stats=stats))
    first, second, third = samples
    assert first.messages == [{"role": "user", "content": "How do I do thing 0?"}]
    assert (first.chosen, first.rejected) == ("answer one 0", "answer zero 0")
    assert first.labels == {"chosen_safe": 1.0, "rejected_safe": 0.0} and first.meta["category"] == "Violence"
    assert (second.chosen, second.labels) == ("answer zero 1", {"chosen_safe": 0.0, "rejected_safe": 0.0})
    assert third.chosen == "answer one 2" and third.labels == {"chosen_safe": 1.0, "rejected_safe": 1.0}
    assert stats["pairs_one_safe"] == 1 and stats["pairs_both_unsafe"] == 1 and stats["pairs_both_safe"] == 1
    # the detector and detoxifier encoders read it exactly like synthetic harm_text
    from vlsafe.methods.protector.encoders import detox_pair
    assert detox_pair(first) == ("answer zero 0", "answer one 0")
    assert detox_pair(second)[1] == "Sorry, but I can't help you with your request."


def test_single_responses_flip_harmful_labels_to_one_is_safe(tmp_path):
    rows = [{"question": "q1", "response": "r1", "is_harmful": True},
            {"instruction": "q2", "output": "r2", "safe": 1},
            {"prompt": "q3", "answer": "r3", "label": 1}]
    path = tmp_path / "aug.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(SampleError, match=r"row 2: sample 'harmqa-2', field 'label'.*--label-means"):
        list(read_saferlhf(path, form="single"))
    samples = list(read_saferlhf(path, form="single", label_means="harmful"))
    assert [s.labels["safe"] for s in samples] == [0.0, 1.0, 0.0]
    assert samples[0].messages[-1] == {"role": "assistant", "content": "r1"}


def test_bad_rows_name_the_field_or_are_counted_with_skip(tmp_path):
    rows = [pku(0, 2, True, False), pku(1, 0, "maybe", True), {**pku(2, 0, True, False), "response_1": ""},
            pku(3, 0, True, False)]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(SampleError, match=r"bad.json row 0: sample 'saferlhf-0', field 'safer_response_id'"):
        list(read_saferlhf(path))
    errors = []
    kept = list(read_saferlhf(path, errors=errors))
    assert [s.id for s in kept] == ["saferlhf-3"]
    assert [e["field"] for e in errors] == ["safer_response_id", "is_response_0_safe", "response_1"]


def test_make_shards_subcommand_writes_text_only_shards(tmp_path):
    path = tmp_path / "pku.jsonl"
    path.write_text("\n".join(json.dumps(pku(i, i % 2, True, i % 3 == 0)) for i in range(5)) + "\n{not json}\n")
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "tools/make_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit, match="pku.jsonl:6: malformed JSON"):
        tool.main(["saferlhf", "--json", str(path), "--out", str(tmp_path / "bad")])
    path.write_text("\n".join(json.dumps(pku(i, i % 2, True, i % 3 == 0)) for i in range(5)))
    tool.main(["saferlhf", "--json", str(path), "--out", str(tmp_path / "shards")])
    assert load_index(str(tmp_path / "shards")).total == 5
    samples = list(read_samples(str(tmp_path / "shards")))
    assert samples[1].chosen == "answer one 1" and samples[1].images == []
