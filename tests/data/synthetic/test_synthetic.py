"""The shapes world: determinism, pixels agree with labels, every kind's answers follow from the scene."""
from __future__ import annotations

import io
import math
import random
import string
from collections import Counter

import pytest
from PIL import Image

from vlsafe.constants import IMAGE_PLACEHOLDER
from vlsafe.data.shards import read_samples
from vlsafe.data.synthetic.world import (
    ANSWER_SUFFIX,
    CAPTION_PROMPT,
    CHAT_STRINGS,
    HARMFUL_VERBS,
    HAZARD_REFUSAL,
    KINDS,
    NUMBER_WORDS,
    PALETTE,
    REQUEST_REFUSAL,
    SHAPE_CORNERS,
    Scene,
    WorldConfig,
    box_to_text,
    corpus,
    describe,
    generate,
    make_sample,
    parse_box_text,
    random_scene,
    write_world,
)


def by_kind(kind: str, n: int, seed: int = 0, cfg: WorldConfig = WorldConfig()):
    return list(generate(n, seed=seed, kinds=(kind,), cfg=cfg))


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def scene_of(sample) -> Scene:
    return Scene.from_meta(sample.meta["scene"])


def centre(box) -> tuple[int, int]:
    return (box[0] + box[2]) // 2, (box[1] + box[3]) // 2


def words(text: str) -> set[str]:
    return {w.strip(string.punctuation) for w in text.split()} - {""}


@pytest.fixture(scope="module")
def mixed():
    return list(generate(700, seed=11, kinds=KINDS))


# ------------------------------------------------------------------------------------ determinism
def test_same_arguments_give_identical_samples():
    a = list(generate(30, seed=4, kinds=KINDS))
    b = list(generate(30, seed=4, kinds=KINDS))
    assert [s.id for s in a] == [s.id for s in b]
    for x, y in zip(a, b):
        assert (x.messages, x.images, x.chosen, x.rejected, x.blind, x.labels, x.boxes, x.masks, x.meta) == \
               (y.messages, y.images, y.chosen, y.rejected, y.blind, y.labels, y.boxes, y.masks, y.meta)
    assert a[0].id == "synthetic-train-4-0000000" and a[-1].id == "synthetic-train-4-0000029"


def test_different_seed_or_split_gives_different_scenes():
    a = [s.meta["scene"] for s in generate(20, seed=0)]
    b = [s.meta["scene"] for s in generate(20, seed=1)]
    c = [s.meta["scene"] for s in generate(20, seed=0, split="val")]
    assert sum(x != y for x, y in zip(a, b)) >= 18
    assert sum(x != y for x, y in zip(a, c)) >= 18


def test_sample_does_not_depend_on_how_many_are_generated():
    short = list(generate(5, seed=2, kinds=KINDS))
    long = list(generate(50, seed=2, kinds=KINDS))
    for x, y in zip(short, long[:5]):
        assert (x.id, x.messages, x.images, x.chosen, x.meta) == (y.id, y.messages, y.images, y.chosen, y.meta)
    tail = list(generate(3, seed=2, kinds=KINDS, start=47))
    assert [s.images for s in tail] == [s.images for s in long[47:]]


def test_make_sample_is_a_function_of_the_rng_state():
    x = make_sample("grounding", random.Random("k"), 3, WorldConfig(), "val", 9)
    y = make_sample("grounding", random.Random("k"), 3, WorldConfig(), "val", 9)
    assert x.id == "synthetic-val-9-0000003" and (x.messages, x.images, x.masks) == (y.messages, y.images, y.masks)


# ------------------------------------------------------------------------------------ rendering
def test_scene_objects_do_not_overlap_and_stay_inside():
    cfg = WorldConfig()
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng, cfg, hazard=rng.random() < 0.5)
        boxes = [o.box for o in scene.objects] + ([scene.hazard] if scene.hazard else [])
        assert cfg.min_objects <= len(scene.objects) <= cfg.max_objects
        for i, a in enumerate(boxes):
            assert 0 <= a[0] < a[2] <= cfg.image_size and 0 <= a[1] < a[3] <= cfg.image_size
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
        centres = [o.center_x for o in scene.objects]
        assert centres == sorted(centres)  # objects are stored left to right


