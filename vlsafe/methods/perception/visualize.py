"""Predicted vs ground-truth boxes and masks drawn onto the image (what the model saw: the padded square)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vlsafe.data.encoding.processor import expand2square
from vlsafe.data.images import decode_image

GT_COLOUR = (0, 200, 0)
PRED_COLOUR = (230, 0, 0)


def _tint(canvas: Image.Image, mask: torch.Tensor, colour: tuple[int, int, int], alpha: float) -> Image.Image:
    """Blend `colour` into `canvas` where the (S, S) boolean mask is set."""
    weights = (mask.bool().to(torch.uint8) * int(255 * alpha)).cpu().numpy()
    layer = Image.frombytes("L", (mask.shape[1], mask.shape[0]), weights.tobytes())
    layer = layer.resize(canvas.size, Image.Resampling.NEAREST)
    return Image.composite(Image.new("RGB", canvas.size, colour), canvas, layer)


def draw_grounding(image: bytes | Image.Image, gt_boxes: list[torch.Tensor], pred_boxes: list[torch.Tensor | None],
                   gt_masks: list[torch.Tensor | None] | None = None,
                   pred_masks: list[torch.Tensor | None] | None = None, *, pad_to_square: bool = True,
                   background: tuple[int, int, int] = (122, 116, 104), side: int = 256,
                   caption: str = "") -> Image.Image:
    """Boxes are normalised xyxy in the square frame; masks are boolean (S, S) in the same frame.

    Ground truth is green, prediction red; masks are translucent fills, boxes outlines.
    """
    if not isinstance(image, Image.Image):
        image = decode_image(image)
    image = image.convert("RGB")
    if pad_to_square:
        image = expand2square(image, background)
    canvas = image.resize((side, side), Image.Resampling.BICUBIC)
    for mask in gt_masks or []:
        if mask is not None:
            canvas = _tint(canvas, mask, GT_COLOUR, 0.35)
    for mask in pred_masks or []:
        if mask is not None:
            canvas = _tint(canvas, mask, PRED_COLOUR, 0.35)
    draw = ImageDraw.Draw(canvas)
    for boxes, colour in ((gt_boxes, GT_COLOUR), (pred_boxes, PRED_COLOUR)):
        for box in boxes:
            if box is not None:
                x1, y1, x2, y2 = (float(v) * side for v in box)
                draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=colour, width=2)
    if caption:
        strip = Image.new("RGB", (side, 16), (255, 255, 255))
        ImageDraw.Draw(strip).text((3, 2), caption[:60], fill=(0, 0, 0))
        framed = Image.new("RGB", (side, side + 16), (255, 255, 255))
        framed.paste(canvas, (0, 0))
        framed.paste(strip, (0, side))
        canvas = framed
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
