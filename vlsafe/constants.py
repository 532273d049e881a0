"""Values every layer agrees on. A leaf module: it imports nothing from vlsafe, so data, core and methods can
all use it without depending on each other."""
from __future__ import annotations

IGNORE_INDEX = -100
"""Label of a token that takes no loss (prompt, image, padding): PyTorch's `cross_entropy` default."""

IMAGE_TOKEN_INDEX = -200
"""LLaVA's sentinel id where the image features go; never a real vocabulary entry."""

IMAGE_PLACEHOLDER = "<image>"
"""Where a sample's text puts its image (LLaVA's `DEFAULT_IMAGE_TOKEN`)."""
