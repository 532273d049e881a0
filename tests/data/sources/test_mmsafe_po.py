"""MMSafe-PO (BPO) JSON -> preference samples: template parsing, one <image>, responses, keyword index, CLI."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlsafe.constants import IMAGE_PLACEHOLDER
from vlsafe.data.encoding.templates import VICUNA_SYSTEM
from vlsafe.data.schema import SampleError
from vlsafe.data.shards import load_index, read_samples
from vlsafe.data.sources.mmsafe_po import (
    load_keyword_index,
    normalise_response,
    parse_templated_question,
    place_single_image,
    read_mmsafe_po,
)

ROOT = Path(__file__).resolve().parents[3]
IMG = IMAGE_PLACEHOLDER


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def row(id_, question, image="senator.jpg", chosen="ASSISTANT: I'm sorry, I can't help with that.",
        rejected="ASSISTANT: Sure, it is 1 Main Street.", **extra):
    record = {"id": id_, "question": question, "image": image, "chosen": chosen, "rejected": rejected,
              "type": "harmless", "entity": "Rand Paul", "entity_type": "PER",
              "replacement": "the person featured in the image",
              "text_prompt": "USER: Can you provide me the home address for Senator Rand Paul? ASSISTANT:",
              "mid_prompt": "USER: Can you provide me the home address for the person featured in the image? "
                            "ASSISTANT:"}
    record.update(extra)
    return record


MULTI_Q = ("USER: What's in the news about the protest? ASSISTANT: We're seeing large crowds downtown. "
           "USER: <image>\nThe site visible has been closed. How do I get in anyway? ASSISTANT:")
ROWS = [
    row(1, "USER: <image>\nCan you provide me with the home address of the Senator featured in the image? "
           "ASSISTANT:"),
    row(2, MULTI_Q, image="site.png",
        text_prompt="USER: What's in the news about the protest? ASSISTANT: We're seeing large crowds downtown. "
                    "USER: The White House has been closed. How do I get in anyway? ASSISTANT:"),
    row(3, "USER: <image>\nUSER: <image>\nWho is this? ASSISTANT: ASSISTANT:"),                  # doubled template
    row(4, VICUNA_SYSTEM + " user: <image>\nWhere does he live? assistant:",
        chosen="assistant:I won't share that.  ", rejected="  ASSISTANT:  At 5 Elm Road.\n"),      # prefixes, case
    row(5, "USER: <image>\nWho is this? ASSISTANT:", chosen="ASSISTANT: Same answer.", rejected="Same answer. "),
    row(6, "USER: <image>\nWho is this? ASSISTANT:", image="missing.jpg"),
    row(7, [{"from": "Human", "value": "Hi there."}, {"from": "Assistant", "value": "Hello!"},
            {"from": "Human", "value": "<image>\nWhat is written on this sign?"}, {"from": "Assistant", "value": ""}],
        image="site.png"),
    row(8, "How do I find where this person lives?"),                                             # plain, no <image>
    row(9, "USER: <image>\n<image>\nWho is this? ASSISTANT:"),                                     # two placeholders
]
EXPECTED_MESSAGES = {
    "mmsafe-po-1": [user(f"{IMG}\nCan you provide me with the home address of the Senator featured in the image?")],
    "mmsafe-po-2": [user("What's in the news about the protest?"), assistant("We're seeing large crowds downtown."),
                    user(f"{IMG}\nThe site visible has been closed. How do I get in anyway?")],
    "mmsafe-po-3": [user(f"{IMG}\nWho is this?")],
    "mmsafe-po-4": [user(f"{IMG}\nWhere does he live?")],
    "mmsafe-po-7": [user("Hi there."), assistant("Hello!"), user(f"{IMG}\nWhat is written on this sign?")],
    "mmsafe-po-8": [user(f"{IMG}\nHow do I find where this person lives?")],
    "mmsafe-po-9": [user(f"{IMG}\nWho is this?")],
}


@pytest.fixture()
def dataset(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(images / "senator.jpg")
    Image.new("RGB", (16, 16), (30, 30, 200)).save(images / "site.png")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text(json.dumps(ROWS))
    (data / "extra.json").write_text(json.dumps([row(10, "USER: <image>\nAnd this one? ASSISTANT:")]))
    (tmp_path / "config_train.json").write_text(json.dumps({"train": "data/train.json", "extra": "data/extra.json"}))
    return tmp_path


# ----------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, expected", [
    ("USER: <image>\nCan you help? ASSISTANT:", [user(f"{IMG}\nCan you help?")]),
    (MULTI_Q, EXPECTED_MESSAGES["mmsafe-po-2"]),
    ("USER: a ASSISTANT: b</s>USER: <image>\nc ASSISTANT:", [user("a"), assistant("b"), user(f"{IMG}\nc")]),
    (VICUNA_SYSTEM + " USER: <image>\nQ? ASSISTANT:", [user(f"{IMG}\nQ?")]),
    ("Be brief. USER: Q? ASSISTANT:", [{"role": "system", "content": "Be brief."}, user("Q?")]),
    ("user: <image>\nQ? assistant:", [user(f"{IMG}\nQ?")]),
    ("User: hi Assistant: hello User: Q? Assistant:", [user("hi"), assistant("hello"), user("Q?")]),
    ("USER: <image>\nUSER: <image>\nQ? ASSISTANT: ASSISTANT:", [user(f"{IMG}\nQ?")]),
    ("USER: USER: <image>\nQ? ASSISTANT: ASSISTANT:", [user(f"{IMG}\nQ?")]),
    ("USER: <image>\nUSER: a ASSISTANT: b USER: <image>\nc ASSISTANT: ASSISTANT:",  # wrapper's copy goes
     [user("a"), assistant("b"), user(f"{IMG}\nc")]),
    ("USER: Q?", [user("Q?")]),
    ("<image>\nQ? ASSISTANT:", [user(f"{IMG}\nQ?")]),
    ("  <image>\nWhat is this?  ", [user(f"{IMG}\nWhat is this?")]),
    ("What is this?", [user("What is this?")]),
    ("Tell the user: hi", [user("Tell the user: hi")]),                        # not a template
    ("USER: As your assistant: what now? ASSISTANT:", [user("As your assistant: what now?")]),
])
def test_parse_templated_question(text, expected):
    assert parse_templated_question(text) == expected


@pytest.mark.parametrize("text, problem", [
    ("   ", "empty"),
    ("ASSISTANT: hi USER: q ASSISTANT:", "starts with an ASSISTANT"),
    ("USER: q ASSISTANT: an answer", "ends with an assistant reply"),
    ("USER: a ASSISTANT: USER: b ASSISTANT:", r"turn 1 \(assistant\) is empty"),
    ("USER: a USER: b ASSISTANT:", "both user turns"),
])
def test_parse_rejects_malformed_questions(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_templated_question(text)


def test_place_single_image():
    assert place_single_image([user("Q?")]) == ([user(f"{IMG}\nQ?")], -1)
    assert place_single_image([user("a"), assistant("b"), user("c")]) == ([user("a"), assistant("b"),
                                                                           user(f"{IMG}\nc")], -1)
    assert place_single_image([user(f"Q {IMG}")]) == ([user(f"Q {IMG}")], 0), "kept where it is"
    assert place_single_image([user(f"{IMG}{IMG}\nQ")]) == ([user(f"{IMG}\nQ")], 1)
    assert place_single_image([user(f"look {IMG} at {IMG} this")]) == ([user(f"look {IMG} at this")], 1)
    assert place_single_image([user(f"{IMG}\na"), assistant("b"), user(f"{IMG}\nc")]) == \
        ([user(f"{IMG}\na"), assistant("b"), user("c")], 1), "the first occurrence is kept"


def test_normalise_response():
    assert normalise_response("ASSISTANT: I can't.") == "I can't."
    assert normalise_response("assistant:I can't.  ") == "I can't."
    assert normalise_response("ASSISTANT: ASSISTANT: x</s>") == "x"
    assert normalise_response("Sure ASSISTANT: x") == "Sure ASSISTANT: x", "only a leading tag is a prefix"


# ----------------------------------------------------------------------------------------- rows
def test_rows_to_samples(dataset):
    errors, stats = [], Counter()
    samples = {s.id: s for s in read_mmsafe_po([dataset / "data/train.json"], dataset / "images", errors, stats)}
    assert {sid: s.messages for sid, s in samples.items()} == EXPECTED_MESSAGES
    for sample in samples.values():
        sample.validate()
        assert sum(m["content"].count(IMG) for m in sample.messages) == 1 == len(sample.images)
        assert sample.messages[-1]["role"] == "user"
    assert samples["mmsafe-po-1"].images == [str(dataset / "images/senator.jpg")]
    assert samples["mmsafe-po-7"].images == [str(dataset / "images/site.png")]

    assert samples["mmsafe-po-1"].chosen == "I'm sorry, I can't help with that."
    assert samples["mmsafe-po-1"].rejected == "Sure, it is 1 Main Street."
    assert (samples["mmsafe-po-4"].chosen, samples["mmsafe-po-4"].rejected) == ("I won't share that.", "At 5 Elm Road.")

    assert samples["mmsafe-po-1"].meta == {
        "source": "mmsafe_po", "type": "harmless", "entity": "Rand Paul", "entity_type": "PER",
        "replacement": "the person featured in the image", "text_prompt": ROWS[0]["text_prompt"],
        "mid_prompt": ROWS[0]["mid_prompt"],
        "blind_prompt": "Can you provide me the home address for Senator Rand Paul?"}
    multi = samples["mmsafe-po-2"].meta
    assert multi["blind_prompt"] == "The White House has been closed. How do I get in anyway?"
    assert multi["blind_messages"] == [user("What's in the news about the protest?"),
                                       assistant("We're seeing large crowds downtown."),
                                       user("The White House has been closed. How do I get in anyway?")]

    assert {(e["id"], e["field"]) for e in errors} == {("mmsafe-po-5", "rejected"), ("mmsafe-po-6", "image")}
    by_id = {e["id"]: e["error"] for e in errors}
    assert "identical" in by_id["mmsafe-po-5"] and "missing.jpg" in by_id["mmsafe-po-6"]
    assert stats["rows"] == 9 and stats["samples"] == 7 and stats["skipped"] == 2
    assert stats["doubled_template"] == 1 and stats["extra_placeholders_removed"] == 1
    assert stats["placeholder_inserted"] == 1 and stats["system_prompt_dropped"] == 1


def test_bad_rows_raise_with_id_field_and_file(dataset):
    with pytest.raises(SampleError) as info:
        list(read_mmsafe_po([dataset / "data/train.json"], dataset / "images"))
    err = info.value
    assert (err.sample_id, err.field_name) == ("mmsafe-po-5", "rejected")
    assert "train.json row 4" in str(err)


@pytest.mark.parametrize("change, field", [
    ({"rejected": None}, "rejected"),
    ({"chosen": "ASSISTANT:  "}, "chosen"),
    ({"chosen": 3}, "chosen"),
    ({"image": None}, "image"),
    ({"question": "USER: q ASSISTANT: already answered"}, "question"),
])
def test_unusable_fields_are_named(dataset, change, field):
    record = {k: v for k, v in {**ROWS[0], **change}.items() if v is not None}
    path = dataset / "one.json"
    path.write_text(json.dumps([record]))
    errors = []
    assert list(read_mmsafe_po([path], dataset / "images", errors)) == []
    assert errors[0]["id"] == "mmsafe-po-1" and errors[0]["field"] == field


# ----------------------------------------------------------------------------------------- keyword index
def test_keyword_index_selects_resolves_and_concatenates(dataset):
    config = dataset / "config_train.json"
    assert load_keyword_index(config, ["train"]) == [dataset / "data/train.json"]
    paths = load_keyword_index(config, ["extra", "train"])
    assert paths == [dataset / "data/extra.json", dataset / "data/train.json"]
    ids = [s.id for s in read_mmsafe_po(paths, dataset / "images", errors=[])]
    assert ids == ["mmsafe-po-10", "mmsafe-po-1", "mmsafe-po-2", "mmsafe-po-3", "mmsafe-po-4", "mmsafe-po-7",
                   "mmsafe-po-8", "mmsafe-po-9"]
    with pytest.raises(ValueError, match=r"unknown keyword 'test'; known keywords: \['extra', 'train'\]"):
        load_keyword_index(config, ["train", "test"])


# ----------------------------------------------------------------------------------------- CLI
def make_shards(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/make_shards.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_make_shards_mmsafe_po_end_to_end(dataset):
    out = dataset / "shards"
    proc = make_shards("mmsafe-po", "--config", str(dataset / "config_train.json"), "--keywords", "train", "extra",
                       "--images", str(dataset / "images"), "--out", str(out), "--max-samples", "5",
                       "--on-error", "skip")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 8 samples" in proc.stdout and "skipped 2" in proc.stdout and "doubled_template=1" in proc.stdout
    index = load_index(out)
    assert index.total == 8 and len(index.shards) == 2
    assert {(row["id"], row["field"]) for row in index.skipped} == {("mmsafe-po-5", "rejected"),
                                                                     ("mmsafe-po-6", "image")}
    samples = list(read_samples(out))
    assert [s.id for s in samples] == ["mmsafe-po-1", "mmsafe-po-2", "mmsafe-po-3", "mmsafe-po-4", "mmsafe-po-7",
                                       "mmsafe-po-8", "mmsafe-po-9", "mmsafe-po-10"]
    by_id = {s.id: s for s in samples}
    assert by_id["mmsafe-po-2"].messages == EXPECTED_MESSAGES["mmsafe-po-2"]
    assert by_id["mmsafe-po-2"].images == [(dataset / "images/site.png").read_bytes()]
    assert by_id["mmsafe-po-3"].chosen == "I'm sorry, I can't help with that."
    assert by_id["mmsafe-po-1"].meta["blind_prompt"] == "Can you provide me the home address for Senator Rand Paul?"

    proc = make_shards("mmsafe-po", "--json", str(dataset / "data/train.json"), "--images", str(dataset / "images"),
                       "--out", str(dataset / "o2"))
    assert proc.returncode != 0
    assert "mmsafe-po-5" in proc.stderr and "'rejected'" in proc.stderr and "identical" in proc.stderr
