"""How an evaluation turns a benchmark image into the model's square input: `pad`, `crop` or `resize`.

Benchmarks' released scripts do not agree, and the choice moves numbers (a centre crop cuts off the
typography at the bottom of an MM-SafetyBench image; padding keeps it):

- `pad`: pad to a centred square with the CLIP mean colour, then bicubic resize (LLaVA's
  `image_aspect_ratio='pad'`, what vlsafe trains with; MMSafe-PO's `infer_json.py` runs with it);
- `crop`: the CLIP image processor's own `preprocess` - bicubic resize of the shorter side to the input
  side, then a centre crop (VLGuard's `model_utils.py:10`, MLLM-Protector's `robustness_eval.py:90`);
- `resize`: bicubic resize of the whole image to a square, aspect ratio not kept (BLIP-2's eval
  processor, which LRV's MiniGPT-4 model uses).

`processor_for(processor, mode)` returns a copy of the model's processor that preprocesses images that way;
the text side is untouched. Each suite names its default and writes the mode used into `metrics.json`.
"""
from __future__ import annotations

import copy

import torch
from PIL import Image

from vlsafe.data.encoding.processor import VLMProcessor
from vlsafe.data.images import decode_image, to_rgb
from vlsafe.data.schema import SampleError

IMAGE_PREPROCESS = ("pad", "crop", "resize")
#: above this aspect ratio the centre square is cut before resizing (the resized sliver would be huge)
_CROP_FIRST_RATIO = 16


def check_image_preprocess(mode: str, suite: str) -> str:
    if mode not in IMAGE_PREPROCESS:
        raise ValueError(f"suite {suite!r}: image_preprocess must be one of {list(IMAGE_PREPROCESS)}, got {mode!r}")
    return mode


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """CLIPImageProcessor's resize (shorter side -> `size`, longer side `int(size * long / short)`, bicubic) and
    centre crop (`top = (height - size) // 2`), on an RGB image."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long > _CROP_FIRST_RATIO * short:  # a sliver: only its centre square survives the crop anyway
        left, top = (width - short) // 2, (height - short) // 2
        image = image.crop((left, top, left + short, top + short))
        width = height = short
        short = long = short
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


class CenterCropProcessor(VLMProcessor):
    """A `VLMProcessor` whose images go through `resize_center_crop` instead of pad-to-square."""

    image_preprocess = "crop"

    def preprocess_image(self, image: bytes | Image.Image, sample_id: str = "?", field_name: str = "images",
                         normalize: bool = True) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            if not isinstance(image, (bytes, bytearray)):
                raise SampleError(sample_id, field_name, f"expected encoded image bytes, got {type(image).__name__}")
            image = decode_image(bytes(image), sample_id, field_name, max_side=self.image_size)
        image = resize_center_crop(to_rgb(image), self.image_size)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(self.image_size, self.image_size, 3).permute(2, 0, 1).contiguous()
        return self.normalize(pixels) if normalize else pixels


def processor_for(processor: VLMProcessor, mode: str) -> VLMProcessor:
    """A shallow copy of `processor` that preprocesses images as `mode` says (see the module docstring)."""
    check_image_preprocess(mode, "?")
    clone = copy.copy(processor)
    if mode == "crop":
        clone.__class__ = CenterCropProcessor
    else:
        clone.pad_to_square = mode == "pad"
    return clone
