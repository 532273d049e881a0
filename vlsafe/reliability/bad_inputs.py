"""A catalogue of malformed inputs, each pushed through the real data pipeline with its expected outcome.

Every case builds its input in a scratch folder and runs it the way a user's data would go: a converter
(LLaVA JSON) or a `Sample` -> `write_shards` -> `read_samples` / `ShardStream` -> the processor. The
expected outcome is either *loads* (and, where it matters, the decoded result is checked, e.g. a
16-bit PNG must not turn white) or *rejected* with `SampleError` naming the sample and field, or with
a file-level error naming the file. `tests/reliability` asserts every case; `tools/reliability_report.py`
prints them as the README's table.
"""
from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from vlsafe.data.encoding.encoders import ConversationEncoder
from vlsafe.data.encoding.processor import VLMProcessor, image_bytes
from vlsafe.data.images import decode_image
from vlsafe.data.schema import Sample, SampleError
from vlsafe.data.shards import load_index, read_samples, write_shards
from vlsafe.methods.preference.encoding import PreferenceEncoder

LOADS, REJECTED = "loads", "rejected"


class WrongResult(AssertionError):
    """The input loaded, but not to what it should have decoded to (a silent wrong result)."""


@dataclass
class Outcome:
    kind: str  # LOADS | REJECTED | "crashed" | "wrong"
    detail: str
    error: BaseException | None = None


@dataclass
class Case:
    area: str
    name: str
    expect: str
    must_mention: tuple[str, ...]  # substrings the error (or load detail) must contain
    build: Callable[["Bench"], str]  # returns a detail string when it loads; raises when rejected

    def run(self, bench: "Bench") -> Outcome:
        try:
            detail = self.build(bench)
        except WrongResult as err:
            return Outcome("wrong", str(err), err)
        except (SampleError, ValueError, OSError) as err:
            return Outcome(REJECTED, f"{type(err).__name__}: {err}", err)
        except Exception as err:  # anything else is a crash of the wrong kind
            return Outcome("crashed", f"{type(err).__name__}: {err}", err)
        return Outcome(LOADS, detail)

    def passed(self, outcome: Outcome) -> bool:
        return outcome.kind == self.expect and all(s in outcome.detail for s in self.must_mention)


# ------------------------------------------------------------------------------------------ the bench
class Bench:
    """A scratch folder plus a small processor: what each case needs to run through the pipeline."""

    def __init__(self, root: Path, tokenizer=None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if tokenizer is None:
            from vlsafe.core.tokenizer import train_bpe_tokenizer
            from vlsafe.data.encoding.templates import VICUNA_SYSTEM
            tokenizer = train_bpe_tokenizer([VICUNA_SYSTEM, "USER: ASSISTANT: What is it? A red square."] * 3,
                                            vocab_size=300)
        self.processor = VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=4, max_length=512)
        self.short = VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=4, max_length=150)
        self._n = 0

    def folder(self, name: str) -> Path:
        self._n += 1
        path = self.root / f"{self._n:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def through_pipeline(self, sample: Sample, processor: VLMProcessor | None = None,
                         encoder: str = "conversation") -> tuple[Sample, dict]:
        """Writer -> shard -> reader -> encoder, exactly as training does; returns (read sample, encoded)."""
        out = self.folder("shards")
        write_shards([sample], out)
        (back,) = list(read_samples(out))
        processor = processor or self.processor
        enc = ConversationEncoder(processor) if encoder == "conversation" else PreferenceEncoder(processor)
        return back, enc.encode(back)


def qa(sample_id: str, images: list, question: str = "<image>\nWhat is it?", answer: str = "A red square.",
       **extra) -> Sample:
    return Sample(id=sample_id, messages=[{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}], images=images, **extra)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written chunk by chunk, for headers PIL would not write (16-bit, bomb dimensions)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def noise(fmt: str, size=(48, 48), **kwargs) -> bytes:
    return encode(Image.effect_noise(size, 60).convert("RGB"), fmt, **kwargs)


