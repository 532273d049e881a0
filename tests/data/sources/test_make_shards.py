"""tools/make_shards.py on LLaVA-format JSON + an image folder, including the bad-input paths."""
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from vlsafe.data.shards import load_index, read_samples

ROOT = Path(__file__).resolve().parents[3]


def make_shards(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/make_shards.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def llava_dataset(tmp_path: Path, records: list[dict]) -> Path:
    images = tmp_path / "images" / "coco"
    images.mkdir(parents=True)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(images / "a.jpg")
    Image.new("RGBA", (16, 16), (0, 0, 255, 128)).save(images / "b.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


GOOD = [
    {"id": "1", "image": "coco/a.jpg", "conversations": [
        {"from": "human", "value": "What colour is this?\n<image>"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
    {"id": "2", "image": "coco/b.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A blue square."}]},
    {"id": "3", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
]
BAD = [
    {"id": "missing-file", "image": "coco/nope.jpg", "conversations": GOOD[1]["conversations"]},
    {"id": "corrupt", "image": "coco/broken.jpg", "conversations": GOOD[1]["conversations"]},
    {"id": "no-placeholder", "image": "coco/a.jpg", "conversations": GOOD[2]["conversations"]},
]


def test_llava_json_to_shards_round_trip(tmp_path):
    data = llava_dataset(tmp_path, GOOD)
    proc = make_shards("llava", "--json", str(data), "--images", str(tmp_path / "images"), "--out",
                       str(tmp_path / "out"), "--max-samples", "2")
    assert proc.returncode == 0, proc.stderr
    assert load_index(tmp_path / "out").total == 3 and len(load_index(tmp_path / "out").shards) == 2
    samples = {s.id: s for s in read_samples(tmp_path / "out")}
    first = samples["1"]
    assert first.messages[0] == {"role": "user", "content": "<image>\nWhat colour is this?"}, "LLaVA moves <image> first"
    assert first.images[0] == (tmp_path / "images/coco/a.jpg").read_bytes(), "original bytes, not re-encoded"
    assert samples["3"].images == [] and samples["2"].messages[1]["role"] == "assistant"


def test_bad_records_stop_the_run_with_id_and_field(tmp_path):
    data = llava_dataset(tmp_path, GOOD + BAD[:1])
    proc = make_shards("llava", "--json", str(data), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "o"))
    assert proc.returncode != 0
    assert "missing-file" in proc.stderr and "images[0]" in proc.stderr and "cannot read image file" in proc.stderr


def test_bad_records_are_counted_and_listed_with_skip(tmp_path):
    data = llava_dataset(tmp_path, GOOD + BAD)
    proc = make_shards("llava", "--json", str(data), "--images", str(tmp_path / "images"), "--out",
                       str(tmp_path / "o"), "--on-error", "skip")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 samples" in proc.stdout and "skipped 3" in proc.stdout
    skipped = {row["id"]: row for row in load_index(tmp_path / "o").skipped}
    assert set(skipped) == {"missing-file", "corrupt", "no-placeholder"}
    assert "does not decode" in skipped["corrupt"]["error"]


def test_malformed_json_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,\n "conversations": [}]')
    proc = make_shards("llava", "--json", str(bad), "--out", str(tmp_path / "o"))
    assert proc.returncode != 0 and "bad.json: malformed JSON at line 2" in proc.stderr
