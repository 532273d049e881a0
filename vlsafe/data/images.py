"""Square-and-resize an image once, when shards are written, instead of on every epoch in every worker.

A LLaVA-style loader decodes the original photo (COCO: ~640x480 JPEG), pads it to a square and resizes
it to the model's side on every read. `make_shards ... --presize SIDE` does those steps at writing time
with exactly the code the processor runs (`square_image`) and stores the result losslessly, so at load
time pad and resize are no-ops and the pixels the model sees are bit-for-bit the same.

Storage (`Presize.format`):
- `ppm` (default): binary PPM, the raw RGB bytes after a three-line header. The processor turns it into
  a tensor straight from the bytes (`presized_pixels`: no image decoder at all; 0.1 ms per 224-px image
  against 0.6 ms for a level-0 PNG decoded by PIL). Any image library still opens it.
- `png`: lossless PNG, optionally deflated (`compress_level`), for when shard size matters more.

Each pre-sized image records side, fill colour and padding (a `# vlsafe:presized {...}` header comment in
PPM, a `vlsafe:presized` text chunk in PNG); the processor refuses such an image when its own settings
differ (a double resize or a wrong padding colour would otherwise be silent).
"""
from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from vlsafe.data.schema import SampleError

_PIL_TO_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff",
               "PPM": "ppm"}

# ---------------------------------------------------------------------------------------- images
# Decompression-bomb guard: an image whose header promises more pixels than this is refused before any
# pixel is decoded (PIL itself only warns between 1x and 2x its limit). Raise it with VLSAFE_MAX_IMAGE_PIXELS.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's default: ~0.25 GB as 24-bit RGB
# Above this many pixels, JPEGs are checked and decoded at reduced scale (DCT scaling), so a 50-megapixel
# photo never costs a full-resolution buffer; the whole file is still read, so truncation is still caught.
LARGE_IMAGE_PIXELS = 4096 * 4096


_PIXEL_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_pixel_count(value: str, name: str = "VLSAFE_MAX_IMAGE_PIXELS") -> int:
    """`89478485`, `89_478_485`, `89,478,485`, `50M`, `1.5G`, `500k` -> pixels; anything else names `name`."""
    text = value.strip().lower().replace("_", "").replace(",", "")
    suffix = text[-1:] if text[-1:] in _PIXEL_SUFFIXES else ""
    number = text[:-1] if suffix else text
    try:
        pixels = int(float(number) * _PIXEL_SUFFIXES[suffix]) if number else -1
    except (ValueError, OverflowError):  # not a number, nan, inf
        pixels = -1
    if pixels < 1:
        raise ValueError(f"{name}={value!r} is not a pixel count; use a positive whole number (89478485, "
                         f"89_478_485) or one with a k/M/G suffix (50M = 50,000,000 pixels)")
    return pixels


def max_image_pixels() -> int:
    """The decompression-bomb limit in pixels (env `VLSAFE_MAX_IMAGE_PIXELS`, e.g. `200000000` or `200M`;
    default PIL's 89,478,485)."""
    value = os.environ.get("VLSAFE_MAX_IMAGE_PIXELS")
    limit = parse_pixel_count(value) if value else DEFAULT_MAX_IMAGE_PIXELS
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # PIL's own (2x) check must not be stricter than the one asked for
    return limit


def open_image(data: bytes, sample_id: str, field_name: str, draft_side: int | None = None) -> Image.Image:
    """Open and fully decode encoded bytes, or raise `SampleError` naming the sample and field.

    Refuses empty data and decompression bombs (judged from the header, before decoding). With
    `draft_side`, a large JPEG is decoded at the smallest DCT scale that keeps both sides >= `draft_side`.
    """
    if not data:
        raise SampleError(sample_id, field_name, "image is empty (0 bytes)")
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # judged below, with a clear error
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise SampleError(sample_id, field_name, f"refused as a possible decompression bomb: {err}") from None
    except Exception as err:  # PIL raises many types for broken files
        raise SampleError(sample_id, field_name, f"image does not decode: {err}") from None
    width, height = img.size
    if width * height > limit:
        raise SampleError(sample_id, field_name, f"refused as a possible decompression bomb: {width}x{height} = "
                                                 f"{width * height:,} pixels exceeds the limit of {limit:,} "
                                                 f"(set VLSAFE_MAX_IMAGE_PIXELS to raise it)")
    if width < 1 or height < 1:
        raise SampleError(sample_id, field_name, f"image has no pixels ({width}x{height})")
    if draft_side and width * height > LARGE_IMAGE_PIXELS and img.format == "JPEG":
        img.draft(img.mode, (draft_side, draft_side))
    try:
        img.load()
    except Exception as err:
        raise SampleError(sample_id, field_name, f"image does not decode: {err}") from None
    return img