def expect_rgb(data: bytes, expected: tuple[int, int, int], tolerance: int = 3, where=(0, 0)) -> str:
    """Decode through the pipeline's decoder and check one pixel's RGB value."""
    rgb = decode_image(data, "check", "images[0]").getpixel(where)
    if any(abs(a - b) > tolerance for a, b in zip(rgb, expected)):
        raise WrongResult(f"decoded to RGB {rgb}, expected {expected}")
    return f"decodes to RGB {rgb} (expected {expected})"


# ------------------------------------------------------------------------------------------ images
def _rejects_image(data: bytes) -> Callable[[Bench], str]:
    def build(bench: Bench) -> str:
        bench.through_pipeline(qa("img-1", [data]))
        return "loaded"
    return build


def _loads_image(data: bytes, expected: tuple[int, int, int] | None, tolerance: int = 3) -> Callable[[Bench], str]:
    def build(bench: Bench) -> str:
        back, item = bench.through_pipeline(qa("img-ok", [data]))
        if back.images != [data]:
            raise WrongResult("stored image bytes differ from the input")
        if tuple(item["pixel_values"].shape) != (1, 3, 32, 32):
            raise WrongResult(f"pixel_values shape {tuple(item['pixel_values'].shape)}")
        return expect_rgb(data, expected, tolerance) if expected else "loads"
    return build


def _sixteen_bit_grey() -> bytes:
    rows = b"".join(b"\x00" + struct.pack(">H", 0x8000) * 4 for _ in range(4))  # mid-grey in 16 bits
    return raw_png(4, 4, 16, 0, rows)


def _sixteen_bit_rgb() -> bytes:
    rows = b"".join(b"\x00" + struct.pack(">HHH", 0xFFFF, 0x8000, 0x0000) * 4 for _ in range(4))
    return raw_png(4, 4, 16, 2, rows)


def _large_jpeg(bench: Bench) -> str:
    """6000x4500 (27 megapixels): decoded at 1/8 scale, and the result matches a full-resolution decode."""
    import torch

    big = Image.linear_gradient("L").resize((6000, 4500)).convert("RGB")
    data = encode(big, "JPEG", quality=90)
    del big
    _, item = bench.through_pipeline(qa("big", [data]))
    with Image.open(io.BytesIO(data)) as full:
        full.load()
        reference = bench.processor.preprocess_image(full.convert("RGB"))
    draft = decode_image(data, "big", "images[0]", max_side=32)
    if max(draft.size) > 8 * 32:
        raise WrongResult(f"decoded at {draft.size}, not reduced")
    diff = float((item["pixel_values"][0] - reference).abs().mean())
    if diff > 0.05:
        raise WrongResult(f"reduced decode differs from the full decode by {diff:.3f} (normalised units)")
    return f"decoded at {draft.size[0]}x{draft.size[1]} instead of 6000x4500; mean |diff| vs full decode {diff:.4f}"


def _sliver(bench: Bench) -> str:
    """1x40000 in RGB, palette, 1-bit and 16-bit modes: padding to a square first would allocate a
    40000x40000 canvas (4.8 GB)."""
    shapes = []
    for mode, colour in (("RGB", (200, 30, 30)), ("P", 3), ("1", 1), ("I;16", 40000)):
        _, item = bench.through_pipeline(qa("sliver", [encode(Image.new(mode, (1, 40000), colour), "PNG")]))
        shapes.append(tuple(item["pixel_values"].shape))
    return f"pixel_values {sorted(set(shapes))} for RGB, P, 1 and I;16"


def _missing_file(bench: Bench) -> str:
    bench.through_pipeline(qa("missing-file", [str(bench.root / "does-not-exist.jpg")]))
    return "loaded"


