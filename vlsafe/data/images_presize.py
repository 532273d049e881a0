"""Square-and-resize an image once, when shards are written, instead of on every epoch in every worker.

A LLaVA-style loader decodes the original photo (COCO: ~640x480 JPEG), pads it to a square and resizes
it to the model's side on every read. `make_shards ... --presize SIDE` does those steps at writing time
with exactly the code the processor runs (`square_image`) and stores the result losslessly as PNG, so
at load time pad and resize are no-ops and the pixels the model sees are bit-for-bit the same.

Each pre-sized PNG carries a `vlsafe:presized` text chunk recording side, fill colour and padding; the
processor refuses such an image when its own settings differ (a double resize or a wrong padding colour
would otherwise be silent).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from vlsafe.data.schema import SampleError
from vlsafe.data.shards import decode_image

PRESIZE_KEY = "vlsafe:presized"


def mean_fill(image_mean: tuple[float, ...]) -> tuple[int, int, int]:
    """The padding colour LLaVA uses: the normalisation mean in 0..255, truncated (not rounded)."""
    return tuple(int(m * 255) for m in image_mean)  # type: ignore[return-value]


@dataclass(frozen=True)
class Presize:
    """How images were squared and resized at writing time (what a processor must match to use them)."""

    size: int
    fill: tuple[int, int, int]
    pad_to_square: bool = True
    # PNG deflate level: storage only, the pixels are the same. 0 (stored) loads fastest; 1 took ~45% of the
    # bytes (noisy synthetic scenes; photos compress less) for 1.3-1.4x the loading CPU (docs/data_performance.md)
    compress_level: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"presize side must be >= 1 pixel, got {self.size}")
        if len(self.fill) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in self.fill):
            raise ValueError(f"presize fill must be three integers in 0..255, got {self.fill!r}")
        if not 0 <= self.compress_level <= 9:
            raise ValueError(f"PNG compress level must be 0..9, got {self.compress_level}")

    @classmethod
    def for_processor(cls, processor) -> "Presize":
        """The settings a `VLMProcessor` applies, so shards can be pre-sized for exactly that model."""
        return cls(processor.image_size, mean_fill(processor.image_mean), bool(processor.pad_to_square))

    def record(self) -> dict:
        return {"size": self.size, "fill": list(self.fill), "pad_to_square": self.pad_to_square,
                "resample": "bicubic"}


def square_image(image: Image.Image, size: int, fill: tuple[int, int, int], pad_to_square: bool = True) -> Image.Image:
    """RGB image -> (size x size): pad to a centred square with `fill` (LLaVA's `image_aspect_ratio='pad'`),
    then bicubic resize. The processor runs this at load time and `presize_image` at writing time; an image
    already `size` x `size` comes back unchanged (PIL copies on a same-size resize), which is what makes
    pre-sized shards load bit-identically."""
    from vlsafe.data.processor import expand2square  # the processor imports this module

    if pad_to_square:
        image = expand2square(image, fill)
    return image.resize((size, size), Image.Resampling.BICUBIC)


def presize_image(data: bytes, presize: Presize, sample_id: str, field_name: str) -> bytes:
    """Encoded image -> lossless PNG of the squared, resized RGB image, tagged with its `Presize` record.

    Decoding goes through `decode_image(max_side=size)`, as the processor does at load time, so huge or
    elongated images are reduced the same way on both paths."""
    image = square_image(decode_image(data, sample_id, field_name, max_side=presize.size), presize.size,
                         presize.fill, presize.pad_to_square)
    info = PngInfo()
    info.add_text(PRESIZE_KEY, json.dumps(presize.record(), sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=presize.compress_level)
    return buffer.getvalue()


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
    if record is None:
        return
    wanted = expected.record()
    if record != wanted or image.size != (expected.size, expected.size):
        raise SampleError(sample_id, field_name,
                          f"was pre-sized at shard writing with {record} but this model's processor uses {wanted}; "
                          f"rewrite the shards with matching `make_shards ... --presize` options (or without it)")


def presize_from_args(size: int | None, mean: list[float] | None = None, squash: bool = False,
                      compress_level: int | None = None) -> Presize | None:
    """`make_shards` flags -> a `Presize` (None when --presize is not given)."""
    if size is None:
        if mean is not None or squash or compress_level is not None:
            raise ValueError("--presize-mean, --presize-squash and --presize-compress-level need --presize SIDE")
        return None
    from vlsafe.data.processor import OPENAI_CLIP_MEAN  # the processor's default normalisation

    level = {} if compress_level is None else {"compress_level": compress_level}
    return Presize(size, mean_fill(tuple(mean) if mean else OPENAI_CLIP_MEAN), not squash, **level)
