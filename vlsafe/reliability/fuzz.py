"""Hypothesis strategies for malformed samples, and the properties the data pipeline must satisfy on them.

The property, for every generated input: it either loads — and then what comes out equals what went in
(a shard round trip changes nothing, and the encoder's image slots match the images) — or it is
rejected with `SampleError` (the one documented error type for unusable samples). Any other exception,
or a loaded sample that differs from its input, is a bug.

Three entry points are checked: `Sample` objects as converters build them (-> `write_shards` ->
`read_samples` -> encoder), raw shard records as a foreign tool might write them (-> reader ->
encoder), and LLaVA JSON records (-> converter -> validation). Requires the `hypothesis` dev dependency.
"""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from PIL import Image

from vlsafe.constants import IMAGE_TOKEN_INDEX
from vlsafe.data.encoding.encoders import ConversationEncoder
from vlsafe.data.encoding.processor import VLMProcessor
from vlsafe.data.schema import Sample, SampleError
from vlsafe.data.shards import iter_shard, read_samples, write_shards

LOADED, REJECTED = "loaded", "rejected"


def _png(size: tuple[int, int], mode: str = "RGB", colour: Any = 100) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD_IMAGES = {(8, 8): _png((8, 8)), (40, 20): _png((40, 20), "RGBA", (1, 2, 3, 0)), (1, 1): _png((1, 1), "P"),
               (30, 30): _png((30, 30), "L"), (1, 400): _png((1, 400), "1", 1), (16, 16): _png((16, 16), "I;16", 30000)}
MASKS = {size: _png(size, "L", 255) for size in GOOD_IMAGES}
TEXT_PIECES = ["<image>", "What", " is it", "?", "\n", " ", "", "é", "\ud800", "</s>", "USER:", "ASSISTANT:", "\x00"]

# ------------------------------------------------------------------------------------------ strategies
json_leaf = (st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
             | st.text(max_size=12))
json_like = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
# values no JSON document holds: bytes, non-string keys, tuples, sets, objects
not_json = (st.binary(max_size=8) | st.dictionaries(st.integers(0, 3), st.text(max_size=3), min_size=1, max_size=2)
            | st.tuples(st.integers(), st.integers()) | st.sets(st.integers(), max_size=2) | st.builds(object))
anything = json_like | not_json
text = st.lists(st.sampled_from(TEXT_PIECES), max_size=6).map("".join)
image_blob = (st.sampled_from(sorted(GOOD_IMAGES.values(), key=len)) | st.binary(max_size=48)
              | st.sampled_from(list(GOOD_IMAGES.values())).flatmap(lambda b: st.integers(0, len(b) - 1).map(lambda n: b[:n])))
coordinate = st.integers(-3, 45) | st.floats(-3, 45) | st.sampled_from([float("nan"), float("inf"), True, "1"])


@st.composite
def valid_samples(draw) -> Sample:
    """A well-formed sample (0-2 images, optional boxes and masks inside the first image)."""
    size = draw(st.sampled_from(sorted(GOOD_IMAGES)))
    n_images = draw(st.integers(0, 2))
    question = "\n".join(["<image>"] * n_images + [draw(st.text(min_size=1, max_size=20)).replace("<image>", "")])
    boxes = masks = None
    if n_images and draw(st.booleans()):
        w, h = size
        boxes = []
        for _ in range(draw(st.integers(0, 2))):  # 0: an empty box list (and mask list) must round-trip too
            x1, y1 = draw(st.integers(0, w)), draw(st.integers(0, h))
            boxes.append([x1, y1, draw(st.integers(x1, w)), draw(st.integers(y1, h))])
        masks = [MASKS[size]] * len(boxes) if draw(st.booleans()) else None
    answer = draw(st.text(min_size=1, max_size=20).filter(lambda t: t.strip() and "<image>" not in t))
    return Sample(id=draw(st.text(min_size=1, max_size=8)), images=[GOOD_IMAGES[size]] * n_images,
                  messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                  boxes=boxes, masks=masks, labels=draw(st.dictionaries(st.text(max_size=4), st.floats(-1, 1), max_size=2)),
                  meta=draw(st.dictionaries(st.text(max_size=4), json_leaf.filter(_finite), max_size=2)),
                  chosen=draw(st.none() | st.just("Yes.")), rejected=draw(st.none() | st.just("No.")))


def _finite(value: Any) -> bool:
    return not (isinstance(value, float) and value != value or value in (float("inf"), float("-inf")))


message = (st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]) | anything,
                                  "content": text | anything})
           | st.dictionaries(st.sampled_from(["role", "content", "from", "value"]), text, max_size=3) | anything)
FIELDS = {
    "id": st.text(max_size=6) | anything,
    "messages": st.lists(message, max_size=4) | anything,
    "images": st.lists(image_blob, max_size=3) | anything,
    "chosen": st.none() | text | anything, "rejected": st.none() | text | anything, "blind": st.none() | text,
    "labels": st.dictionaries(st.text(max_size=4), st.floats() | anything, max_size=2) | anything,
    "boxes": st.none() | st.lists(st.lists(coordinate, max_size=5) | anything, max_size=3) | anything,
    "masks": st.none() | st.lists(st.sampled_from(list(MASKS.values())) | st.binary(max_size=20), max_size=3) | anything,
    "meta": st.dictionaries(st.text(max_size=4), json_like, max_size=3) | anything,
}


