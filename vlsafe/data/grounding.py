"""How grounding samples carry boxes and masks: text placeholders and instruction templates, and the frame
the coordinates live in. Shared by the RefCOCO converter, the synthetic world and PerceptionGPT's encoders.

Box placeholders and REC/RES instruction templates for perception data (Shikra-style).

Converters write `<boxes>` (a box answer) or `<masks>` (a mask answer) where an object's location goes and
keep the boxes/masks in `Sample.boxes` / `Sample.masks`, one placeholder per box, in order. Shards thus
stay model-agnostic: `PerceptionEncoder` turns each placeholder into the `<loc>` token, a text-coordinate
model can render the same box as "[x1, y1, x2, y2]" instead. The wording below is ours.

The frame boxes and masks live in: the image padded to a centred square (as the processor pads pixels).

Boxes enter the model normalised to [0, 1] in that square frame (x1, y1, x2, y2), so a box and the pixels
the vision tower sees always agree, whatever the original aspect ratio. Masks are padded with 0 the same
way and resized to the mask decoder's output size.
"""
from __future__ import annotations

import io
import re
from typing import Sequence

import torch
from PIL import Image

LOC_TOKEN = "<loc>"
BOXES_PLACEHOLDER = "<boxes>"
MASKS_PLACEHOLDER = "<masks>"
EXPR_PLACEHOLDER = "<expr>"

REC_TEMPLATES = (
    "Where is <expr> in the image? Answer with its box.",
    "Give the bounding box of <expr>.",
    "Locate <expr> in this picture.",
    "Find <expr> and mark where it is.",
    "Which region of the image shows <expr>?",
)
RES_TEMPLATES = (
    "Segment <expr> in the image.",
    "Give the segmentation mask of <expr>.",
    "Outline <expr> in this picture.",
    "Which pixels belong to <expr>? Answer with a mask.",
)
REC_ANSWER = "<boxes>"
RES_ANSWER = "<masks>"

# "[0.12, 0.30, 0.45, 0.61]": the text coordinates of vlsafe.data.synthetic.world.box_to_text and Shikra's answers
TEXT_BOX = re.compile(r"\[\s*[01](?:\.\d+)?\s*(?:,\s*[01](?:\.\d+)?\s*){3}\]")


def fill_expression(template: str, expression: str) -> str:
    if EXPR_PLACEHOLDER not in template:
        raise ValueError(f"template {template!r} has no {EXPR_PLACEHOLDER} placeholder")
    return template.replace(EXPR_PLACEHOLDER, expression.strip().rstrip("."))


def to_loc_text(text: str, text_boxes: bool = True) -> str:
    """Every box placeholder (and, with `text_boxes`, every "[x1, y1, x2, y2]" text box) -> `<loc>`."""
    text = text.replace(BOXES_PLACEHOLDER, LOC_TOKEN).replace(MASKS_PLACEHOLDER, LOC_TOKEN)
    return TEXT_BOX.sub(LOC_TOKEN, text) if text_boxes else text



def square_frame(width: int, height: int, pad_to_square: bool = True) -> tuple[float, float, float, float]:
    """(x offset, y offset, frame width, frame height) of the original image inside the model's frame.

    The offsets are `expand2square`'s integer paste position; without padding the frame is the image itself
    (the processor then stretches it to a square, which normalising by width/height matches).
    """
    if not pad_to_square:
        return 0.0, 0.0, float(width), float(height)
    side = max(width, height)
    return float((side - width) // 2), float((side - height) // 2), float(side), float(side)


def normalise_boxes(boxes: Sequence[Sequence[float]], width: int, height: int,
                    pad_to_square: bool = True) -> torch.Tensor:
    """Pixel xyxy boxes of the original image -> (N, 4) normalised xyxy in the padded square frame, clamped."""
    ox, oy, fw, fh = square_frame(width, height, pad_to_square)
    out = torch.tensor([[(b[0] + ox) / fw, (b[1] + oy) / fh, (b[2] + ox) / fw, (b[3] + oy) / fh] for b in boxes],
                       dtype=torch.float32).reshape(-1, 4)
    return out.clamp(0.0, 1.0)


def denormalise_boxes(boxes: torch.Tensor, width: int, height: int, pad_to_square: bool = True) -> torch.Tensor:
    """Inverse of `normalise_boxes`: frame-normalised xyxy -> pixel xyxy of the original image."""
    ox, oy, fw, fh = square_frame(width, height, pad_to_square)
    scale = boxes.new_tensor([fw, fh, fw, fh])
    shift = boxes.new_tensor([ox, oy, ox, oy])
    return boxes * scale - shift


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2); differentiable (torchvision.ops.box_convert does the same)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def mask_to_frame(mask: Image.Image | bytes, size: int, pad_to_square: bool = True) -> torch.Tensor:
    """A mode-"L" mask (non-zero = inside) of the original image -> (size, size) float in [0, 1] in the frame.

    Padding is 0 (outside) at the same offset as the image pad; the resize is bilinear, so edge pixels
    become soft targets (BCE accepts them; metrics binarise at 0.5).
    """
    if isinstance(mask, (bytes, bytearray)):
        mask = Image.open(io.BytesIO(mask))
        mask.load()
    binary = mask.convert("L").point(lambda v: 255 if v else 0)
    if pad_to_square and binary.width != binary.height:
        side = max(binary.size)
        canvas = Image.new("L", (side, side), 0)
        canvas.paste(binary, ((side - binary.width) // 2, (side - binary.height) // 2))
        binary = canvas
    if binary.size != (size, size):
        binary = binary.resize((size, size), Image.Resampling.BILINEAR)
    data = torch.frombuffer(bytearray(binary.tobytes()), dtype=torch.uint8).view(size, size)
    return data.float() / 255.0