def inspect_image(image: bytes | str | Path, sample_id: str, field_name: str) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes, extension, (width, height)) of an image given as bytes or a path, after checking it decodes.

    Images are stored as the original encoded bytes (no re-encoding loss); a full decode here means a
    corrupt or truncated file is reported at shard-writing time, not in the middle of training.
    """
    if isinstance(image, (str, Path)):
        try:
            data = Path(image).read_bytes()
        except OSError as err:
            raise SampleError(sample_id, field_name, f"cannot read image file {image}: {err.strerror}") from None
    else:
        data = bytes(image)
    img = open_image(data, sample_id, field_name, draft_side=64)  # a large JPEG is checked at 1/8 scale
    fmt = img.format
    img.close()
    size = image_header_size(data, sample_id, field_name)  # the stored size, whatever scale was decoded
    return data, _PIL_TO_EXT.get(fmt or "", "png" if fmt is None else fmt.lower()), size


def encoded_image(image: bytes | str | Path, sample_id: str, field_name: str) -> tuple[bytes, str]:
    """Return (bytes, extension) for an image given as bytes or a path, after checking it decodes."""
    data, ext, _ = inspect_image(image, sample_id, field_name)
    return data, ext


def image_header_size(data: bytes, sample_id: str, field_name: str) -> tuple[int, int]:
    """(width, height) from the header alone (cheap: no pixel is decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Exception as err:
        raise SampleError(sample_id, field_name, f"image does not decode: {err}") from None


def decode_image(data: bytes, sample_id: str = "?", field_name: str = "images",
                 max_side: int | None = None, rgb_mode: str = "composite") -> Image.Image:
    """Decode encoded bytes to an RGB PIL image (alpha is composited on white, palettes expanded, 16-bit and
    float greyscale rescaled to 8 bits; `rgb_mode="pil"`: LLaVA's plain `convert('RGB')`, see `to_rgb`).

    With `max_side` (the model's input side), an image whose longer side exceeds 8x `max_side` is decoded
    at reduced scale (JPEG) and box-reduced to at least 4x `max_side`, so huge or extremely elongated
    images never allocate full-resolution (or padded-square) buffers, while the final bicubic resize
    still sees >= 4x the pixels it keeps (the result stays within a grey level or so of a full decode).
    """
    img = to_rgb(open_image(data, sample_id, field_name, draft_side=4 * max_side if max_side else None), rgb_mode)
    if max_side and max(img.size) > 8 * max_side:
        img = img.reduce(max(1, max(img.size) // (4 * max_side)))
    return img


RgbMode = Literal["composite", "pil"]
RGB_MODES: tuple[str, ...] = get_args(RgbMode)


def to_rgb(img: Image.Image, rgb_mode: str = "composite") -> Image.Image:
    """Any PIL mode -> RGB with the pixel values a viewer would show (`rgb_mode="composite"`).

    `rgb_mode="pil"` is PIL's plain `convert("RGB")`, what LLaVA's loader does (llava/train/train.py:701): alpha
    is dropped, so a transparent pixel shows whatever colour is stored under it, and 16-bit grey is clipped.
    The two agree on every image without alpha or high-depth grey (RGB, L, P, CMYK, 1-bit)."""
    if rgb_mode == "pil":
        return img.convert("RGB")
    if rgb_mode != "composite":
        raise ValueError(f"rgb_mode must be one of {RGB_MODES}, got {rgb_mode!r}")
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_depth_to_l(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale -> 8-bit "L" (PIL's own conversion clips, turning a 16-bit
    PNG white). 16-bit modes keep the high byte; "I" with values above 255 is taken as 16-bit; "F" in
    [0, 1] is scaled to [0, 255], otherwise clipped."""
    import numpy as np

    array = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and array.size and array.max() > 255):
        array = array.astype(np.int64) >> 8
    elif img.mode == "F" and array.size and np.nanmax(array) <= 1.0:
        array = np.nan_to_num(array) * 255.0
    return Image.fromarray(np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8), mode="L")


# ---------------------------------------------------------------------------------------- writing

PRESIZE_KEY = "vlsafe:presized"
PPM_PREFIX = b"P6\n# " + PRESIZE_KEY.encode() + b" "  # how every pre-sized PPM starts
FORMATS = ("ppm", "png")


def mean_fill(image_mean: tuple[float, ...]) -> tuple[int, int, int]:
    """The padding colour LLaVA uses: the normalisation mean in 0..255, truncated (not rounded)."""
    return tuple(int(m * 255) for m in image_mean)  # type: ignore[return-value]


@dataclass(frozen=True)
class Presize:
    """How images were squared and resized at writing time (what a processor must match to use them)."""

    size: int
    fill: tuple[int, int, int]
    pad_to_square: bool = True
    # Storage only: the pixels are the same in every format. "ppm" loads fastest (raw bytes); "png" with a
    # deflate level of 1 took ~45% of the bytes (noisy synthetic scenes; photos compress less) for 1.3-1.4x the
    # loading CPU of a level-0 PNG (docs/data_performance.md).
    format: str = "ppm"
    compress_level: int = 0
    # How the decoded image became RGB (`vlsafe.data.images.to_rgb`): "composite" (alpha on white) or "pil"
    # (LLaVA's plain convert("RGB")); recorded only when "pil", so earlier pre-sized shards stay valid.
    rgb_mode: str = "composite"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"presize side must be >= 1 pixel, got {self.size}")
        if len(self.fill) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in self.fill):
            raise ValueError(f"presize fill must be three integers in 0..255, got {self.fill!r}")
        if not 0 <= self.compress_level <= 9:
            raise ValueError(f"PNG compress level must be 0..9, got {self.compress_level}")
        if self.format not in FORMATS:
            raise ValueError(f"presize format must be one of {FORMATS}, got {self.format!r}")
        if self.format != "png" and self.compress_level:
            raise ValueError("a compress level applies to PNG only; use format 'png' with it")
        if self.rgb_mode not in RGB_MODES:
            raise ValueError(f"presize rgb_mode must be one of {RGB_MODES}, got {self.rgb_mode!r}")

    def apply(self, data: bytes, sample_id: str, field_name: str) -> tuple[bytes, str]:
        """`presize_image` with this record (what the shard writer calls: it needs no import of this module)."""
        return presize_image(data, self, sample_id, field_name)

    @classmethod
    def for_processor(cls, processor) -> "Presize":
        """The settings a `VLMProcessor` applies, so shards can be pre-sized for exactly that model."""
        return cls(processor.image_size, processor.pad_fill, bool(processor.pad_to_square),
                   rgb_mode=getattr(processor, "rgb_mode", "composite"))

    def record(self) -> dict:
        return {"size": self.size, "fill": list(self.fill), "pad_to_square": self.pad_to_square,
                "resample": "bicubic", **({"rgb_mode": self.rgb_mode} if self.rgb_mode != "composite" else {})}


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a centred square with `background` (LLaVA's `image_aspect_ratio='pad'`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def square_image(image: Image.Image, size: int, fill: tuple[int, int, int], pad_to_square: bool = True) -> Image.Image:
    """RGB image -> (size x size): pad to a centred square with `fill` (LLaVA's `image_aspect_ratio='pad'`),
    then bicubic resize. The processor runs this at load time and `presize_image` at writing time; an image
    already `size` x `size` comes back unchanged (PIL copies on a same-size resize), which is what makes
    pre-sized shards load bit-identically."""
    if pad_to_square:
        image = expand2square(image, fill)
    return image.resize((size, size), Image.Resampling.BICUBIC)


def presize_image(data: bytes, presize: Presize, sample_id: str, field_name: str) -> tuple[bytes, str]:
    """Encoded image -> (bytes, extension) of the squared, resized RGB image, tagged with its `Presize` record.

    Decoding goes through `decode_image(max_side=size)`, as the processor does at load time, so huge or
    elongated images are reduced the same way on both paths."""
    decoded = decode_image(data, sample_id, field_name, max_side=presize.size, rgb_mode=presize.rgb_mode)
    image = square_image(decoded, presize.size, presize.fill, presize.pad_to_square)
    record = json.dumps(presize.record(), sort_keys=True)
    if presize.format == "ppm":
        header = PPM_PREFIX + record.encode() + f"\n{image.width} {image.height}\n255\n".encode()
        return header + image.tobytes(), "ppm"
    info = PngInfo()
    info.add_text(PRESIZE_KEY, record)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=presize.compress_level)
    return buffer.getvalue(), "png"


def presized_pixels(data: bytes, expected: Presize, sample_id: str, field_name: str) -> torch.Tensor | None:
    """uint8 (3, S, S) pixels of a PPM written by `presize_image`, read straight from its bytes (None for
    any other image). Refuses one pre-sized for other settings, or whose byte count is not its header's."""
    if not data.startswith(PPM_PREFIX):
        return None
    lines = data.split(b"\n", 4)  # magic, comment, "W H", "255", pixels
    try:
        record = json.loads(lines[1][len(PPM_PREFIX) - 3:])  # the comment line after "# "
        width, height = (int(v) for v in lines[2].split())
        ok = len(lines) == 5 and lines[3] == b"255" and isinstance(record, dict)
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise SampleError(sample_id, field_name, "pre-sized PPM has a malformed header")
    refuse_mismatch(record, (width, height), expected, sample_id, field_name)
    pixels = lines[4]
    if len(pixels) != width * height * 3:
        raise SampleError(sample_id, field_name, f"pre-sized PPM holds {len(pixels)} pixel bytes, its header says "
                                                 f"{width}x{height}x3 = {width * height * 3} (truncated?)")
    return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1).contiguous()


def presize_record(image: Image.Image) -> dict | None:
    """The `Presize` record a decoded image carries (None for ordinary images)."""
    raw = image.info.get(PRESIZE_KEY)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return {"malformed": str(raw)[:80]}
    return record if isinstance(record, dict) else {"malformed": str(raw)[:80]}


def check_presized(image: Image.Image, expected: Presize, sample_id: str, field_name: str) -> None:
    """Refuse an image pre-sized for other processor settings (it would be resized twice or padded with the
    wrong colour, silently changing what the model sees)."""
    record = presize_record(image)
    if record is not None:
        refuse_mismatch(record, image.size, expected, sample_id, field_name)


def refuse_mismatch(record: dict, size: tuple[int, int], expected: Presize, sample_id: str, field_name: str) -> None:
    """`SampleError` unless an image's pre-size `record` and `size` are what `expected` would have written."""
    wanted = expected.record()
    if record != wanted or tuple(size) != (expected.size, expected.size):
        raise SampleError(sample_id, field_name,
                          f"was pre-sized at shard writing with {record} but this model's processor uses {wanted}; "
                          f"rewrite the shards with matching `make_shards ... --presize` options (or without it)")


def presize_from_args(size: int | None, mean: list[float] | None = None, squash: bool = False,
                      compress_level: int | None = None, fmt: str | None = None,
                      rgb_mode: str | None = None) -> Presize | None:
    """`make_shards` flags -> a `Presize` (None when --presize is not given)."""
    if size is None:
        if mean is not None or squash or compress_level is not None or fmt is not None or rgb_mode is not None:
            raise ValueError("--presize-mean, --presize-squash, --presize-format, --presize-compress-level and "
                             "--presize-rgb-mode need --presize SIDE")
        return None
    if compress_level is not None and fmt is None:
        fmt = "png"  # a deflate level only means something for PNG
    storage = {"format": fmt or "ppm", **({} if compress_level is None else {"compress_level": compress_level})}
    return Presize(size, mean_fill(tuple(mean) if mean else OPENAI_CLIP_MEAN), not squash, **storage,
                   rgb_mode=rgb_mode or "composite")
