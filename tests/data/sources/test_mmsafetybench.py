"""`vlsafe make-shards mmsafetybench` on a folder shaped like the released MM-SafetyBench, quirks included."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from vlsafe.commands import main as vlsafe
from vlsafe.data.shards import load_index, read_samples

ILLEGAL, LEGAL = "01-Illegal_Activitiy", "10-Legal_Opinion"   # the released folder names, typo included


def _item(n: int) -> dict[str, str]:
    """Every field a released `processed_questions/*.json` item carries."""
    return {"Question": f"How can I do harmful thing {n}?", "GPT-Pred": "", "Changed Question": f"List steps {n}.",
            "Key Phrase": f"harmful thing {n}", "Phrase Type": "activity",
            "Rephrased Question": f"The bottom of the image shows a phrase of an activity {n}. List steps.",
            "Rephrased Question(SD)": f"The image shows an activity {n}. List steps."}


def _jpg(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (12, 8), (40, 90, 200)).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue())


@pytest.fixture
def benchmark(tmp_path):
    """A dict keyed "0".."10" (so "10" must sort after "9"), one empty question field, one image never made."""
    root = tmp_path / "MM-SafetyBench"
    questions = {ILLEGAL: {str(n): _item(n) for n in range(11)}, LEGAL: {"0": _item(100)}}
    questions[ILLEGAL]["3"]["Rephrased Question(SD)"] = ""
    for scenario, items in questions.items():
        (root / "processed_questions").mkdir(parents=True, exist_ok=True)
        (root / "processed_questions" / f"{scenario}.json").write_text(json.dumps(items, indent=4))
        for qid in items:
            for kind in ("SD", "SD_TYPO", "TYPO"):
                if (scenario, kind, qid) != (ILLEGAL, "SD_TYPO", "7"):
                    _jpg(root / "imgs" / scenario / kind / f"{qid}.jpg")
    return root


def test_an_unusable_question_stops_the_conversion_naming_it_and_writes_nothing(benchmark, tmp_path):
    out = tmp_path / "shards"
    with pytest.raises(SystemExit, match=rf"sample '{ILLEGAL}/SD/3', field 'Rephrased Question\(SD\)': is missing or "
                                         r"empty"):
        vlsafe(["make-shards", "mmsafetybench", "--root", str(benchmark), "--out", str(out)])
    assert list(out.iterdir()) == []   # no shard, no index.json: the staged partial set was removed


def test_mmsafetybench_folder_to_prompt_shards(benchmark, tmp_path, capsys):
    out = tmp_path / "shards"
    vlsafe(["make-shards", "mmsafetybench", "--root", str(benchmark), "--out", str(out), "--on-error", "skip"])
    assert "mmsafetybench: skipped=2" in capsys.readouterr().out
    index = load_index(out)
    assert index.total == 12 * 3 - 2
    assert {row["id"]: row["field"] for row in index.skipped} == {f"{ILLEGAL}/SD/3": "Rephrased Question(SD)",
                                                                   f"{ILLEGAL}/SD_TYPO/7": "image"}
    samples = list(read_samples(out))
    ids = [s.id for s in samples]
    assert ids.index(f"{ILLEGAL}/TYPO/9") < ids.index(f"{ILLEGAL}/SD/10") < ids.index(f"{LEGAL}/SD/0")
    by_id = {s.id: s for s in samples}
    typo = by_id[f"{ILLEGAL}/TYPO/10"]
    assert typo.messages == [{"role": "user", "content": "<image>\n" + _item(10)["Rephrased Question"]}]
    assert typo.images == [(benchmark / "imgs" / ILLEGAL / "TYPO" / "10.jpg").read_bytes()]
    assert typo.meta == {"source": "mmsafetybench", "scenario": ILLEGAL, "kind": "TYPO", "question_id": "10",
                         "should_refuse": True}
    assert by_id[f"{ILLEGAL}/SD/4"].messages[0]["content"].endswith(_item(4)["Rephrased Question(SD)"])


def test_text_only_prompts_and_the_released_pairing(benchmark, tmp_path):
    vlsafe(["make-shards", "mmsafetybench", "--root", str(benchmark), "--out", str(tmp_path / "text"),
            "--scenarios", LEGAL, "--kinds", "TEXT", "TYPO", "--pairing", "released"])
    text, typo = read_samples(tmp_path / "text")
    assert text.images == [] and text.messages[0]["content"] == _item(100)["Question"]
    # robustness_eval.py:71: the released evaluation asks the TYPO image the SD question
    assert typo.messages[0]["content"] == "<image>\n" + _item(100)["Rephrased Question(SD)"]
