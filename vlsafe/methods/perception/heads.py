"""The perception heads around the LLM: box decoder, box encoder and mask decoder.

Box decoder (`box_decoder` setting of `PerceptionHeads`):
- `"image"` (default; our departure from the released method): a learned box token joins the mask
  decoder's two-way transformer (tokens = [mask, box, prompt]), so the `<loc>` state prompts it exactly as
  it prompts the mask. The box is read off the decoder's soft mask (`occupancy_box`: column/row occupancy
  gives extent and centre) and refined by a zero-initialised MLP on the box token (`ImageBoxHead`).
  Why: the released head needs the LLM's hidden state itself to carry coordinates, which a pretrained
  Shikra/LLaVA LLM does after its grounding pretraining, but a tiny random-init LLM does not learn in
  minutes: on the CPU demo it stayed at the mean box while the mask, which reads the patches, learned.
  Other image reads were tried on one-object scenes (120 steps, held-out Acc@0.5 / box IoU): a
  DETR-style MLP on the box token 0.00 / 0.13, the box token's attention centre and spread 1.00 / 0.79,
  this read-out 1.00 / 0.94. Rows with no image fall back to the hidden-state MLP.
- `"mlp"`: the released head, an MLP on the `<loc>` hidden state (sigmoid cx, cy, w, h).

Mask decoder design (ours, smaller than the released SAM decoder, for the reasons below):
- Inputs: the `<loc>` hidden state (mapped to a prompt token) and the vision tower's patch features, plus
  optionally the image pixels. `vision_features="select_layer"`: the same features the projector reads;
  `"merged"` (released): a learned softmax merge of the tower's layers from the same pass
  (`vlsafe.methods.perception.features`). Either way there is no second tower run.
- The query tokens (a learned mask token, the box token with `box_decoder="image"`, and the prompt) go
  through `depth` two-way attention blocks in the SAM pattern (token self-attention, token->image
  cross-attention, MLP, image->token cross-attention) with a fixed 2-D sin-cos position code on the image
  side, then a final token->image attention.
- The updated image grid is upsampled 4x by two transposed convolutions; a hypernetwork MLP turns the
  mask token into per-channel weights, and the mask logits are their dot product with the upsampled map.
- `pixel_skip`: a two-layer convolution on the full-resolution pixels joins the upsampled map before the
  dot product. It stands in for the released code's second, stride-8 CLIP pass: a patch grid (24x24 at
  336 px, 8x8 in the tiny demo model) cannot place mask edges more finely than a patch, and a few
  convolutions on the pixels restore that detail at a fraction of a second ViT pass.
- `read_question` (off by default; our addition): the question's LLM states (text after the image, up to the
  `<loc>`) join the query tokens, padded ones masked out of every attention. On the CPU demo the `<loc>` state
  of a tiny random LLM does not say which of several objects is meant, and without this the mask covered all
  of them (docs/perception.md, "Choosing the referred object").
- Width `dim` is a setting (256 by default) instead of SAM's fixed 1024: the decoder reads a 24x24 grid,
  not SAM's 64x64 image embedding, and the width is what dominates its cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from vlsafe.data.grounding import cxcywh_to_xyxy
from vlsafe.methods.perception.features import (
    VISION_FEATURES,
    LayerMerge,
    VisionFeatures,
    merged_state_count,
)


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them and nothing after the last."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class BoxDecoder(nn.Module):
    """`<loc>` hidden state -> normalised xyxy box.

    The MLP predicts sigmoid (cx, cy, w, h), converted to xyxy, so every prediction is a valid box
    (x2 >= x1) and GIoU is well defined from the first step. The last layer starts at zero, so the first
    prediction is the centred box (0.25, 0.25, 0.75, 0.75), as the released code's zero-init + sigmoid.
    """

    def __init__(self, llm_hidden: int, hidden_dim: int = 512, num_layers: int = 3):
        super().__init__()
        self.mlp = MLP(llm_hidden, hidden_dim, 4, num_layers)
        nn.init.zeros_(self.mlp.layers[-1].weight)
        nn.init.zeros_(self.mlp.layers[-1].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return cxcywh_to_xyxy(self.mlp(hidden).sigmoid())


class BoxEncoder(nn.Module):
    """Normalised xyxy box -> an LLM input embedding for the `<loc>` position (4 -> hidden -> llm_hidden)."""

    def __init__(self, llm_hidden: int, hidden_dim: int = 512, num_layers: int = 3):
        super().__init__()
        self.mlp = MLP(4, hidden_dim, llm_hidden, num_layers)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        return self.mlp(boxes)


def sincos_2d(dim: int, grid: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(grid * grid, dim) fixed 2-D sine-cosine position code (half the channels per axis)."""
    if dim % 4:
        raise ValueError(f"position-code width must be a multiple of 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    coords = torch.arange(grid, device=device, dtype=torch.float32)
    angles = coords[:, None] * freqs[None]  # (grid, quarter)
    axis = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (grid, dim / 2)
    ys, xs = torch.meshgrid(torch.arange(grid, device=device), torch.arange(grid, device=device), indexing="ij")
    return torch.cat([axis[ys.flatten()], axis[xs.flatten()]], dim=-1).to(dtype)


class TwoWayBlock(nn.Module):
    """SAM's two-way block: tokens attend to themselves and to the image, then the image to the tokens."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.token_to_image = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.image_to_token = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))

    def forward(self, tokens: torch.Tensor, image: torch.Tensor, pos: torch.Tensor,
                ignore: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`ignore` (N, Q) marks padded query tokens, which no attention reads."""
        tokens = self.norms[0](tokens + self.self_attn(tokens, tokens, tokens, key_padding_mask=ignore,
                                                       need_weights=False)[0])
        keys = image + pos
        tokens = self.norms[1](tokens + self.token_to_image(tokens, keys, image, need_weights=False)[0])
        tokens = self.norms[2](tokens + self.mlp(tokens))
        image = self.norms[3](image + self.image_to_token(keys, tokens, tokens, key_padding_mask=ignore,
                                                          need_weights=False)[0])
        return tokens, image


@dataclass
class DecoderState:
    """The mask decoder's query tokens (N, Q, dim) and updated image grid (N, grid * grid, dim)."""

    tokens: torch.Tensor
    image: torch.Tensor
    grid: int


@dataclass
class LocContext:
    """The question each `<loc>` answers: LLM hidden states (N, L, llm_hidden) and which positions count (N, L):
    real text after the row's last image and before the `<loc>` (`vlsafe.methods.perception.splice.text_positions`)."""

    states: torch.Tensor
    valid: torch.Tensor

    def rows(self, index: torch.Tensor) -> "LocContext":
        return LocContext(self.states[index], self.valid[index])


@dataclass
class MaskDecoderSettings:
    """Size of the mask decoder; see the module docstring for the design."""

    dim: int = 256
    heads: int = 8
    depth: int = 2
    mlp_dim: int = 1024
    pixel_skip: bool = True
    pixel_channels: int = 16
    read_question: bool = False  # the question's states join the query tokens (module docstring)
    question_layer: int = -1     # which LLM layer's states (an index into `hidden_states`; -1 = last)
    vision_features: VisionFeatures = "select_layer"  # or "merged": released learned layer merge (vlsafe.methods.perception.features)


class MaskDecoder(nn.Module):
    """(`<loc>` hidden, patch features[, pixels]) -> mask logits (N, out_size, out_size) in the square frame.

    With `box_token=True` a second learned query rides along and `boxes()` decodes it into an xyxy box, so
    the box reads the image through the same attention as the mask.
    """

    def __init__(self, llm_hidden: int, vision_hidden: int, out_size: int, settings: MaskDecoderSettings | None = None,
                 box_token: bool = False, box_hidden: int = 512, box_layers: int = 3):
        super().__init__()
        s = settings or MaskDecoderSettings()
        if s.dim % 4:
            raise ValueError(f"mask decoder dim must be a multiple of 4, got {s.dim}")
        self.settings, self.out_size = s, out_size
        self.prompt = nn.Linear(llm_hidden, s.dim)
        self.question = nn.Linear(llm_hidden, s.dim) if s.read_question else None
        self.mask_token = nn.Parameter(torch.randn(1, 1, s.dim) * 0.02)
        self.image_in = nn.Sequential(nn.LayerNorm(vision_hidden), nn.Linear(vision_hidden, s.dim))
        self.blocks = nn.ModuleList(TwoWayBlock(s.dim, s.heads, s.mlp_dim) for _ in range(s.depth))
        self.final_attn = nn.MultiheadAttention(s.dim, s.heads, batch_first=True)
        self.final_norm = nn.LayerNorm(s.dim)
        channels = s.dim // 4
        self.upscale = nn.Sequential(
            nn.ConvTranspose2d(s.dim, s.dim // 2, 2, stride=2), nn.GroupNorm(1, s.dim // 2), nn.GELU(),
            nn.ConvTranspose2d(s.dim // 2, channels, 2, stride=2), nn.GELU())
        if s.pixel_skip:
            self.pixels = nn.Sequential(nn.Conv2d(3, s.pixel_channels, 3, padding=1), nn.GELU(),
                                        nn.Conv2d(s.pixel_channels, s.pixel_channels, 3, padding=1), nn.GELU())
            self.fuse = nn.Sequential(nn.Conv2d(channels + s.pixel_channels, channels, 1), nn.GELU(),
                                      nn.Conv2d(channels, channels, 3, padding=1))
        self.hyper = MLP(s.dim, s.dim, channels, 3)
        self.box_token = nn.Parameter(torch.randn(1, 1, s.dim) * 0.02) if box_token else None
        self.box_head = ImageBoxHead(s.dim, box_hidden, box_layers) if box_token else None

    def forward(self, hidden: torch.Tensor, patch_features: torch.Tensor,
                pixel_values: torch.Tensor | None = None, question: LocContext | None = None) -> torch.Tensor:
        """`hidden` (N, llm_hidden), `patch_features` (N, P, vision_hidden) with P a square grid,
        `pixel_values` (N, 3, S, S) when `pixel_skip` is on, `question` when `read_question` is on."""
        return self.masks(self.attend(hidden, patch_features, question), pixel_values)

    def attend(self, hidden: torch.Tensor, patch_features: torch.Tensor,
               question: LocContext | None = None) -> DecoderState:
        """Run the two-way transformer once; masks and boxes are both read from its result."""
        n, num_patches, _ = patch_features.shape
        grid = int(math.isqrt(num_patches))
        if grid * grid != num_patches:
            raise ValueError(f"mask decoder needs a square patch grid, got {num_patches} patches")
        dtype = self.prompt.weight.dtype
        image = self.image_in(patch_features.to(dtype))
        pos = sincos_2d(self.settings.dim, grid, image.device, image.dtype).unsqueeze(0)
        queries = [self.mask_token.expand(n, -1, -1)]
        if self.box_token is not None:
            queries.append(self.box_token.expand(n, -1, -1))
        queries.append(self.prompt(hidden.to(dtype)).unsqueeze(1))
        ignore = None
        if self.question is not None:
            if question is None:
                raise ValueError("this mask decoder has read_question=True and needs the question's hidden states")
            queries.append(self.question(question.states.to(dtype)))
            fixed = torch.zeros(n, len(queries) - 1, dtype=torch.bool, device=image.device)
            ignore = torch.cat([fixed, ~question.valid.to(image.device)], dim=1)
        tokens = torch.cat(queries, dim=1)
        for block in self.blocks:
            tokens, image = block(tokens, image, pos, ignore)
        tokens = self.final_norm(tokens + self.final_attn(tokens, image + pos, image, need_weights=False)[0])
        return DecoderState(tokens, image, grid)

    def boxes(self, state: DecoderState, mask_logits: torch.Tensor) -> torch.Tensor:
        """(N, 4) normalised xyxy boxes from the box token and these states' mask logits (needs `box_token`)."""
        if self.box_head is None:
            raise ValueError("this mask decoder was built without a box token (box_decoder='mlp')")
        return self.box_head(state.tokens[:, 1], mask_logits)

    def masks(self, state: DecoderState, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """(N, out_size, out_size) mask logits from the mask token and the updated image grid."""
        tokens, image, grid = state.tokens, state.image, state.grid
        n, dtype = tokens.shape[0], tokens.dtype
        features = self.upscale(image.transpose(1, 2).reshape(n, -1, grid, grid))
        if self.settings.pixel_skip:
            if pixel_values is None:
                raise ValueError("this mask decoder has pixel_skip=True and needs the image pixels")
            pixels = pixel_values.to(dtype)
            features = F.interpolate(features, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
            features = self.fuse(torch.cat([features, self.pixels(pixels)], dim=1))
        weights = self.hyper(tokens[:, 0])
        logits = torch.einsum("nc,nchw->nhw", weights, features)
        if logits.shape[-1] != self.out_size:
            logits = F.interpolate(logits.unsqueeze(1).float(), size=(self.out_size, self.out_size), mode="bilinear",
                                   align_corners=False).squeeze(1)
        return logits


def occupancy_box(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre (N, 2) and size (N, 2), normalised (x, y), of soft masks `probs` (N, S, S) in [0, 1].

    A column's occupancy is its largest probability; the box width is the summed occupancy of the columns
    and the centre their occupancy-weighted mean (rows likewise). For a binary mask of one connected object
    this is exactly its bounding box, and it stays differentiable for soft masks.
    """
    side = probs.shape[-1]
    coords = (torch.arange(side, device=probs.device, dtype=probs.dtype) + 0.5) / side
    columns, rows = probs.amax(dim=1), probs.amax(dim=2)  # (N, S) over x, over y
    occupancy = torch.stack([columns, rows], dim=1)  # (N, 2, S)
    size = occupancy.sum(-1) / side
    centre = (occupancy * coords).sum(-1) / occupancy.sum(-1).clamp_min(1e-6)
    return centre, size


class ImageBoxHead(nn.Module):
    """Box token + the decoder's mask logits -> normalised xyxy box.

    The box is first read off the soft mask (`occupancy_box`), then a zero-initialised MLP on the box token
    refines centre and size (log scale). Reading the box off the mask ties it to the one spatial map that
    gets dense supervision, and box losses still reach the map when a sample has no mask. Why not regress
    four numbers from the token, DETR-style: that learns far too slowly on CPU budgets.
    """

    def __init__(self, dim: int, hidden_dim: int = 512, num_layers: int = 3):
        super().__init__()
        self.refine = MLP(dim, hidden_dim, 4, num_layers)
        nn.init.zeros_(self.refine.layers[-1].weight)
        nn.init.zeros_(self.refine.layers[-1].bias)

    def forward(self, token: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        centre, size = occupancy_box(mask_logits.float().sigmoid())
        delta = self.refine(token).float()
        centre = centre + 0.1 * delta[:, :2]
        size = size * delta[:, 2:].clamp(max=4).exp()
        return torch.cat([centre - size / 2, centre + size / 2], dim=-1).clamp(0, 1).to(token.dtype)


BoxDecoderKind = Literal["image", "mlp"]
BOX_DECODERS: tuple[str, ...] = get_args(BoxDecoderKind)


@dataclass
class DecodedLocs:
    """What the heads read at a batch of `<loc>` states: one box per state, and mask logits for `mask_rows`."""

    boxes: torch.Tensor
    mask_logits: torch.Tensor | None
    mask_rows: torch.Tensor | None


class PerceptionHeads(nn.Module):
    """Everything PerceptionGPT adds around the LLM, in one module (so it has one learning rate group).

    `box_decoder`: `"image"` (box token in the mask decoder) or `"mlp"` (released: MLP on the hidden state);
    see the module docstring. `decode` is the one place training and generation turn `<loc>` states into
    boxes and masks, so both always agree.
    """

    def __init__(self, llm_hidden: int, vision_hidden: int, mask_size: int, box_hidden: int = 512,
                 box_layers: int = 3, mask: MaskDecoderSettings | None = None, box_decoder: BoxDecoderKind = "image",
                 vision_layers: int | None = None):
        super().__init__()
        if box_decoder not in BOX_DECODERS:
            raise ValueError(f"box_decoder must be one of {BOX_DECODERS}, got {box_decoder!r}")
        source = (mask or MaskDecoderSettings()).vision_features
        if source not in VISION_FEATURES:
            raise ValueError(f"mask_decoder.vision_features must be one of {VISION_FEATURES}, got {source!r}")
        if source == "merged" and not vision_layers:
            raise ValueError("mask_decoder.vision_features='merged' needs the tower's block count (vision_layers)")
        # released: learned softmax weights over the tower's hidden_states[:-1] (vlsafe.methods.perception.features)
        self.layer_merge = LayerMerge(merged_state_count(vision_layers)) if source == "merged" else None
        self.box_source = box_decoder
        self.box_decoder = BoxDecoder(llm_hidden, box_hidden, box_layers)
        self.box_encoder = BoxEncoder(llm_hidden, box_hidden, box_layers)
        self.mask_decoder = MaskDecoder(llm_hidden, vision_hidden, mask_size, mask, box_token=box_decoder == "image",
                                        box_hidden=box_hidden, box_layers=box_layers)

    def decode(self, hidden: torch.Tensor, images: torch.Tensor, vision: torch.Tensor | None,
               pixel_values: torch.Tensor | None, want_masks: torch.Tensor | bool = True,
               question: LocContext | None = None) -> DecodedLocs:
        """Boxes and masks for `<loc>` states `hidden` (N, H).

        `images[i]` is the index in `vision` / `pixel_values` of state i's image (-1: none; then the box
        comes from the hidden-state MLP and no mask is made). `want_masks`: a bool or an (N,) bool mask of
        the states whose mask logits are returned (with `box_decoder="mlp"` the others skip the mask
        decoder; with `"image"` every imaged state needs its mask for the box anyway). `question`: the
        states that preceded each `<loc>` (one row per state), read when `read_question` is on.
        """
        n = hidden.shape[0]
        images = images.to(hidden.device)
        has_image = images >= 0 if vision is not None else torch.zeros(n, dtype=torch.bool, device=hidden.device)
        want = torch.as_tensor(want_masks, device=hidden.device).expand(n) & has_image
        needs_mask = has_image if self.box_source == "image" else want
        boxes = self.box_decoder(hidden)
        mask_logits = mask_rows = None
        if bool(needs_mask.any()):
            rows = needs_mask.nonzero().squeeze(-1)
            picked = images[rows]
            state = self.mask_decoder.attend(hidden[rows], vision[picked],
                                             question.rows(rows) if question is not None else None)
            logits = self.mask_decoder.masks(state, pixel_values[picked] if pixel_values is not None else None)
            if self.box_source == "image":
                boxes = boxes.index_put((rows,), self.mask_decoder.boxes(state, logits).to(boxes.dtype))
            keep = want[rows]
            if bool(keep.any()):
                mask_logits, mask_rows = logits[keep], rows[keep]
        return DecodedLocs(boxes, mask_logits, mask_rows)
