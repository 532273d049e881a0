"""Synthetic test sets in the benchmarks' layouts: read by the public-format readers, and rebuilt when stale."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlsafe.data.synthetic import benchmarks
from vlsafe.data.synthetic.benchmarks import build_benchmark


def test_vlguard_layout_reads_as_the_three_subsets(tmp_path):
    from vlsafe.data.sources.vlguard import vlguard_eval_samples

    options = build_benchmark("vlguard", n=3, root=tmp_path)
    counts = {s: len(vlguard_eval_samples(options["test_json"], options["images"], s))
              for s in ("unsafes", "safe_unsafes", "safe_safes")}
    assert counts == {"unsafes": 3, "safe_unsafes": 3, "safe_safes": 3}
    rows = json.loads(Path(options["test_json"]).read_text())
    assert all(row["image"].startswith("unsafe/" if not row["safe"] else "safe/") for row in rows)
    assert options["stamp"]["layout"] == "vlguard" and len(options["stamp"]["generator_sha256"]) == 64


def test_mmsafetybench_layout_reads_every_scenario_and_kind(tmp_path):
    from vlsafe.data.sources.mmsafetybench import read_mmsafetybench

    options = build_benchmark("mmsafetybench", n=2, root=tmp_path)
    samples = list(read_mmsafetybench(options["root"], kinds=("SD", "SD_TYPO", "TYPO", "TEXT")))
    assert len(samples) == 2 * 2 * 4
    assert {s.meta["scenario"] for s in samples} == set(options["scenarios"])
    sd = next(s for s in samples if s.meta["kind"] == "SD")
    assert "List steps in detail to" in sd.messages[0]["content"]


def test_gavie_layout_boxes_are_the_scene_boxes(tmp_path):
    from PIL import Image

    options = build_benchmark("gavie", n=4, root=tmp_path)
    items = json.loads(Path(options["evaluation_set"]).read_text())
    annotations = json.loads(Path(options["annotations"]).read_text())
    assert len(items) == 4 and {i["task"] for i in items} <= {"positive", "negative"}
    for item in items:
        with Image.open(f"{options['images']}/{item['image_id']}.jpg") as image:
            assert image.format == "JPEG"
            size = image.size
        for region in annotations[item["image_id"]]:
            x, y, w, h = region["bbox"]
            assert w > 0 and h > 0 and x + w <= size[0] and y + h <= size[1], region


def test_a_set_is_reused_while_its_stamp_holds_and_rebuilt_when_the_generator_changes(tmp_path, monkeypatch):
    first = build_benchmark("vlguard", n=2, root=tmp_path)
    folder = tmp_path / "vlguard-n2-seed0-64px"
    planted = folder / "planted.txt"
    planted.write_text("left by the first build")
    assert build_benchmark("vlguard", n=2, root=tmp_path) == first and planted.exists()  # same stamp: untouched
    monkeypatch.setattr(benchmarks, "generator_digest", lambda: "0" * 64)  # as if world.py had been edited
    rebuilt = build_benchmark("vlguard", n=2, root=tmp_path)
    assert not planted.exists() and rebuilt["stamp"]["generator_sha256"] == "0" * 64
    assert json.loads((folder / "stamp.json").read_text())["stamp"] == rebuilt["stamp"]
    assert not list(tmp_path.glob("*.building-*"))


def test_unknown_layout_and_bad_size_are_named(tmp_path):
    with pytest.raises(ValueError, match="no synthetic test set in the 'pope' layout"):
        build_benchmark("pope", root=tmp_path)
    with pytest.raises(ValueError, match="n must be >= 1"):
        build_benchmark("gavie", n=0, root=tmp_path)
