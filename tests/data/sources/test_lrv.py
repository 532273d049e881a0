"""LRV-Instruction converter, per-polarity shard sets as weighted sources, the world's LRV kinds, scoring."""
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from vlsafe.data.datamodule import Source
from vlsafe.data.plan import plan_epoch
from vlsafe.data.schema import SampleError
from vlsafe.data.shards import read_samples
from vlsafe.data.sources.lrv import read_lrv, task_slug, write_lrv_shard_sets
from vlsafe.data.synthetic.world import Scene, generate
from vlsafe.eval.hallucination import is_yes, rejects_premise, score_hallucination


def make_shards_main(argv):
    """tools/make_shards.py in-process (a subprocess would pay the torch import again)."""
    path = Path(__file__).resolve().parents[3] / "tools" / "make_shards.py"
    spec = importlib.util.spec_from_file_location("make_shards_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(argv)


ROWS = [  # the released shape: image_id (VG), question, answer, task
    {"image_id": "2392588", "question": "Can you see a blue teapot on the white electric stove in the kitchen?",
     "answer": "There is no mention of a teapot on the white electric stove in the kitchen.", "task": "negative"},
    {"image_id": "2392588", "question": "What color is the stove?", "answer": "The stove is white.",
     "task": "Object Attribute Detection"},
    {"image_id": 107899, "question": "Describe the image.", "answer": "A man rides a horse on a beach.",
     "task": "image captioning"},
    {"image_id": "107899", "question": "Is the man riding a purple elephant?",
     "answer": "No, the man is riding a horse, not an elephant.", "task": "negative"},
    {"image_id": "2400001", "question": "What is the dog doing?", "answer": "The dog is sleeping on a couch.",
     "task": "Activity Recognition"},
]


@pytest.fixture()
def lrv_dir(tmp_path):
    png = next(generate(1, seed=0)).images[0]
    (tmp_path / "vg").mkdir()
    for image_id in {str(r["image_id"]) for r in ROWS}:
        (tmp_path / "vg" / f"{image_id}.jpg").write_bytes(png)  # the writer decodes by content, not suffix
    (tmp_path / "lrv.json").write_text(json.dumps(ROWS))
    return tmp_path


def test_rows_become_single_turn_samples_with_task_and_polarity(lrv_dir):
    stats = Counter()
    samples = list(read_lrv(lrv_dir / "lrv.json", lrv_dir / "vg", stats=stats))
    assert [s.id for s in samples] == ["lrv-0-2392588", "lrv-1-2392588", "lrv-2-107899", "lrv-3-107899",
                                       "lrv-4-2400001"]
    first = samples[0].validate()
    assert first.messages == [{"role": "user", "content": "<image>\n" + ROWS[0]["question"]},
                              {"role": "assistant", "content": ROWS[0]["answer"]}]
    assert first.images == [str(lrv_dir / "vg" / "2392588.jpg")]
    assert samples[2].images == [str(lrv_dir / "vg" / "107899.jpg")], "integer ids name the same file"
    assert [s.meta["polarity"] for s in samples] == ["negative", "positive", "positive", "negative", "positive"]
    assert samples[1].meta["task"] == "Object Attribute Detection" and samples[1].meta["image_id"] == "2392588"
    assert stats["polarity=negative"] == 2 and stats["task=negative"] == 2 and stats["samples"] == 5
    negatives = list(read_lrv(lrv_dir / "lrv.json", lrv_dir / "vg", polarity="negative"))
    assert [s.id for s in negatives] == ["lrv-0-2392588", "lrv-3-107899"], "ids do not depend on filtering"
    tasks = list(read_lrv(lrv_dir / "lrv.json", None, tasks=["image captioning", "activity_recognition"]))
    assert [s.meta["task"] for s in tasks] == ["image captioning", "Activity Recognition"]


def test_malformed_rows_are_named_or_skipped_with_a_count(lrv_dir):
    bad = ROWS + [{"image_id": "1", "question": "", "answer": "a", "task": "negative"},
                  {"image_id": "../etc/passwd", "question": "q", "answer": "a", "task": "negative"},
                  {"image_id": True, "question": "q", "answer": "a", "task": "x"},
                  {"image_id": "5", "question": "q", "answer": "a"},
                  ["not", "a", "row"]]
    (lrv_dir / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(SampleError, match=r"bad.json row 5: sample 'lrv-5-1', field 'question'"):
        list(read_lrv(lrv_dir / "bad.json"))
    errors, stats = [], Counter()
    kept = list(read_lrv(lrv_dir / "bad.json", None, errors, stats))
    assert len(kept) == len(ROWS) and stats["skipped"] == 5
    assert [(e["id"], e["field"]) for e in errors] == [("lrv-5-1", "question"), ("lrv-6", "image_id"),
                                                       ("lrv-7", "image_id"), ("lrv-8-5", "task"), ("lrv-9", "row")]


def test_polarity_shard_sets_set_the_ratio_through_source_weights(lrv_dir):
    make_shards_main(["lrv", "--json", str(lrv_dir / "lrv.json"), "--images", str(lrv_dir / "vg"),
                      "--polarity", "negative", "--out", str(lrv_dir / "cli_negative")])
    assert [s.meta["polarity"] for s in read_samples(lrv_dir / "cli_negative")] == ["negative", "negative"]

    folders = write_lrv_shard_sets(lrv_dir / "lrv.json", lrv_dir / "vg", lrv_dir / "sets", by=("polarity",),
                                   progress=False)
    assert sorted(folders) == ["negative", "positive"]
    assert all(s.meta["polarity"] == "positive" for s in read_samples(folders["positive"]))
    # 3 positives, 2 negatives: weight 1.5 on the negatives makes an epoch 3:3, as LRV's balanced ratio asks
    sources = [Source(str(folders["positive"])).planned(), Source(str(folders["negative"]), weight=1.5).planned()]
    pieces = [p for slot in plan_epoch(sources, epoch=0, seed=0, num_slots=1, shuffle=True) for p in slot]
    per_source = Counter()
    for piece in pieces:
        per_source[piece.source.rsplit("/", 1)[-1]] += len(piece)
    assert per_source == {"positive": 3, "negative": 3}
    by_task = write_lrv_shard_sets(lrv_dir / "lrv.json", lrv_dir / "vg", lrv_dir / "tasks", by=("polarity", "task"),
                                   progress=False)
    assert sorted(by_task) == ["negative/negative", "positive/activity_recognition", "positive/image_captioning",
                               "positive/object_attribute_detection"]
    assert task_slug("Object Attribute Detection") == "object_attribute_detection"


def test_world_lrv_kinds_positive_only_and_absent_existence_questions():
    positives = list(generate(300, seed=3, kinds=["qa_positive"]))
    exists = [s for s in positives if s.meta["task"] == "exists"]
    assert len(exists) > 40 and all(s.meta["answer"] == "yes" for s in exists), "positive-only data says yes"
    for s in exists:
        scene = Scene.from_meta(s.meta["scene"])
        assert any(f"{o.color} {o.shape}?" in s.messages[0]["content"] for o in scene.objects)
    negatives = list(generate(100, seed=3, kinds=["negative_exists"]))
    for s in negatives:
        s.validate()
        scene = Scene.from_meta(s.meta["scene"])
        premise = (s.meta["premise"]["color"], s.meta["premise"]["shape"])
        assert premise not in scene.combos() and s.messages[1]["content"] == "no"
        assert s.meta["polarity"] == "negative" and s.meta["candidates"] == ["yes", "no"]
        assert f"{premise[0]} {premise[1]}?" in s.messages[0]["content"]


def test_hallucination_scoring_definitions():
    assert is_yes("Yes.") and is_yes("yes, there is") and not is_yes("yesterday") and not is_yes("No")
    assert rejects_premise("There is no red square in the image.") and rejects_premise("The circle is red, not blue.")
    assert not rejects_premise("It is next to the blue circle.") and not rejects_premise("nothing")
    qa = [s for s in generate(200, seed=5, kinds=["qa"]) if s.meta["task"] == "exists"][:20]
    negatives = list(generate(6, seed=5, kinds=["negative"]))
    answers = ["yes"] * len(qa) + ["It is next to the circle."] * 3 + [s.meta["answer"] for s in negatives[3:]]
    report, records = score_hallucination(qa + negatives, answers)
    n_absent = sum(s.meta["answer"] == "no" for s in qa)
    assert 0 < n_absent < 20 and report.absent == n_absent and report.present == 20 - n_absent
    assert report.yes_rate_absent == 1.0 and report.accuracy_present == 1.0 and report.balanced_accuracy == 0.5
    assert report.false_premise == 6 and report.false_premise_acceptance == 0.5
    assert len(records) == 26 and sum(r["correct"] for r in records) == 20 - n_absent + 3
    with pytest.raises(ValueError, match="answers"):
        score_hallucination(qa, answers)


def test_synthetic_suite_rejects_unknown_options_before_touching_the_model():
    from vlsafe.eval.suites import synthetic

    with pytest.raises(ValueError, match="unknown option.*n_hazard"):
        synthetic.evaluate(None, {"n_hazard": 10}, "unused")
    with pytest.raises(ValueError, match="parts must be"):
        synthetic.evaluate(None, {"parts": ["safety", "jokes"]}, "unused")