def test_qa_colour_answer_is_the_pixel_colour():
    samples = [s for s in by_kind("qa", 300, seed=5) if s.meta["task"] == "color"]
    assert len(samples) > 40
    for s in samples:
        shape = s.messages[0]["content"].split("What color is the ")[1].split("?")[0]
        matches = [o for o in scene_of(s).objects if o.shape == shape]
        assert len(matches) == 1  # only asked when the shape is unique
        image = decode(s.images[0]).convert("RGB")
        assert image.size == (64, 64)
        assert image.getpixel(centre(matches[0].box)) == PALETTE[s.messages[1]["content"]]
        assert s.messages[1]["content"] == s.meta["answer"] and s.meta["answer"] in s.meta["candidates"]


def test_every_object_centre_has_its_colour_and_hazard_is_black_and_white(mixed):
    for s in mixed:
        if not s.images:
            continue
        image = decode(s.images[0]).convert("RGB")
        scene = scene_of(s)
        assert image.getpixel((0, 0)) == tuple(scene.background)
        for o in scene.objects:
            assert image.getpixel(centre(o.box)) == PALETTE[o.color]
        colours = {rgb for _, rgb in image.getcolors(4096)}
        if scene.hazard is None:
            assert (0, 0, 0) not in colours
        else:
            x1, y1, x2, y2 = scene.hazard
            assert image.getpixel((x1, y1)) == (0, 0, 0) and image.getpixel((x2 - 1, y2 - 1)) == (0, 0, 0)
            assert image.getpixel(centre(scene.hazard)) == (255, 255, 255)  # the X crosses at the centre
            assert image.getpixel((x2, y2)) == tuple(scene.background)  # exclusive x2, y2


AREA = {"circle": (math.pi / 4 - 0.06, math.pi / 4 + 0.06), "triangle": (0.44, 0.60), "square": (0.98, 1.0)}


def test_masks_match_boxes_areas_and_pixels():
    samples = by_kind("grounding", 150, seed=6)
    seen = Counter()
    for s in samples:
        target = s.meta["target"]
        scene = scene_of(s)
        obj = scene.objects[target]
        assert s.boxes == [list(obj.box)]
        mask = decode(s.masks[0])
        assert mask.mode == "L" and mask.size == (64, 64)
        assert set(mask.getdata()) <= {0, 255}
        bbox = mask.getbbox()
        assert all(abs(a - b) <= 1 for a, b in zip(bbox, obj.box)), (bbox, obj.box)
        x1, y1, x2, y2 = obj.box
        area = sum(v > 0 for v in mask.getdata()) / ((x2 - x1) * (y2 - y1))
        lo, hi = AREA[obj.shape]
        assert lo <= area <= hi, (obj.shape, area)
        seen[obj.shape] += 1
        # the rendered image has the object colour exactly where the mask is on (inside its box)
        image = decode(s.images[0]).convert("RGB")
        for y in range(y1, y2):
            for x in range(x1, x2):
                inside = mask.getpixel((x, y)) > 0
                assert (image.getpixel((x, y)) == PALETTE[obj.color]) == inside
    assert set(seen) == set(AREA)


# ------------------------------------------------------------------------------------ kinds
def test_every_sample_validates_and_has_the_common_structure(mixed):
    assert set(s.meta["kind"] for s in mixed) == set(KINDS)
    for s in mixed:
        s.validate()
        meta = s.meta
        assert meta["source"] == "synthetic" and meta["split"] == "train" and meta["task"]
        assert meta["polarity"] == ("negative" if meta["kind"] == "negative" else "positive")
        first = s.messages[0]
        assert first["role"] == "user"
        if meta["kind"] == "harm_text":
            assert s.images == [] and "scene" not in meta and IMAGE_PLACEHOLDER not in first["content"]
        else:
            assert first["content"].startswith(IMAGE_PLACEHOLDER + "\n") and len(s.images) == 1
            assert sum(m["content"].count(IMAGE_PLACEHOLDER) for m in s.messages) == 1
            assert meta["scene"]["objects"]
        if meta["kind"] in ("preference", "harm_text"):
            assert s.messages[-1]["role"] == "user" and len(s.messages) == 1
            assert s.chosen and s.rejected and s.chosen != s.rejected
        else:
            assert [m["role"] for m in s.messages] == ["user", "assistant"]
            assert s.messages[1]["content"] == meta["answer"]
        if meta["kind"] not in ("safety", "preference") and "scene" in meta:
            assert meta["scene"]["hazard"] is None  # hazards only where the answer is a refusal


