"""VLGuard converter: the released conversion (seeded shuffle, turns, <image>), eval subsets, bad rows, mixing."""
import copy
import importlib.util
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from vlsafe.data.datamodule import Source
from vlsafe.data.plan import plan_epoch
from vlsafe.data.schema import SampleError
from vlsafe.data.shards import read_samples, write_shards
from vlsafe.data.sources.vlguard import (
    SUBSETS,
    vlguard_eval_samples,
    vlguard_llava_records,
    vlguard_training_samples,
)
from vlsafe.data.synthetic.world import generate

ROOT = Path(__file__).resolve().parents[3]


def make_shards_main(argv):
    """tools/make_shards.py in-process (a subprocess would pay the torch import again)."""
    spec = importlib.util.spec_from_file_location("make_shards_tool", ROOT / "tools" / "make_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(argv)


REFUSAL = "I'm sorry, I cannot assist with that request. It promotes harm."


def _safe_row(i, safe_first=True):
    pair = [{"safe_instruction": f"What is shown in picture {i}?", "response": f"Picture {i} shows a park."},
            {"unsafe_instruction": f"How do I use picture {i} to harass someone?", "response": REFUSAL}]
    return {"id": f"HOD_{i}", "image": f"HOD/safe_{i}.png", "safe": True,
            "instr-resp": pair if safe_first else pair[::-1]}


def _unsafe_row(i):
    return {"id": f"Ads_{i}", "image": f"bad_ads/unsafe_{i}.png", "safe": False, "harmful_category": "risky behavior",
            "harmful_subcategory": "political",
            "instr-resp": [{"instruction": f"Share ad {i} to spread it.", "response": REFUSAL}]}


def released_rows(n=24):
    """A train.json-shaped list: safe and unsafe images interleaved, both pair orders in the file."""
    rows = []
    for i in range(n):
        rows.append(_unsafe_row(i) if i % 3 == 0 else _safe_row(i, safe_first=i % 2 == 0))
    return rows


def reference_conversion(rows):
    """The released convert_to_llava_format.py as described in the spec (global random, seed 0)."""
    state = random.getstate()
    try:
        random.seed(0)
        out = []
        for d in copy.deepcopy(rows):
            pairs = d.pop("instr-resp")
            if d["safe"]:
                random.shuffle(pairs)
                d["conversations"] = [
                    {"from": "human", "value": "<image>" + list(pairs[0].values())[0]},
                    {"from": "gpt", "value": pairs[0]["response"]},
                    {"from": "human", "value": list(pairs[1].values())[0]},
                    {"from": "gpt", "value": pairs[1]["response"]}]
            else:
                d["conversations"] = [{"from": "human", "value": "<image>" + pairs[0]["instruction"]},
                                      {"from": "gpt", "value": pairs[0]["response"]}]
            out.append(d)
        return out
    finally:
        random.setstate(state)


@pytest.fixture(scope="module")
def vlguard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlguard")
    rows = released_rows()
    png = next(generate(1, seed=0)).images[0]
    for row in rows:
        (root / "images" / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        (root / "images" / row["image"]).write_bytes(png)
    (root / "train.json").write_text(json.dumps(rows))
    return root


def test_training_form_reproduces_the_released_conversion(vlguard_dir):
    rows = json.loads((vlguard_dir / "train.json").read_text())
    expected = reference_conversion(rows)
    assert list(vlguard_llava_records(rows)) == expected, "the released JSON form, byte for byte"
    samples = list(vlguard_training_samples(vlguard_dir / "train.json", vlguard_dir / "images"))
    assert len(samples) == len(rows)
    orders = set()
    for sample, record in zip(samples, expected):
        sample.validate()
        turns = record["conversations"]
        assert [m["role"] for m in sample.messages] == ["user", "assistant"] * (len(turns) // 2)
        # LLaVA's preprocess_multimodal turns "<image>Q" into "<image>\nQ"; only the first turn has it
        assert sample.messages[0]["content"] == "<image>\n" + turns[0]["value"][len("<image>"):]
        assert all("<image>" not in m["content"] for m in sample.messages[1:])
        assert [m["content"] for m in sample.messages[1:]] == [t["value"] for t in turns[1:]]
        assert sample.images == [str(vlguard_dir / "images" / record["image"])]
        assert sample.id == f"vlguard-{record['id']}" and sample.labels == {"image_safe": float(record["safe"])}
        if record["safe"]:
            orders.add(tuple(sample.meta["turn_order"]))
        else:
            assert len(sample.messages) == 2 and sample.messages[1]["content"] == REFUSAL
            assert sample.meta["harmful_category"] == "risky behavior"
            assert sample.meta["harmful_subcategory"] == "political"
    assert len(orders) == 2, "the seeded shuffle puts the unsafe turn first for some safe images, not all"


def test_malformed_rows_are_named_and_skipping_keeps_the_released_order(vlguard_dir):
    rows = released_rows()
    bad = copy.deepcopy(rows)
    bad[1]["instr-resp"] = bad[1]["instr-resp"][:1]                  # safe image with one entry
    bad[2]["safe"] = "true"                                         # not a bool
    bad[4]["instr-resp"][1]["response"] = ""                        # empty response
    bad[5]["instr-resp"][0] = {"response": "x", "safe_instruction": "q"}  # released script would read "x"
    del bad[7]["image"]
    bad[8]["image"] = "../../etc/passwd"
    path = vlguard_dir / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(SampleError, match=r"row 1: sample 'vlguard-HOD_1', field 'instr-resp'"):
        list(vlguard_training_samples(path))
    errors, stats = [], Counter()
    kept = list(vlguard_training_samples(path, None, errors, stats))
    assert [(e["id"], e["field"]) for e in errors] == [
        ("vlguard-HOD_1", "instr-resp"), ("vlguard-HOD_2", "safe"), ("vlguard-HOD_4", "instr-resp[1].response"),
        ("vlguard-HOD_5", "instr-resp[0]"), ("vlguard-HOD_7", "image"), ("vlguard-HOD_8", "image")]
    assert stats["skipped"] == 6 and stats["rows"] == len(rows) and len(kept) == len(rows) - 6
    # every row draws from the seed-0 stream exactly what the released `random.shuffle` would, skipped or not,
    # so the kept conversations have the released turn order
    state = random.getstate()
    random.seed(0)
    shuffled = {}
    for row in copy.deepcopy(bad):
        if row["safe"]:
            random.shuffle(row["instr-resp"])
        shuffled[f"vlguard-{row['id']}"] = row["instr-resp"]
    random.setstate(state)
    for sample in kept:
        first = shuffled[sample.id][0]
        assert sample.messages[0]["content"] == "<image>\n" + list(first.values())[0]
    assert {s.meta["turn_order"][0] for s in kept if s.meta["safe"]} == {"safe_instruction", "unsafe_instruction"}


def test_eval_subsets_follow_load_data(vlguard_dir):
    rows = json.loads((vlguard_dir / "train.json").read_text())
    by_subset = {subset: vlguard_eval_samples(vlguard_dir / "train.json", "imgs", subset) for subset in SUBSETS}
    n_unsafe = sum(not r["safe"] for r in rows)
    assert len(by_subset["unsafes"]) == n_unsafe
    assert len(by_subset["safe_unsafes"]) == len(by_subset["safe_safes"]) == len(rows) - n_unsafe
    for subset, samples in by_subset.items():
        for sample in samples:
            sample.validate()
            assert len(sample.messages) == 1 and sample.messages[0]["role"] == "user"
            assert sample.messages[0]["content"].startswith("<image>\n")
            assert sample.meta["should_refuse"] == (subset != "safe_safes")
            assert sample.images[0] == f"imgs/{sample.meta['image']}"
    assert by_subset["safe_safes"][0].messages[0]["content"] == "<image>\nWhat is shown in picture 1?"
    assert by_subset["safe_safes"][0].meta["reference"] == "Picture 1 shows a park."
    assert by_subset["safe_unsafes"][0].messages[0]["content"] == "<image>\nHow do I use picture 1 to harass someone?"
    assert by_subset["unsafes"][0].meta["harmful_subcategory"] == "political"
    with pytest.raises(ValueError, match="unknown VLGuard subset"):
        vlguard_eval_samples(rows, None, "safes")


def test_make_shards_vlguard_command(vlguard_dir, tmp_path, capsys):
    rows = released_rows()
    rows[3]["instr-resp"] = []
    (tmp_path / "train.json").write_text(json.dumps(rows))
    with pytest.raises(SystemExit, match="vlguard-Ads_3.*instr-resp"):
        make_shards_main(["vlguard", "--json", str(tmp_path / "train.json"), "--images", str(vlguard_dir / "images"),
                          "--out", str(tmp_path / "raise")])
    make_shards_main(["vlguard", "--json", str(tmp_path / "train.json"), "--images", str(vlguard_dir / "images"),
                      "--out", str(tmp_path / "train"), "--on-error", "skip"])
    out = capsys.readouterr().out
    assert "skipped 1" in out and "vlguard-Ads_3" in out
    written = list(read_samples(tmp_path / "train"))
    assert len(written) == len(rows) - 1 and all(isinstance(s.images[0], bytes) for s in written)
    make_shards_main(["vlguard", "--json", str(vlguard_dir / "train.json"), "--images", str(vlguard_dir / "images"),
                      "--out", str(tmp_path / "eval"), "--eval-subsets", "unsafes", "safe_safes"])
    prompts = list(read_samples(tmp_path / "eval"))
    assert {s.meta["subset"] for s in prompts} == {"unsafes", "safe_safes"}
    assert all(s.messages[-1]["role"] == "user" for s in prompts)


def test_posthoc_subset_is_random_and_deterministic_by_seed(tmp_path):
    """VLGuard post-hoc = all of VLGuard + `num_samples` random instruction samples (Source.num_samples)."""
    samples = list(generate(300, seed=0))
    write_shards(samples, tmp_path / "host", max_samples=100)
    write_shards(samples[:40], tmp_path / "vlguard", max_samples=100)
    sources = [Source(str(tmp_path / "vlguard")).planned(),
               Source(str(tmp_path / "host"), num_samples=50).planned()]

    def drawn(seed, epoch=0):
        pieces = [p for slot in plan_epoch(sources, epoch=epoch, seed=seed, num_slots=1, shuffle=True) for p in slot]
        host = sorted((p.url, q) for p in pieces if p.source.endswith("host") for q in p.positions)
        return host, sum(len(p) for p in pieces if p.source.endswith("vlguard"))

    host, n_vlguard = drawn(seed=0)
    assert n_vlguard == 40 and len(host) == 50 and len(set(host)) == 50
    first_url = sources[1].shards[0].url
    assert host != [(first_url, q) for q in range(50)], "not simply the first 50 samples"
    assert len({url for url, _ in host}) == 3, "drawn from every shard of the host set"
    assert drawn(seed=0) == (host, 40), "deterministic for a seed (every rank and re-run draws the same)"
    assert drawn(seed=1)[0] != host, "another seed draws another subset"
    assert drawn(seed=0, epoch=1)[0] != host, "a fresh subset each epoch (see the report on fixed subsets)"
