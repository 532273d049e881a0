"""Response log-probs with the prompt run once per sample instead of once per response.

In preference training every response of a sample (chosen, rejected, blind) follows the same prompt, and
in a VLM that prompt is most of the sequence (576 image tokens for LLaVA-1.5 against a few dozen response
tokens). Running the prompt once, keeping its key/value cache, and continuing each response from that cache
gives the same log-probs as the concatenated forward (gradients flow through the cache into the prompt)
at roughly 1/k of the prompt cost.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from vlsafe.core.vlm import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VLM
from vlsafe.methods.losses import response_logprobs


def _cache_argument(llm: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version's forward takes."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _prompt_lengths(labels: torch.Tensor, k: int) -> torch.Tensor | None:
    """Per-sample prompt length (first supervised position), or None if a sample's responses disagree."""
    supervised = labels != IGNORE_INDEX
    if not bool(supervised.any(1).all()):
        return None
    starts = supervised.int().argmax(1).view(k, -1)
    return starts[0] if bool((starts == starts[0]).all()) else None


def shared_prompt_logps(vlm: VLM, batch: dict[str, Any], features: torch.Tensor | None,
                        average: bool = False) -> torch.Tensor | None:
    """Log-probs of every response sequence of a `PreferenceEncoder` batch, shape (k * B,), group-major.

    `features` are the image features of the B samples (not repeated per response). Returns None when the
    batch does not have the shared-prompt shape (a sample's responses tokenise their prompt differently), so
    the caller can fall back to the concatenated forward.
    """
    input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    k = len(batch["responses"])
    total, width = input_ids.shape
    n = total // k
    prompt_len = _prompt_lengths(labels, k)
    if prompt_len is None or bool((mask[:, :-1] < mask[:, 1:]).any()):  # needs right padding
        return None
    longest = int(prompt_len.max())
    rows = input_ids.view(k, n, width)[:, :, :longest]
    columns = torch.arange(longest, device=input_ids.device)
    in_prompt = columns[None, :] < prompt_len[:, None]
    if not bool(((rows == rows[0:1]) | ~in_prompt[None]).all()):
        return None

    # Prompts, left-padded so that every prompt ends at the same column and the cache continues from there.
    source = columns[None, :] - (longest - prompt_len)[:, None]
    prompt_mask = (source >= 0).long()
    prompt_ids = rows[0].gather(1, source.clamp(min=0)).masked_fill(prompt_mask == 0, 0)
    embeddings = vlm.embed(prompt_ids, features)
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    prompt_out = vlm.llm(inputs_embeds=embeddings, attention_mask=prompt_mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
    cache = getattr(prompt_out, "cache", None) or prompt_out.past_key_values

    # Responses in sample-major order (sample 0's k responses, then sample 1's ...) to match the repeated cache.
    order = torch.arange(total, device=input_ids.device).view(k, n).t().reshape(-1)
    starts = prompt_len.repeat_interleave(k)
    lengths = mask[order].sum(1) - starts
    span = int(lengths.max())
    offsets = torch.arange(span, device=input_ids.device)
    index = (starts[:, None] + offsets[None, :]).clamp(max=width - 1)
    valid = offsets[None, :] < lengths[:, None]
    response_ids = input_ids[order].gather(1, index).masked_fill(~valid, 0)
    if bool((response_ids == IMAGE_TOKEN_INDEX).any()):
        return None
    targets = labels[order].gather(1, index).masked_fill(~valid, IGNORE_INDEX)
    cache.batch_repeat_interleave(k)
    full_mask = torch.cat([prompt_mask.repeat_interleave(k, 0), valid.long()], dim=1)
    response_out = vlm.llm(inputs_embeds=vlm.llm.get_input_embeddings()(response_ids), attention_mask=full_mask,
                           position_ids=starts[:, None] + offsets[None, :], use_cache=True,
                           **{_cache_argument(vlm.llm): cache})
    # The prompt's last position predicts the first response token; response position i predicts token i + 1.
    logits = torch.cat([prompt_out.logits[:, -1:].repeat_interleave(k, 0), response_out.logits[:, :-1]], dim=1)
    logps = response_logprobs(logits, targets, IGNORE_INDEX, average=average)
    return logps[torch.argsort(order)]