@st.composite
def mutated_samples(draw) -> Sample:
    """A valid sample with one to three fields replaced by something random."""
    sample = draw(valid_samples())
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3, unique=True)):
        setattr(sample, name, draw(FIELDS[name]))
    return sample


samples = st.one_of(valid_samples(), mutated_samples(), mutated_samples())


@st.composite
def raw_records(draw) -> dict[str, bytes]:
    """Shard members as another tool might write them: a valid record's members with zero to three
    corruptions (a JSON field replaced, the JSON replaced by random bytes, a member dropped, added or
    replaced by random bytes)."""
    sample = draw(valid_samples())
    data = sample.metadata()
    members = {f"img{i}.png": image for i, image in enumerate(sample.images)}
    members.update({f"mask{i}.png": mask for i, mask in enumerate(sample.masks or [])})
    payload = None
    for change in draw(st.lists(st.sampled_from(["field", "bytes", "drop", "add", "blob"]), max_size=3)):
        if change == "field":
            data[draw(st.sampled_from(sorted(FIELDS) + ["num_images", "num_masks"]))] = draw(json_like)
        elif change == "bytes":
            payload = draw(st.binary(max_size=40))
        elif change == "drop" and members:
            members.pop(draw(st.sampled_from(sorted(members))))
        elif change == "add":
            members[draw(st.sampled_from(["img0.png", "img1.png", "img3.png", "mask0.png", "pickle", "pth"]))] = draw(image_blob)
        elif change == "blob" and members:
            members[draw(st.sampled_from(sorted(members)))] = draw(image_blob)
    members["json"] = payload if payload is not None else json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return members


@st.composite
def llava_records(draw) -> Any:
    """LLaVA JSON records: a valid one with zero to two fields or turns replaced, or anything at all."""
    if draw(st.integers(0, 5)) == 0:
        return draw(anything)
    with_image = draw(st.booleans())
    turns = []
    for i in range(draw(st.integers(1, 2))):
        question = draw(st.text(min_size=1, max_size=12)).replace("<image>", "")
        turns += [{"from": "human", "value": ("<image>\n" if with_image and i == 0 else "") + question},
                  {"from": "gpt", "value": draw(st.text(min_size=1, max_size=12).filter(str.strip)).replace("<image>", "")}]
    record: dict[str, Any] = {"id": draw(st.text(max_size=6)), "conversations": turns}
    if with_image:
        record["image"] = "coco/a.jpg"
    for _ in range(draw(st.integers(0, 2))):
        target = draw(st.sampled_from(["id", "image", "conversations", "turn", "from", "value"]))
        if target in ("turn", "from", "value"):
            turn = turns[draw(st.integers(0, len(turns) - 1))]
            if target == "turn":
                turns[turns.index(turn)] = draw(anything)
            elif isinstance(turn, dict):
                turn[target] = draw(text | anything)
        else:
            record[target] = draw(text | anything)
    return record


# ------------------------------------------------------------------------------------------ properties
def same_sample(a: Sample, b: Sample) -> bool:
    return (a.id, a.messages, [bytes(i) for i in a.images], a.chosen, a.rejected, a.blind, a.labels, a.boxes,
            a.masks, a.meta) == (b.id, b.messages, list(b.images), b.chosen, b.rejected, b.blind, b.labels, b.boxes,
                                 b.masks, b.meta)


def _encoded_consistently(sample: Sample, processor: VLMProcessor) -> str:
    try:
        item = ConversationEncoder(processor).encode(sample)
    except SampleError:
        return REJECTED
    slots = item["input_ids"].count(IMAGE_TOKEN_INDEX)
    assert slots == len(sample.images) * processor.num_image_tokens, "image slots do not match the images"
    assert tuple(item["pixel_values"].shape) == (len(sample.images), 3, processor.image_size, processor.image_size)
    return LOADED


def check_sample(sample: Sample, processor: VLMProcessor) -> str:
    """Sample -> write_shards -> read_samples -> encoder: rejected with SampleError, or loaded unchanged."""
    import copy

    original = copy.deepcopy(sample)
    with tempfile.TemporaryDirectory() as folder:
        try:
            write_shards([sample], folder)
        except SampleError:
            return REJECTED
        (back,) = list(read_samples(folder))
    assert same_sample(original, back), f"silent change:\n{original}\n{back}"
    return _encoded_consistently(back, processor)


def check_raw_record(members: dict[str, bytes], processor: VLMProcessor) -> str:
    """Raw members in a tar -> reader -> encoder: SampleError, or a valid sample that encodes consistently."""
    import webdataset as wds

    with tempfile.TemporaryDirectory() as folder:
        url = str(Path(folder) / "foreign.tar")
        with wds.TarWriter(url, encoder=False) as writer:
            writer.write({"__key__": "000000000", **members})
        try:
            ((_, sample),) = list(iter_shard(url))
        except SampleError:
            return REJECTED
    sample.validate()
    assert [bytes(b) for b in sample.images] == [members[f"img{i}.png"] for i in range(len(sample.images))]
    assert json.loads(members["json"]).get("messages") == sample.messages
    return _encoded_consistently(sample, processor)


def check_llava_record(record: Any) -> str:
    """LLaVA JSON record -> converter -> validation: SampleError, or a valid sample."""
    from vlsafe.data.sources.llava import llava_record_to_sample

    try:
        llava_record_to_sample(record, "/images").validate()
    except SampleError:
        return REJECTED
    return LOADED
