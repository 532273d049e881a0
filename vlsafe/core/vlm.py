"""The shared VLM: vision tower -> projector -> image features spliced into a causal LM.

Sequences carry `IMAGE_TOKEN_INDEX` once per image *patch* (the processor expands each `<image>`
placeholder to `num_image_tokens` copies), so the sequence length, attention mask and labels are all
known when a batch is collated, and left or right padding needs no special casing here. The LLM sees
position ids computed from the attention mask, which makes logits independent of the padding side.

Packed rows (several samples per row, `vlsafe.data.encoding.packing`) come with `position_ids` that restart
at every sample start; attention is then kept inside each sample (`packed_attention_mask`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlsafe.constants import IMAGE_TOKEN_INDEX


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row matches its unpadded self."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


#: attention implementations that take the packed rows' 4-D block-diagonal mask (transformers passes a 4-D mask
#: through as given); "flash_attention_*" instead runs varlen attention from the position ids alone.
MASKED_ATTENTION = ("sdpa", "eager")


def packed_segments(position_ids: torch.Tensor) -> torch.Tensor:
    """(R, L) segment number of every token: a new segment starts wherever the position id is 0."""
    return (position_ids == 0).long().cumsum(-1)


def packed_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    """(R, 1, L, L) causal block-diagonal mask: a token attends to earlier tokens of its own sample only.

    Boolean (True = attend) for SDPA; `additive` gives 0 / dtype-min floats, which eager attention adds to its
    scores. Every token attends at least to itself, so no softmax row is empty (no NaN on the padding tail)."""
    segments = packed_segments(position_ids)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (segments.unsqueeze(-1) == segments.unsqueeze(-2)) & causal
    allowed = allowed.unsqueeze(1)
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


class VLM(nn.Module):
    """Vision tower + projector + LLM. Methods own losses; this module only computes logits.

    `forward` accepts precomputed `image_features` so that preference methods can encode an image
    once and reuse the features for the chosen, rejected and blind sequences.
    """

    def __init__(self, vision: nn.Module, projector: nn.Module, llm: nn.Module):
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.llm = llm

    # ------------------------------------------------------------------ properties
    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def llm_config(self) -> Any:
        return self.llm.config

    # ------------------------------------------------------------------ building blocks
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 images or normalised floats -> (N, num_image_tokens, vision_hidden), without
        autograd when the tower is frozen. The tower normalises uint8 input on its device."""
        vision_trainable = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and vision_trainable):
            return self.vision(pixel_values)

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        return self.projector(vision_features.to(self.projector_dtype))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, num_image_tokens, llm_hidden)."""
        return self.project(self.vision_features(pixel_values))

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features written over the `IMAGE_TOKEN_INDEX` positions.

        Features are consumed in batch-major order: all images of row 0 in placeholder order, then row 1.
        """
        image_mask = input_ids == IMAGE_TOKEN_INDEX
        embeddings = self.llm.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        n_slots = int(image_mask.sum())
        if image_features is None or image_features.numel() == 0:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image-token slots but no image features were given")
            if self.training and torch.is_grad_enabled():
                # Keep the projector in the graph on text-only batches (DDP expects every trainable
                # parameter to receive a gradient each step).
                dummy = torch.zeros(1, 1, self.vision.hidden_size, device=embeddings.device,
                                    dtype=self.projector_dtype)
                embeddings = embeddings + 0.0 * self.projector(dummy).sum().to(embeddings.dtype)
            return embeddings
        flat = image_features.reshape(-1, image_features.shape[-1]).to(embeddings.dtype)
        if flat.shape[0] != n_slots:
            raise ValueError(
                f"image features ({image_features.shape[0]} image(s) x {image_features.shape[1]} tokens = "
                f"{flat.shape[0]}) do not match the {n_slots} image-token slots in input_ids; a truncated "
                f"or mis-expanded <image> placeholder is the usual cause")
        return embeddings.masked_scatter(image_mask.unsqueeze(-1), flat)

    # ------------------------------------------------------------------ forward / generate
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, position_ids: torch.Tensor | None = None,
                **llm_kwargs: Any) -> Any:
        """Return the LLM output (`.logits`). `logits_to_keep` limits the LM head to some positions.

        `position_ids` marks packed rows (positions restart at each sample start): attention stays inside each
        sample and `attention_mask` only says which tokens are real."""
        if image_features is None and pixel_values is not None and pixel_values.numel():
            image_features = self.encode_images(pixel_values)
        embeddings = self.embed(input_ids, image_features)
        if position_ids is not None:
            return self._packed_forward(embeddings, position_ids, logits_to_keep, llm_kwargs)
        return self.llm(inputs_embeds=embeddings, attention_mask=attention_mask,
                        position_ids=position_ids_from_mask(attention_mask), logits_to_keep=logits_to_keep,
                        use_cache=False, **llm_kwargs)

    def _packed_forward(self, embeddings: torch.Tensor, position_ids: torch.Tensor,
                        logits_to_keep: int | torch.Tensor, llm_kwargs: dict[str, Any]) -> Any:
        """Packed rows: a 4-D block-diagonal mask for SDPA/eager; for flash attention all rows become one
        row of samples that transformers runs as varlen attention from the restarting position ids (it reads
        packing from position ids only for a batch of one row)."""
        implementation = str(getattr(self.llm.config, "_attn_implementation", None) or "eager")
        if implementation in MASKED_ATTENTION:
            mask = packed_attention_mask(position_ids, embeddings.dtype, additive=implementation == "eager")
            return self.llm(inputs_embeds=embeddings, attention_mask=mask, position_ids=position_ids,
                            logits_to_keep=logits_to_keep, use_cache=False, **llm_kwargs)
        if "flash" not in implementation:
            raise ValueError(f"packed rows need attn_implementation sdpa, eager or a flash attention kernel; the "
                             f"LLM uses {implementation!r} (turn packing off or change attn_implementation)")
        return self._varlen_forward(embeddings, position_ids, logits_to_keep, llm_kwargs)

    def _varlen_forward(self, embeddings: torch.Tensor, position_ids: torch.Tensor,
                        logits_to_keep: int | torch.Tensor, llm_kwargs: dict[str, Any]) -> Any:
        """All packed rows as one row, no mask: transformers reads the samples from the restarting position ids
        (flash attention: varlen kernels over cu_seqlens; SDPA/eager: a block mask it builds itself)."""
        rows, length = position_ids.shape
        if isinstance(logits_to_keep, torch.Tensor):
            offsets = torch.arange(rows, device=logits_to_keep.device).unsqueeze(-1) * length
            keep: int | torch.Tensor = (offsets + logits_to_keep.unsqueeze(0)).reshape(-1)
        elif logits_to_keep == 0:
            keep = 0
        else:
            raise ValueError("packed flash-attention rows take logits_to_keep as 0 or a tensor of positions")
        output = self.llm(inputs_embeds=embeddings.reshape(1, rows * length, -1), attention_mask=None,
                          position_ids=position_ids.reshape(1, -1), logits_to_keep=keep, use_cache=False,
                          **llm_kwargs)
        output.logits = output.logits.reshape(rows, -1, output.logits.shape[-1])
        return output

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                 **generate_kwargs: Any) -> torch.Tensor:
        """Continue left-padded prompts with transformers' `generate`; returns only the new tokens."""
        if input_ids.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("batched generation needs left padding (padding_side='left'): a prompt ends in padding")
        if image_features is None and pixel_values is not None and pixel_values.numel():
            image_features = self.encode_images(pixel_values)
        embeddings = self.embed(input_ids, image_features)
        return self.llm.generate(inputs_embeds=embeddings, attention_mask=attention_mask, **generate_kwargs)