def image_cases() -> list[Case]:
    jpeg, png, webp = noise("JPEG"), noise("PNG"), noise("WEBP")
    bomb = raw_png(100_000, 100_000, 8, 0, b"\x00" * 64)
    soft_bomb = raw_png(10_000, 10_000, 8, 0, b"\x00" * 64)  # 100 Mpx: PIL only *warns* below 2x its limit
    cmyk = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100)
    palette = encode(Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
    clear_palette = Image.new("P", (8, 8), 0)
    clear_palette.putpalette([0, 0, 0, 255, 0, 0])
    clear = encode(clear_palette, "PNG", transparency=0)
    return [
        Case("images", "truncated JPEG", REJECTED, ("'images[0]'", "does not decode"), _rejects_image(jpeg[:len(jpeg) // 2])),
        Case("images", "truncated PNG", REJECTED, ("'images[0]'", "does not decode"), _rejects_image(png[:len(png) // 2])),
        Case("images", "truncated WebP", REJECTED, ("'images[0]'", "does not decode"), _rejects_image(webp[:len(webp) // 2])),
        Case("images", "corrupt bytes (JPEG magic + garbage)", REJECTED, ("'images[0]'", "does not decode"),
             _rejects_image(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)),
        Case("images", "zero-byte image", REJECTED, ("'images[0]'", "0 bytes"), _rejects_image(b"")),
        Case("images", "decompression bomb (100000x100000 PNG header)", REJECTED, ("'images[0]'", "decompression bomb"),
             _rejects_image(bomb)),
        Case("images", "decompression bomb below PIL's hard limit (10000x10000)", REJECTED,
             ("'images[0]'", "decompression bomb", "VLSAFE_MAX_IMAGE_PIXELS"), _rejects_image(soft_bomb)),
        Case("images", "CMYK JPEG", LOADS, ("decodes to RGB",), _loads_image(cmyk, (255, 0, 0), tolerance=4)),
        Case("images", "palette PNG", LOADS, ("decodes to RGB",), _loads_image(palette, (10, 200, 30))),
        Case("images", "palette PNG with a transparent index", LOADS, ("decodes to RGB",),
             _loads_image(clear, (255, 255, 255), 0)),
        Case("images", "16-bit greyscale PNG", LOADS, ("decodes to RGB",), _loads_image(_sixteen_bit_grey(), (128, 128, 128), 1)),
        Case("images", "16-bit RGB PNG", LOADS, ("decodes to RGB",), _loads_image(_sixteen_bit_rgb(), (255, 128, 0), 1)),
        Case("images", "RGBA PNG (transparent pixels)", LOADS, ("decodes to RGB",),
             _loads_image(encode(Image.new("RGBA", (6, 6), (255, 0, 0, 0)), "PNG"), (255, 255, 255), 0)),
        Case("images", "LA PNG (grey + alpha, half transparent)", LOADS, ("decodes to RGB",),
             _loads_image(encode(Image.new("LA", (6, 6), (0, 128)), "PNG"), (127, 127, 127), 1)),
        Case("images", "WebP with alpha", LOADS, ("decodes to RGB",),
             _loads_image(encode(Image.new("RGBA", (6, 6), (0, 0, 255, 255)), "WEBP", lossless=True), (0, 0, 255), 0)),
        Case("images", "1x1 image", LOADS, ("decodes to RGB",),
             _loads_image(encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"), (9, 99, 199), 0)),
        Case("images", "very large JPEG (6000x4500)", LOADS, ("instead of 6000x4500",), _large_jpeg),
        Case("images", "extreme aspect ratio (1x40000), 4 modes", LOADS, ("[(1, 3, 32, 32)] for",), _sliver),
        Case("images", "missing image file", REJECTED, ("'images[0]'", "cannot read image file"), _missing_file),
    ]


# ------------------------------------------------------------------------------------------ text
def _png() -> bytes:
    return image_bytes(Image.new("RGB", (8, 8), (255, 0, 0)))


def _text_case(sample: Callable[[], Sample], processor: str = "processor", encoder: str = "conversation"):
    def build(bench: Bench) -> str:
        back, item = bench.through_pipeline(sample(), getattr(bench, processor), encoder)
        return f"loaded ({'truncated' if item.get('truncated') else 'complete'})"
    return build


def _non_utf8_json(bench: Bench) -> str:
    from vlsafe.data.sources.llava import read_llava_json

    folder = bench.folder("llava")
    path = folder / "data.json"
    path.write_bytes(b'[{"id": "1", "conversations": [\n{"from": "human", "value": "caf\xe9"}]}]')
    list(read_llava_json(path))
    return "loaded"


def _non_utf8_member(bench: Bench) -> str:
    folder = bench.folder("shards")
    write_shards([qa("u1", [], question="Hi")], folder)
    _rewrite_members(folder / "shard-000000.tar", lambda name, data: data.replace(b"Hi", b"H\xff") if name.endswith(".json") else data)
    list(read_samples(folder))
    return "loaded"


def text_cases() -> list[Case]:
    long_q = "What is it? " * 60
    return [
        Case("text", "image without an <image> placeholder", REJECTED, ("'messages'", "0 <image> placeholder(s)"),
             _text_case(lambda: qa("t1", [_png()], question="What is it?"))),
        Case("text", "more <image> placeholders than images", REJECTED, ("'messages'", "2 <image> placeholder(s)"),
             _text_case(lambda: qa("t2", [_png()], question="<image><image> What?"))),
        Case("text", "empty answer", REJECTED, ("'messages[1].content'", "empty"),
             _text_case(lambda: qa("t3", [], question="Hi", answer="  "))),
        Case("text", "conversation with no assistant turn (SFT)", REJECTED, ("'messages'", "no assistant turn"),
             _text_case(lambda: Sample(id="t4", messages=[{"role": "user", "content": "Hi"}]))),
        Case("text", "non-UTF-8 bytes in a LLaVA JSON file", REJECTED, ("data.json:2", "not UTF-8"), _non_utf8_json),
        Case("text", "non-UTF-8 bytes in a shard's JSON member", REJECTED, ("'json'", "malformed"), _non_utf8_member),
        Case("text", "lone surrogate in the text", REJECTED, ("messages", "not valid Unicode"),
             _text_case(lambda: qa("t5", [], question="Hi \ud800"))),
        Case("text", "over-long: truncation would remove every answer token", REJECTED,
             ("'messages'", "removes every supervised token"), _text_case(lambda: qa("t6", [], question=long_q), "short")),
        Case("text", "over-long: truncation would cut an image", REJECTED, ("'messages'", "cut into an image"),
             _text_case(lambda: qa("t7", [_png()], question=long_q + "<image>"), "short")),
        Case("text", "over-long with answer tokens left: truncated and counted", LOADS, ("truncated",),
             _text_case(lambda: qa("t8", [], question="Hi", answer="A red square. " * 40), "short")),
        Case("text", "preference pair with identical chosen/rejected", REJECTED, ("'rejected'", "identical to chosen"),
             _text_case(lambda: Sample(id="t9", messages=[{"role": "user", "content": "Hi"}], chosen="Yes.",
                                       rejected=" Yes."), encoder="preference")),
        Case("text", "<image> placeholder inside a preference response", REJECTED, ("'chosen'", "must not contain"),
             _text_case(lambda: Sample(id="t10", messages=[{"role": "user", "content": "Hi"}], chosen="<image>",
                                       rejected="No."), encoder="preference")),
    ]


# ------------------------------------------------------------------------------------------ geometry
def _geometry(boxes, masks=None, size=(20, 10)):
    def build(bench: Bench) -> str:
        image = image_bytes(Image.new("RGB", size, (0, 0, 255)))
        back, _ = bench.through_pipeline(qa("g1", [image], boxes=boxes, masks=masks))
        if back.boxes != boxes:
            raise WrongResult(f"boxes changed: {back.boxes} != {boxes}")
        return f"loaded; boxes {back.boxes}"
    return build


def _mask(size) -> bytes:
    return image_bytes(Image.new("L", size, 255))


def geometry_cases() -> list[Case]:
    nan, inf = float("nan"), float("inf")
    return [
        Case("geometry", "box outside the image", REJECTED, ("'boxes[0]'", "outside the 20x10 image"), _geometry([[0, 0, 25, 5]])),
        Case("geometry", "box with x2 < x1", REJECTED, ("'boxes[0]'", "x2 < x1"), _geometry([[10, 0, 5, 5]])),
        Case("geometry", "box with a negative coordinate", REJECTED, ("'boxes[0]'", "negative"), _geometry([[-3, 0, 5, 5]])),
        Case("geometry", "NaN coordinate", REJECTED, ("'boxes[0]'", "finite"), _geometry([[0, nan, 5, 5]])),
        Case("geometry", "Inf coordinate", REJECTED, ("'boxes[0]'", "finite"), _geometry([[0, 0, inf, 5]])),
        Case("geometry", "box that is not 4 numbers", REJECTED, ("'boxes[0]'", "four finite numbers"), _geometry([[0, 0, 5]])),
        Case("geometry", "mask of the wrong size", REJECTED, ("'masks[0]'", "is 10x10 but the image is 20x10"),
             _geometry([[0, 0, 5, 5]], [_mask((10, 10))])),
        Case("geometry", "more masks than boxes", REJECTED, ("'masks'", "2 mask(s) for 1 box(es)"),
             _geometry([[0, 0, 5, 5]], [_mask((20, 10))] * 2)),
        Case("geometry", "valid box and mask (control)", LOADS, ("boxes [[0, 0, 20, 10]]",),
             _geometry([[0, 0, 20, 10]], [_mask((20, 10))])),
    ]


# ------------------------------------------------------------------------------------------ files
def _rewrite_members(tar_path: Path, change: Callable[[str, bytes], bytes | None],
                     extra: list[tuple[str, bytes]] = (), after: dict[str, list[tuple[str, bytes]]] | None = None) -> None:
    """Rewrite a shard member by member (None drops a member); `after[name]` members are inserted right
    after member `name` (so they join its record), `extra` members are appended."""
    members = []
    with tarfile.open(tar_path) as tar:
        for info in tar.getmembers():
            data = change(info.name, tar.extractfile(info).read())
            if data is not None:
                members.append((info.name, data))
            members += (after or {}).get(info.name, [])
    with tarfile.open(tar_path, "w") as tar:
        for name, data in [*members, *extra]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _shards(bench: Bench, n: int = 6) -> Path:
    folder = bench.folder("shards")
    write_shards([qa(f"s{i}", [], question=f"Question {i}?") for i in range(n)], folder, max_samples=3)
    return folder


def _stream_ids(folder: Path, on_error: str = "raise") -> list[str]:
    from vlsafe.data.datamodule import ShardStream, Source

    class Ids:
        def encode(self, sample):
            return sample.id

        def collate(self, items):
            return {"ids": list(items)}

    stream = ShardStream([Source(str(folder)).planned()], Ids(), batch_size=100, on_error=on_error)
    batches = list(stream)
    skipped = sum(len(b.get("skipped_samples", [])) for b in batches)
    return [i for b in batches for i in b["ids"]] + ([f"skipped:{skipped}"] if skipped else [])


def _malformed_llava_json(bench: Bench) -> str:
    from vlsafe.data.sources.llava import read_llava_json

    path = bench.folder("llava") / "data.json"
    path.write_text('[{"id": "1",\n "conversations": [}]')
    list(read_llava_json(path))
    return "loaded"


def _record_not_object(bench: Bench) -> str:
    from vlsafe.data.sources.llava import read_llava_json

    path = bench.folder("llava") / "data.json"
    path.write_text('[["not", "a", "record"]]')
    list(read_llava_json(path))
    return "loaded"


def _image_path_escapes(bench: Bench) -> str:
    from vlsafe.data.sources.llava import read_llava_json

    folder = bench.folder("llava")
    (folder / "images").mkdir()
    Image.new("RGB", (4, 4)).save(folder / "secret.png")
    path = folder / "data.json"
    path.write_text(json.dumps([{"id": "esc", "image": "../secret.png", "conversations": [
        {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello."}]}]))
    write_shards(read_llava_json(path, folder / "images"), bench.folder("out"))
    return "loaded"


def _missing_shard(bench: Bench) -> str:
    folder = _shards(bench)
    (folder / "shard-000001.tar").unlink()
    return ", ".join(_stream_ids(folder))


def _truncated_shard(bench: Bench) -> str:
    folder = _shards(bench)
    path = folder / "shard-000001.tar"
    path.write_bytes(path.read_bytes()[:1200])  # cut inside the second record
    return ", ".join(_stream_ids(folder))


def _skip_truncated_shard(bench: Bench) -> str:
    folder = _shards(bench)
    path = folder / "shard-000001.tar"
    with tarfile.open(path) as tar:
        third = tar.getmembers()[2].offset
    path.write_bytes(path.read_bytes()[:third + 700])  # cut inside the third record's header
    ids = _stream_ids(folder, on_error="skip")
    if ids != ["s0", "s1", "s2", "s3", "skipped:2"]:
        raise WrongResult(f"expected the first shard, 1 record of the second and 2 counted skips; got {ids}")
    return f"read {len([i for i in ids if not i.startswith('skipped')])} of 6; counted skips: {ids[-1]}"


def _shorter_than_index(bench: Bench) -> str:
    folder = _shards(bench)
    _rewrite_members(folder / "shard-000001.tar", lambda name, data: None if name.startswith("000000005") else data)
    return ", ".join(_stream_ids(folder))


def _traversal(bench: Bench) -> str:
    folder = _shards(bench, 3)
    victim = bench.root / "escaped.json"
    sample = json.dumps({"id": "evil", "messages": [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Hello."}], "num_images": 0})
    _rewrite_members(folder / "shard-000000.tar", lambda name, data: data,
                     extra=[(f"../../{victim.name[:-5]}.json", sample.encode()), ("/tmp/vlsafe-evil.json", sample.encode())])
    index = load_index(folder)
    index.shards[0].count += 2
    index.save(folder)
    try:
        return ", ".join(_stream_ids(folder))
    finally:
        if victim.exists() or Path("/tmp/vlsafe-evil.json").exists():
            raise WrongResult("a member was written outside the shard folder")


def _skip_traversal(bench: Bench) -> str:
    folder = _shards(bench, 3)
    sample = json.dumps({"id": "evil", "messages": [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Hello."}], "num_images": 0})
    _rewrite_members(folder / "shard-000000.tar", lambda name, data: data, extra=[("../../evil.json", sample.encode())])
    index = load_index(folder)
    index.shards[0].count += 1
    index.save(folder)
    ids = _stream_ids(folder, on_error="skip")
    if "evil" in ids or ids[:3] != ["s0", "s1", "s2"] or ids[-1] != "skipped:1":
        raise WrongResult(f"got {ids}")
    return "the traversal record was skipped and counted; s0, s1, s2 read"


class _Tripwire:
    """Unpickling this writes a marker file: proof that a pickle member was (or was not) ever loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_member(bench: Bench) -> str:
    folder = _shards(bench, 3)
    marker = bench.root / "UNPICKLED"
    payload = pickle.dumps(_Tripwire(str(marker)))
    _rewrite_members(folder / "shard-000000.tar", lambda name, data: data,
                     after={"000000000.json": [("000000000.pickle", payload)],
                            "000000001.json": [("000000001.pth", payload), ("000000001.pyd", payload)]})
    ids = _stream_ids(folder)
    samples = list(read_samples(folder))
    if marker.exists():
        raise WrongResult("a pickle member was unpickled")
    if [s.id for s in samples] != ["s0", "s1", "s2"]:
        raise WrongResult(f"samples changed: {[s.id for s in samples]}")
    return f"samples {ids} loaded; the .pickle/.pth/.pyd members were ignored, never unpickled"


def _empty_index(bench: Bench) -> str:
    folder = bench.folder("empty")
    (folder / "index.json").write_text(json.dumps({"format": "vlsafe-shards/1", "shards": []}))
    load_index(folder)
    return "loaded"


def _empty_source_list(bench: Bench) -> str:
    from vlsafe.data.datamodule import ShardDataModule

    data = ShardDataModule(train=[])
    data.connect(ConversationEncoder(bench.processor))
    data.train_dataloader()
    return "loaded"


def _malformed_index(bench: Bench) -> str:
    folder = bench.folder("badindex")
    (folder / "index.json").write_text('{"format": "vlsafe-shards/1", "shards": [')
    load_index(folder)
    return "loaded"


def _malformed_member(bench: Bench) -> str:
    folder = _shards(bench, 3)
    _rewrite_members(folder / "shard-000000.tar",
                     lambda name, data: b'{"id": "s1", "messages": [' if name == "000000001.json" else data)
    list(read_samples(folder))
    return "loaded"


def _unknown_recipe_key(bench: Bench) -> str:
    from vlsafe.reliability.recipe_keys import check_recipe_keys

    path = bench.folder("recipe") / "recipe.yaml"
    path.write_text("trainer:\n  max_stepz: 3\nmodel:\n  class_path: vlsafe.methods.sft.SFTModule\n"
                    "  init_args:\n    vlm:\n      class_path: vlsafe.builders.TinyVLM\n"
                    "      init_args: {hidden_size: 32}\n    optim: {lrr: 1.0e-3}\n")
    check_recipe_keys(path, raise_error=True)
    return "loaded"


def file_cases() -> list[Case]:
    return [
        Case("files", "malformed LLaVA JSON", REJECTED, ("data.json: malformed JSON at line 2",), _malformed_llava_json),
        Case("files", "LLaVA record that is not an object", REJECTED, ("'record'", "must be a JSON object"), _record_not_object),
        Case("files", "image path escaping the image folder", REJECTED, ("'esc'", "'image'", "outside the image folder"),
             _image_path_escapes),
        Case("files", "malformed JSON member in a shard", REJECTED, ("'json'", "malformed", "shard-000000.tar#000000001"),
             _malformed_member),
        Case("files", "malformed index.json", REJECTED, ("index.json: malformed JSON",), _malformed_index),
        Case("files", "missing shard", REJECTED, ("cannot read shard", "shard-000001.tar"), _missing_shard),
        Case("files", "truncated shard (cut inside a record)", REJECTED, ("shard-000001.tar",), _truncated_shard),
        Case("files", "truncated shard with on_error: skip", LOADS, ("counted skips: skipped:2",), _skip_truncated_shard),
        Case("files", "shard shorter than its index", REJECTED, ("shard-000001.tar", "shorter than its index"),
             _shorter_than_index),
        Case("files", "tar members with path-traversal names", REJECTED, ("'tar member name'", "parent-directory"),
             _traversal),
        Case("files", "path-traversal member with on_error: skip", LOADS, ("skipped and counted",), _skip_traversal),
        Case("files", "shard with .pickle/.pth members", LOADS, ("never unpickled",), _pickle_member),
        Case("files", "index.json listing no shards", REJECTED, ("lists no shards",), _empty_index),
        Case("files", "empty shard list in the data module", REJECTED, ("no 'fit' data configured",), _empty_source_list),
        Case("files", "recipe with unknown keys", REJECTED, ("trainer.max_stepz", "did you mean 'max_steps'",
                                                             "model.init_args.optim.lrr", "did you mean 'lr'"),
             _unknown_recipe_key),
    ]


def all_cases() -> list[Case]:
    return image_cases() + text_cases() + geometry_cases() + file_cases()
