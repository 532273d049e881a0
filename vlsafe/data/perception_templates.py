"""Box placeholders and REC/RES instruction templates for perception data (Shikra-style).

Converters write `<boxes>` (a box answer) or `<masks>` (a mask answer) where an object's location goes and
keep the boxes/masks in `Sample.boxes` / `Sample.masks`, one placeholder per box, in order. Shards thus
stay model-agnostic: `PerceptionEncoder` turns each placeholder into the `<loc>` token, a text-coordinate
model can render the same box as "[x1, y1, x2, y2]" instead. The wording below is ours.
"""
from __future__ import annotations

import re

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

# "[0.12, 0.30, 0.45, 0.61]": the text coordinates of vlsafe.data.synthetic.box_to_text and Shikra's answers
TEXT_BOX = re.compile(r"\[\s*[01](?:\.\d+)?\s*(?:,\s*[01](?:\.\d+)?\s*){3}\]")


def fill_expression(template: str, expression: str) -> str:
    if EXPR_PLACEHOLDER not in template:
        raise ValueError(f"template {template!r} has no {EXPR_PLACEHOLDER} placeholder")
    return template.replace(EXPR_PLACEHOLDER, expression.strip().rstrip("."))


def to_loc_text(text: str, text_boxes: bool = True) -> str:
    """Every box placeholder (and, with `text_boxes`, every "[x1, y1, x2, y2]" text box) -> `<loc>`."""
    text = text.replace(BOXES_PLACEHOLDER, LOC_TOKEN).replace(MASKS_PLACEHOLDER, LOC_TOKEN)
    return TEXT_BOX.sub(LOC_TOKEN, text) if text_boxes else text
