"""Where `<loc>` lives in a batch: writing box embeddings over its token embeddings, and finding the
hidden states the decoders read.

Both follow the batch-major order of `(input_ids == loc_id).nonzero()`: row 0's `<loc>`s left to right,
then row 1's, ... which is the order the encoders list `loc_boxes` in, for left or right padding alike.
"""
from __future__ import annotations

import torch

from vlsafe.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlsafe.methods.perception.heads import LocContext


def splice_loc_embeddings(embeddings: torch.Tensor, input_ids: torch.Tensor, loc_token_id: int,
                          loc_embeddings: torch.Tensor) -> torch.Tensor:
    """Replace the embedding at every `<loc>` position with the next row of `loc_embeddings` (B, T, H)."""
    mask = input_ids == loc_token_id
    count = int(mask.sum())
    if loc_embeddings.shape[0] != count:
        raise ValueError(f"{count} <loc> token(s) in the batch but {loc_embeddings.shape[0]} box embedding(s); "
                         f"every <loc> needs exactly one box")
    if count == 0:
        return embeddings
    return embeddings.masked_scatter(mask.unsqueeze(-1), loc_embeddings.to(embeddings.dtype))


def loc_positions(input_ids: torch.Tensor, loc_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of every `<loc>` in batch-major order."""
    rows, cols = (input_ids == loc_token_id).nonzero(as_tuple=True)
    return rows, cols


def target_loc_hidden(hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                      loc_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states that *predict* each supervised `<loc>` (position - 1), and which `<loc>`s those are.

    Returns `(states (T, H), is_target (L,))` where L counts every `<loc>` and T the supervised ones. The
    state at position - 1 is the one whose LM head emits `<loc>`, so at generation time the same state is
    available the moment `<loc>` is chosen.
    """
    rows, cols = loc_positions(input_ids, loc_token_id)
    is_target = labels[rows, cols] != IGNORE_INDEX
    if bool((cols[is_target] == 0).any()):
        raise ValueError("a supervised <loc> is the first token of its row; nothing precedes it to decode from")
    return hidden[rows[is_target], cols[is_target] - 1], is_target


def text_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) True at the text a `<loc>` refers to: real tokens after the row's last image slot (all real
    tokens in a row without images).

    Why not the whole prompt: the system prompt before the image is the same in every sample, and the
    decoder's attention, uniform at first, would spread over ~30 constant tokens and find the few words
    that name the object (a colour, a shape) only slowly. In LLaVA-style prompts the question follows its
    image, so this keeps the question and the answer so far.
    """
    image = input_ids == IMAGE_TOKEN_INDEX
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    last_image = torch.where(image.any(1), (columns * image).amax(1), -1)
    return attention_mask.bool() & (columns.unsqueeze(0) > last_image.unsqueeze(1))


def target_loc_context(hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor, loc_token_id: int) -> LocContext:
    """For each supervised `<loc>` (the order of `target_loc_hidden`): the text states before it.

    These are exactly the states a generating model holds when it emits that `<loc>` (prompt and answer
    so far), so the decoder reads the question the same way in training and generation.
    """
    rows, cols = loc_positions(input_ids, loc_token_id)
    is_target = labels[rows, cols] != IGNORE_INDEX
    rows, cols = rows[is_target], cols[is_target]
    length = int(cols.max()) if cols.numel() else 0
    before = torch.arange(length, device=input_ids.device).unsqueeze(0) < cols.unsqueeze(1)
    valid = text_positions(input_ids, attention_mask)[rows, :length] & before
    return LocContext(hidden[rows, :length], valid)
