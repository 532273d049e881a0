"""Response log-probs with the prompt run once per sample instead of once per response.

In preference training every response of a sample (chosen, rejected, blind) follows the same prompt, and
in a VLM that prompt is most of the sequence (576 image tokens for LLaVA-1.5 against a few dozen response
tokens). Running the prompt once, keeping its key/value cache, and continuing each response from that cache
gives the same log-probs as the concatenated forward (gradients flow through the cache into the prompt)
at roughly 1/k of the prompt cost.

Responses differ in length far more than prompts do (a two-token refusal next to a twenty-token answer), so
they run in a few length buckets instead of one batch padded to the longest response: padded columns cost a
full forward and backward like real tokens.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache

from vlsafe.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlsafe.core.vlm import VLM
from vlsafe.methods.logprobs import response_logprobs

# What one more response forward costs, in padded token slots: per-layer launch/Python overhead, plus in the
# backward one more weight-gradient product and accumulation per weight. A split into length buckets must save
# more padded slots than this.
BUCKET_COST = 16


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


def shared_prompt_plan(batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Prompt and response extents of a `PreferenceEncoder` batch, or None when it lacks the shared-prompt
    shape (a sample's responses tokenise their prompt differently, left padding, an empty response, an image
    token inside a response). Decided before any forward, so sharded ranks can agree on it first."""
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
    sample = torch.arange(total, device=input_ids.device) % n  # sequences are group-major: row r is sample r % n
    starts = prompt_len[sample]
    lengths = mask.sum(1) - starts
    in_response = (torch.arange(width, device=input_ids.device)[None, :] >= starts[:, None]) & mask.bool()
    if bool((lengths < 1).any()) or bool(((input_ids == IMAGE_TOKEN_INDEX) & in_response).any()):
        return None
    return {"prompt_len": prompt_len, "sample": sample, "starts": starts, "lengths": lengths}


def shared_prompt_logps(vlm: VLM, batch: dict[str, Any], features: torch.Tensor | None,
                        average: bool = False, bucket_cost: float | None = BUCKET_COST,
                        plan: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
    """Log-probs of every response sequence of a `PreferenceEncoder` batch, shape (k * B,), group-major.

    `features` are the image features of the B samples (not repeated per response). Returns None when the
    batch does not have the shared-prompt shape (`shared_prompt_plan`), so the caller can fall back to the
    concatenated forward. Responses run in length buckets (`response_buckets`); `bucket_cost=None` runs them
    as one batch, which sharded training needs (every rank must run the same number of forwards).
    """
    plan = plan if plan is not None else shared_prompt_plan(batch)
    if plan is None:
        return None
    input_ids, labels = batch["input_ids"], batch["labels"]
    k = len(batch["responses"])
    total, width = input_ids.shape
    n = total // k
    prompt_len, sample, starts, lengths = plan["prompt_len"], plan["sample"], plan["starts"], plan["lengths"]

    # Prompts, left-padded so that every prompt ends at the same column and the cache continues from there.
    longest = int(prompt_len.max())
    columns = torch.arange(longest, device=input_ids.device)
    source = columns[None, :] - (longest - prompt_len)[:, None]
    prompt_mask = (source >= 0).long()
    prompt_ids = input_ids[:n, :longest].gather(1, source.clamp(min=0)).masked_fill(prompt_mask == 0, 0)
    embeddings = vlm.embed(prompt_ids, features)
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    prompt_out = vlm.llm(inputs_embeds=embeddings, attention_mask=prompt_mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
    cache = getattr(prompt_out, "cache", None) or prompt_out.past_key_values

    # Per layer (keys, values[, sliding window]): each bucket below continues from the rows it needs.
    prompt_kv = [(keys, values, *(extra for extra in rest if extra is not None)) for keys, values, *rest in cache]
    last_logits = prompt_out.logits[:, -1]

    # Each response row continues its sample's prompt. Rows are grouped by length so that a short answer is
    # not padded to the longest one in the batch (the padded columns would cost full forward and backward).
    embed = vlm.llm.get_input_embeddings()
    buckets = [list(range(total))] if bucket_cost is None else response_buckets(lengths.tolist(), bucket_cost)
    pieces, order = [], []
    for bucket in buckets:
        idx = torch.tensor(bucket, device=input_ids.device)
        span = int(lengths[idx].max())
        offsets = torch.arange(span, device=input_ids.device)
        index = (starts[idx, None] + offsets[None, :]).clamp(max=width - 1)
        valid = offsets[None, :] < lengths[idx, None]
        response_ids = input_ids[idx].gather(1, index).masked_fill(~valid, 0)
        targets = labels[idx].gather(1, index).masked_fill(~valid, IGNORE_INDEX)
        owners = sample[idx]
        bucket_cache = DynamicCache(ddp_cache_data=[(keys.index_select(0, owners), values.index_select(0, owners),
                                                     *extra) for keys, values, *extra in prompt_kv])
        full_mask = torch.cat([prompt_mask.index_select(0, owners), valid.long()], dim=1)
        # The last response position predicts nothing, so the LM head skips it.
        response_out = vlm.llm(inputs_embeds=embed(response_ids), attention_mask=full_mask,
                               position_ids=starts[idx, None] + offsets[None, :], use_cache=True,
                               logits_to_keep=offsets[:-1], **{_cache_argument(vlm.llm): bucket_cache})
        # The prompt's last position predicts the first response token; response position i predicts token i + 1.
        logits = torch.cat([last_logits.index_select(0, owners)[:, None], response_out.logits], dim=1)
        pieces.append(response_logprobs(logits, targets, IGNORE_INDEX, average=average))
        order.append(idx)
    return torch.cat(pieces)[torch.argsort(torch.cat(order))]


def response_buckets(lengths: list[int], bucket_cost: int = BUCKET_COST) -> list[list[int]]:
    """Rows grouped so that padded response slots plus `bucket_cost` per extra forward are fewest.

    Rows sorted by length are split into contiguous runs (an optimal split of sorted rows is always
    contiguous); each run pads to its own longest row. Dynamic programming over split points, O(rows^2).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for begin in range(end):
            cost = best[begin] + (end - begin) * sorted_lengths[end - 1] + bucket_cost
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    buckets, end = [], len(order)
    while end:
        buckets.append(order[cut[end]:end])
        end = cut[end]
    return buckets[::-1]