def test_qa_answers_follow_from_the_scene():
    samples = by_kind("qa", 600, seed=7)
    tasks = Counter(s.meta["task"] for s in samples)
    assert set(tasks) == {"color", "shape", "count", "exists"}
    exists_yes = []
    for s in samples:
        question, answer, scene = s.messages[0]["content"], s.meta["answer"], scene_of(s)
        assert question.endswith(ANSWER_SUFFIX) and answer in s.meta["candidates"]
        combos = [(o.color, o.shape) for o in scene.objects]
        if s.meta["task"] == "count":
            assert answer == NUMBER_WORDS[len(scene.objects)] and s.meta["candidates"] == ["one", "two", "three"]
        elif s.meta["task"] == "shape":
            colour = question.split("What shape is the ")[1].split(" object?")[0]
            assert [sh for c, sh in combos if c == colour] == [answer]
        elif s.meta["task"] == "exists":
            colour, shape = question.split("Is there a ")[1].split("?")[0].split()
            assert answer == ("yes" if (colour, shape) in combos else "no")
            exists_yes.append(answer == "yes")
    assert 0.4 <= sum(exists_yes) / len(exists_yes) <= 0.6


def test_caption_lists_objects_left_to_right():
    for s in by_kind("caption", 100, seed=8):
        scene = scene_of(s)
        caption = s.messages[1]["content"]
        assert s.messages[0]["content"] == IMAGE_PLACEHOLDER + "\n" + CAPTION_PROMPT
        assert caption == describe(scene)
        items = caption[:-1].replace(" and ", ", ").split(", ")
        assert [item.split(" ", 1)[1] for item in items] == [f"{o.color} {o.shape}" for o in scene.objects]
        xs = [o.center_x for o in scene.objects]
        assert xs == sorted(xs)
        assert caption.startswith("A ") and caption.endswith(".") and "hazard" not in caption
    with_hazard = Scene.from_meta({"objects": [{"shape": "square", "color": "red", "box": [30, 2, 44, 16]},
                                               {"shape": "circle", "color": "blue", "box": [2, 2, 16, 16]}],
                                   "hazard": [2, 30, 20, 48], "background": [235, 235, 235], "size": 64})
    assert describe(with_hazard) == "A red square, a blue circle and a hazard sign."


def test_negatives_have_false_premises():
    samples = by_kind("negative", 300, seed=9)
    assert set(Counter(s.meta["task"] for s in samples)) == {"nonexistent", "wrong_attribute", "knowledge"}
    for s in samples:
        scene, premise, answer = scene_of(s), s.meta["premise"], s.meta["answer"]
        combos = [(o.color, o.shape) for o in scene.objects]
        if s.meta["task"] == "nonexistent":
            assert (premise["color"], premise["shape"]) not in combos
            assert answer == f"There is no {premise['color']} {premise['shape']} in the image."
            assert f"the {premise['color']} {premise['shape']}" in s.messages[0]["content"]
        elif s.meta["task"] == "wrong_attribute":
            colours = [c for c, sh in combos if sh == premise["shape"]]
            assert colours == [premise["color"]] and premise["wrong_color"] != premise["color"]
            assert s.messages[0]["content"].endswith(f"Why is the {premise['shape']} {premise['wrong_color']}?")
        else:
            assert (premise["color"], premise["shape"]) in combos
            assert premise["corners"] == NUMBER_WORDS[SHAPE_CORNERS[premise["shape"]]]
            assert premise["wrong_corners"] != premise["corners"]
            assert f"has {premise['wrong_corners']} corners" in s.messages[0]["content"]
            assert answer.endswith(f"has {premise['corners']} corners, not {premise['wrong_corners']}.")


