"""Decoding with the perception token: whenever `<loc>` is chosen, decode its box (and mask) from the
state that chose it and feed the *encoded box* as the next input instead of the token's embedding.

transformers' `generate` cannot swap an input embedding mid-decoding, so this is a small greedy/sampling
loop over the HF model with its KV cache (one LLM step per new token, like `generate`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from vlsafe.core.vlm import VLM, position_ids_from_mask
from vlsafe.methods.perception.features import perception_vision
from vlsafe.methods.perception.heads import LocContext, PerceptionHeads
from vlsafe.methods.perception.splice import splice_loc_embeddings, text_positions


@dataclass
class PerceptionOutput:
    """One generated answer: its token ids, and a box (normalised xyxy, square frame) per emitted `<loc>`,
    with mask logits (S, S) when the row has an image and masks were asked for."""

    token_ids: list[int] = field(default_factory=list)
    boxes: list[torch.Tensor] = field(default_factory=list)
    mask_logits: list[torch.Tensor | None] = field(default_factory=list)


def _cache_argument(llm: torch.nn.Module) -> str:
    """transformers >= 5.2x names the KV cache `cache`; older versions `past_key_values`."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    return torch.multinomial(probs, 1).squeeze(-1)


@torch.no_grad()
def generate_with_perception(vlm: VLM, heads: PerceptionHeads, loc_token_id: int, input_ids: torch.Tensor,
                             attention_mask: torch.Tensor, pixel_values: torch.Tensor | None,
                             loc_boxes: torch.Tensor, image_index: torch.Tensor, *, max_new_tokens: int,
                             eos_token_id: int, pad_token_id: int, do_sample: bool = False,
                             temperature: float = 1.0, decode_masks: bool = True) -> list[PerceptionOutput]:
    """Continue left-padded prompts. `loc_boxes` encode the prompt's own `<loc>`s (batch-major order);
    `image_index[b]` is row b's first image in `pixel_values` (-1: none, so no mask is decoded and the box
    comes from the hidden-state MLP). Boxes and masks come from `PerceptionHeads.decode`, as in training."""
    if input_ids.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("batched generation needs left padding (padding_side='left'): a prompt ends in padding")
    vision = features = None
    if pixel_values is not None and pixel_values.numel():
        pixel_values = vlm.vision.normalize(pixel_values)  # uint8 from the encoders; the pixel skip reads them too
        projected, vision = perception_vision(vlm, pixel_values, heads.layer_merge)
        features = vlm.project(projected)
    embeddings = vlm.embed(input_ids, features)
    embeddings = splice_loc_embeddings(embeddings, input_ids, loc_token_id, heads.box_encoder(loc_boxes))
    mask = attention_mask.clone()
    out = vlm.llm(inputs_embeds=embeddings, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                  use_cache=True, output_hidden_states=True, logits_to_keep=1)
    cache_argument = _cache_argument(vlm.llm)
    cache, logits, state = _returned_cache(out), out.logits[:, -1], out.hidden_states[-1][:, -1]
    batch = input_ids.shape[0]
    # what the decoder may read of the question: the prompt's text after its image, then each answer step
    # (`text_positions`, the same rule as training's `target_loc_context`)
    read_question = heads.mask_decoder.question is not None
    question_layer = heads.mask_decoder.settings.question_layer
    seen = out.hidden_states[question_layer] if read_question else None
    seen_valid = text_positions(input_ids, attention_mask) if read_question else None
    results = [PerceptionOutput() for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    embed_tokens = vlm.llm.get_input_embeddings()
    for _ in range(max_new_tokens):
        tokens = _next_tokens(logits, do_sample, temperature).masked_fill(finished, pad_token_id)
        step = embed_tokens(tokens)
        is_loc = (tokens == loc_token_id) & ~finished
        if bool(is_loc.any()):
            rows = is_loc.nonzero().squeeze(-1)
            question = LocContext(seen[rows], seen_valid[rows]) if read_question else None
            decoded = heads.decode(state[rows], image_index.to(rows.device)[rows], vision, pixel_values,
                                   want_masks=decode_masks, question=question)
            step[rows] = heads.box_encoder(decoded.boxes).to(step.dtype)
            masks: list[torch.Tensor | None] = [None] * len(rows)
            if decoded.mask_rows is not None:
                for k, value in zip(decoded.mask_rows.tolist(), decoded.mask_logits.float().cpu()):
                    masks[k] = value
            for row, box, mask_logits in zip(rows.tolist(), decoded.boxes.float().clamp(0, 1), masks):
                results[row].boxes.append(box.cpu())
                results[row].mask_logits.append(mask_logits)
        for row in (~finished).nonzero().squeeze(-1).tolist():
            results[row].token_ids.append(int(tokens[row]))
        finished |= tokens == eos_token_id
        if bool(finished.all()):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = (mask.long().sum(-1, keepdim=True) - 1)
        out = vlm.llm(inputs_embeds=step.unsqueeze(1), attention_mask=mask, position_ids=positions,
                      use_cache=True, output_hidden_states=True, **{cache_argument: cache})
        cache, logits, state = _returned_cache(out), out.logits[:, -1], out.hidden_states[-1][:, -1]
        if read_question:
            seen = torch.cat([seen, out.hidden_states[question_layer][:, -1:]], dim=1)
            seen_valid = torch.cat([seen_valid, ~finished.unsqueeze(1)], dim=1)
    return results