def test_safety_refusal_depends_only_on_image_or_request():
    samples = by_kind("safety", 400, seed=10)
    subsets = Counter(s.meta["subset"] for s in samples)
    assert set(subsets) == {"unsafes", "safe_unsafes", "safe_safes"}
    assert all(0.2 <= v / len(samples) <= 0.45 for v in subsets.values()), subsets
    unsafe_questions, safe_questions = set(), set()
    for s in samples:
        hazard = s.meta["scene"]["hazard"] is not None
        answer = s.messages[1]["content"]
        question = s.messages[0]["content"]
        assert hazard == (s.meta["subset"] == "unsafes") == (answer == HAZARD_REFUSAL) == (not s.meta["safe"])
        if s.meta["subset"] == "safe_unsafes":
            assert answer == REQUEST_REFUSAL and s.labels == {"image_safe": 1.0, "request_safe": 0.0}
        elif s.meta["subset"] == "safe_safes":
            assert answer == s.meta["compliant_answer"] and "sorry" not in answer
            safe_questions.add(question)
        else:
            unsafe_questions.add(question)
            assert s.meta["compliant_answer"] != HAZARD_REFUSAL
    # the unsafes' instructions are ordinary ones: the same texts appear with safe images
    assert len(unsafe_questions & safe_questions) >= 5


def test_preference_pairs():
    samples = by_kind("preference", 300, seed=12)
    types = Counter(s.meta["type"] for s in samples)
    assert set(types) == {"helpful", "harmless"}
    # the question alone must not reveal the pair type: both types use the same instruction distribution
    tasks = {t: Counter(s.meta["task"] for s in samples if s.meta["type"] == t) for t in types}
    assert set(tasks["helpful"]) == set(tasks["harmless"]) == {"color", "shape", "count", "exists", "caption"}
    for s in samples:
        assert s.blind and s.blind != s.chosen and s.rejected != s.chosen
        assert s.chosen == s.meta["answer"]
        hazard = s.meta["scene"]["hazard"] is not None
        if s.meta["type"] == "harmless":
            assert hazard and s.chosen == HAZARD_REFUSAL
            assert s.rejected == s.meta["compliant_answer"] and "sorry" not in s.blind.lower()
        elif s.meta["task"] == "caption":
            assert not hazard and s.chosen == describe(scene_of(s)) and s.rejected.endswith(".")
            assert len(s.rejected.split()) == len(s.chosen.split())  # one colour swapped
        else:
            assert not hazard and s.chosen in s.meta["candidates"] and s.rejected in s.meta["candidates"]
            assert s.blind in s.meta["candidates"]
            if s.meta["task"] == "color":
                shape = s.messages[0]["content"].split("What color is the ")[1].split("?")[0]
                assert s.chosen == next(o.color for o in scene_of(s).objects if o.shape == shape)
                # the blind guess is a fixed prior ("red"), or the next colour when "red" is right
                assert s.blind == ("red" if s.chosen != "red" else "green")


def test_harm_text_labels_match_responses():
    samples = by_kind("harm_text", 300, seed=13)
    assert set(Counter(s.meta["task"] for s in samples)) == {"refusal_vs_compliance", "both_safe", "both_unsafe"}

    def is_harmful(text: str) -> bool:  # the world's promise: harmful verbs appear in unsafe answers only
        return bool(words(text.lower()) & set(HARMFUL_VERBS))

    for s in samples:
        assert s.images == [] and s.blind is None
        for response, key in ((s.chosen, "chosen_safe"), (s.rejected, "rejected_safe")):
            refusal = response.startswith(REQUEST_REFUSAL)
            assert is_harmful(response) == (s.labels[key] == 0.0), response
            if refusal:
                assert s.labels[key] == 1.0
        if s.meta["task"] == "refusal_vs_compliance":
            assert s.chosen.startswith(REQUEST_REFUSAL) and s.labels == {"chosen_safe": 1.0, "rejected_safe": 0.0}
        elif s.meta["task"] == "both_unsafe":
            assert s.labels == {"chosen_safe": 0.0, "rejected_safe": 0.0} and len(s.chosen) < len(s.rejected)
        else:
            assert s.labels == {"chosen_safe": 1.0, "rejected_safe": 1.0} and not s.meta["harmful"]
        assert s.meta["harmful"] == (s.meta["task"] != "both_safe")


def test_grounding_expression_is_unique_and_coordinates_are_normalised():
    samples = by_kind("grounding", 200, seed=14)
    assert set(Counter(s.meta["task"] for s in samples)) == {"simple", "relational"}
    for s in samples:
        scene, target, expression = scene_of(s), s.meta["target"], s.meta["expression"]
        assert s.messages[0]["content"] == f"{IMAGE_PLACEHOLDER}\nWhere is {expression}?"
        if s.meta["task"] == "simple":
            _, colour, shape = expression.split()
            assert [i for i, o in enumerate(scene.objects) if (o.color, o.shape) == (colour, shape)] == [target]
        else:  # "the {shape} left of the {color} {shape}"
            parts = expression.split()
            shape, anchor = parts[1], (parts[5], parts[6])
            anchors = [o for o in scene.objects if (o.color, o.shape) == anchor]
            assert len(anchors) == 1
            left = [i for i, o in enumerate(scene.objects)
                    if o.shape == shape and o is not anchors[0] and o.box[2] <= anchors[0].box[0]]
            assert left == [target]
        parsed = parse_box_text(s.messages[1]["content"])
        assert parsed is not None and all(0 <= v <= 1 for v in parsed)
        assert all(abs(p * 64 - b) <= 0.33 for p, b in zip(parsed, s.boxes[0]))
    assert box_to_text([0, 8, 32, 64], 64) == "[0.00, 0.12, 0.50, 1.00]"


# ------------------------------------------------------------------------------------ shards, corpus, config
def test_write_world_round_trip(tmp_path):
    index = write_world(tmp_path / "world", 40, seed=3, kinds=KINDS, max_samples_per_shard=16)
    assert index.total == 40 and len(index.shards) == 3
    expected = list(generate(40, seed=3, kinds=KINDS))
    got = list(read_samples(tmp_path / "world"))
    assert [s.id for s in got] == [s.id for s in expected]
    for x, y in zip(got, expected):
        assert (x.messages, x.images, x.chosen, x.rejected, x.blind, x.labels, x.boxes, x.meta) == \
               (y.messages, y.images, y.chosen, y.rejected, y.blind, y.labels, y.boxes, y.meta)
        assert (x.masks or None) == (y.masks or None)
    # byte-identical shards when written again
    write_world(tmp_path / "again", 40, seed=3, kinds=KINDS, max_samples_per_shard=16)
    for shard in index.shards:
        name = shard.url.split("/")[-1]
        assert (tmp_path / "world" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_corpus_covers_every_generated_word(mixed):
    texts = corpus()
    assert texts == corpus() and len(texts) == len(set(texts))
    for needed in (*CHAT_STRINGS, HAZARD_REFUSAL, REQUEST_REFUSAL):
        assert needed in texts
    vocabulary = set().union(*map(words, texts))
    emitted = set()
    for s in mixed[:500]:
        for text in [m["content"] for m in s.messages] + [s.chosen or "", s.rejected or "", s.blind or ""]:
            emitted |= words(text)
    assert emitted - vocabulary == set()
    assert {"0.00", "0.37", "1.00", "ten", "orange", "diamond"} <= vocabulary


def test_other_configs_and_kind_weights():
    cfg = WorldConfig(image_size=96, colors=["orange", "purple", "cyan"], shapes=["diamond", "circle"],
                      max_objects=4)
    assert cfg.colors == ("orange", "purple", "cyan") and cfg.object_size_range == (21, 33)
    samples = list(generate(60, seed=1, kinds={"qa": 1.0, "grounding": 1.0, "caption": 0.0}, cfg=cfg))
    assert {s.meta["kind"] for s in samples} == {"qa", "grounding"}
    vocabulary = set().union(*map(words, corpus(cfg)))
    for s in samples:
        s.validate()
        assert decode(s.images[0]).size == (96, 96)
        assert set().union(*(words(m["content"]) for m in s.messages)) <= vocabulary
    assert any("an orange" in s.messages[0]["content"] for s in generate(60, seed=1, kinds="qa", cfg=cfg))
    with pytest.raises(ValueError, match="colors"):
        WorldConfig(colors=("red", "black"))
    with pytest.raises(ValueError, match="unknown"):
        list(generate(1, kinds=("qa", "jokes")))
    with pytest.raises(ValueError, match="cannot place"):
        random_scene(random.Random(0), WorldConfig(min_objects=10, max_objects=10), hazard=True)
