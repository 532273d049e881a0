"""How a preference pair becomes the token ids that are scored, and what a too-long pair becomes.

Response formats (`PreferenceModule(response_format=...)`):
- `released` (MMSafe-PO, `data_utils_ppo.py:211-249` + `data_utils_dpo.py:209-228`): the query is the prompt
  rendered with an assistant turn of "\\n" and its last two tokens ("\\n", "</s>") cut, so it ends with the
  template's separator after "ASSISTANT:" (LLaMA: "ASSISTANT:" then a lone "▁"); the response is the text
  tokenised on its own with the BOS cut (`tok(text)[1:]`), and no EOS is appended or scored. vlsafe renders
  that query as the generation prompt plus the separator, and tokenises the response without the BOS
  (`add_bos` processors drop it as `[1:]` does): the same ids for LLaMA's tokenizer.
- `template`: the chat template's own assistant turn, " " + response + "</s>", EOS scored (what SFT trains).

Length rules (`length_rule=...`):
- `released` (`data_utils_dpo.py:226-241`, `QueryChosenRejectedResponseDataset2`): with budget
  `max_length - num_image_tokens` (768 - 576 = 192) and each image counted as one token as in the released
  query, a pair is kept when `query + response < budget`; a chosen response that does not fit drops the pair,
  a rejected (or blind) one is cut to fit. A sequence never exceeds `max_length` either.
- `truncate`: every sequence is cut at `max_length` (the processor's SFT rule), chosen included.
A pair with no room for a response (prompt too long) or with a chosen over the limit under `released` is left
out (`SampleLeftOut`: counted and reported, never fatal); a cut response is reported through `truncated`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from vlsafe.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlsafe.data.encoding.encoders import ImageEncoding, split_reference, stack_images
from vlsafe.data.encoding.processor import VLMProcessor
from vlsafe.data.schema import Sample, SampleError, SampleLeftOut, is_blank

ResponseFormat = Literal["released", "template"]
LengthRule = Literal["released", "truncate"]
RESPONSE_FORMATS: tuple[str, ...] = get_args(ResponseFormat)
LENGTH_RULES: tuple[str, ...] = get_args(LengthRule)
CHOSEN = "chosen"


@dataclass
class PairTokens:
    """A prompt and its responses as (input ids, labels) sequences, and which responses the length rule cut."""

    sequences: dict[str, tuple[list[int], list[int]]]
    truncated: list[str] = field(default_factory=list)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")
    return value


def query_separator(processor: VLMProcessor, messages: list[dict[str, str]]) -> str:
    """What the template puts between the generation prompt and the answer (vicuna_v1: one space).

    Found as the released code finds it: render an assistant turn of "\\n" and keep what precedes the "\\n"."""
    template = processor.template
    bos = processor.tokenizer.bos_token or ""
    prompt = template.prompt_text(messages, eos=processor.eos, bos=bos, add_generation_prompt=True)
    full = template.prompt_text(messages + [{"role": "assistant", "content": "\n"}], eos=processor.eos, bos=bos,
                                add_generation_prompt=False)
    if not full.startswith(prompt) or "\n" not in full[len(prompt):]:
        raise ValueError(f"template {template.name!r}: the generation prompt is not a prefix of an answered turn")
    rest = full[len(prompt):]
    return rest[:rest.index("\n")]


def _released(processor: VLMProcessor, messages: list[dict[str, str]], texts: dict[str, str],
              sample_id: str) -> tuple[list[int], dict[str, list[int]], dict[str, list[int]]]:
    segments = processor._segments(messages, sample_id, add_generation_prompt=True)
    prompt, _ = processor._tokenize_segments(segments + [(query_separator(processor, messages), False)], sample_id)
    responses = {}
    for name, text in texts.items():
        ids, _ = processor._tokenize_segments([(text, True)], sample_id)
        responses[name] = ids[1:] if processor.add_bos else ids  # `tok(text)[1:]`: the BOS is not scored
    return prompt, responses, dict(responses)


def _template(processor: VLMProcessor, messages: list[dict[str, str]], texts: dict[str, str],
              sample_id: str) -> tuple[list[int], dict[str, list[int]], dict[str, list[int]]]:
    prompt, _ = processor._tokenize_segments(processor._segments(messages, sample_id, add_generation_prompt=True),
                                             sample_id)
    responses, labels = {}, {}
    for name, text in texts.items():
        turn = messages + [{"role": "assistant", "content": text}]
        ids, full_labels = processor._tokenize_segments(processor._segments(turn, sample_id, False), sample_id)
        if ids[:len(prompt)] != prompt:
            raise SampleError(sample_id, name, "the prompt tokenises differently once the answer follows it; "
                                               "its response tokens cannot be told apart")
        responses[name], labels[name] = ids[len(prompt):], full_labels[len(prompt):]
    return prompt, responses, labels


def response_room(processor: VLMProcessor, prompt: list[int], rule: str) -> int:
    """How many response tokens fit after `prompt` under `rule`."""
    room = processor.max_length - len(prompt)
    if rule == "released":
        images = sum(1 for i, t in enumerate(prompt) if t == IMAGE_TOKEN_INDEX
                     and (i == 0 or prompt[i - 1] != IMAGE_TOKEN_INDEX))
        query = len(prompt) - prompt.count(IMAGE_TOKEN_INDEX) + images  # an image is one token in the released query
        room = min(room, processor.max_length - processor.num_image_tokens - 1 - query)  # query + response < budget
    return room


def encode_pair(processor: VLMProcessor, messages: list[dict[str, str]], texts: dict[str, str], sample_id: str,
                response_format: str = "released", length_rule: str = "released") -> PairTokens:
    """The scored sequences of one preference sample: prompt + response ids, labels on the response only."""
    build = _released if response_format == "released" else _template
    prompt, responses, labels = build(processor, messages, texts, sample_id)
    room = response_room(processor, prompt, length_rule)
    if room < 1:
        raise SampleLeftOut(sample_id, "messages", f"left out: the prompt leaves no room for a response "
                                                   f"({_limit(processor, length_rule)})")
    out, truncated = {}, []
    for name, ids in responses.items():
        if len(ids) > room:
            if name == CHOSEN and length_rule == "released":
                raise SampleLeftOut(sample_id, CHOSEN, f"left out: {len(ids)} response tokens, {room} fit "
                                                       f"({_limit(processor, length_rule)})")
            ids, truncated = ids[:room], truncated + [name]
        response_labels = labels[name][:len(ids)]
        if all(label == IGNORE_INDEX for label in response_labels):
            raise SampleLeftOut(sample_id, name, f"left out: no response token left to score "
                                                 f"({_limit(processor, length_rule)})")
        out[name] = (prompt + ids, [IGNORE_INDEX] * len(prompt) + response_labels)
    return PairTokens(out, truncated)


def _limit(processor: VLMProcessor, rule: str) -> str:
    if rule == "released":
        return (f"released rule: query + response < max_length {processor.max_length} - "
                f"{processor.num_image_tokens} image tokens")
    return f"max_length {processor.max_length}"


PREFERENCE_RESPONSES = ("chosen", "rejected", "blind")


class PreferenceEncoder(ImageEncoding):
    """Preference pairs: one prompt, several responses, labels on the final response only.

    A batch holds the sequences grouped by response (all chosen, then all rejected, then all blind),
    right-padded together, plus each sample's images once. Reference log-probs stored in the sample
    (`labels["ref_logp_<response>"]`, written by tools/precompute_reference.py) ride along when present.
    """

    def __init__(self, processor: VLMProcessor, responses: tuple[str, ...] = ("chosen", "rejected"),
                 require_reference: bool = False, average_logprob: bool = False,
                 response_format: str = "released", length_rule: str = "released"):
        unknown = set(responses) - set(PREFERENCE_RESPONSES)
        if unknown or responses[:2] != ("chosen", "rejected"):
            raise ValueError(f"responses must start with ('chosen', 'rejected') and use {PREFERENCE_RESPONSES}")
        self.processor = processor
        self.responses = tuple(responses)
        self.require_reference = require_reference
        self.average_logprob = average_logprob
        # which tokens are scored and what a too-long pair becomes: vlsafe/methods/preference/encoding.py
        self.response_format = check_choice("response_format", response_format, RESPONSE_FORMATS)
        self.length_rule = check_choice("length_rule", length_rule, LENGTH_RULES)

    def encode(self, sample: Sample) -> dict[str, Any]:
        messages, _ = split_reference(sample)
        texts = {}
        for name in self.responses:
            text = getattr(sample, name)
            if text is None or is_blank(text):
                raise SampleError(sample.id, name, "is missing; preference training needs it")
            texts[name] = text
        if texts["chosen"].strip() == texts["rejected"].strip():
            raise SampleError(sample.id, "rejected", "is identical to chosen; the pair carries no preference")
        self.processor.check_text_lengths(messages + [{"role": "assistant", "content": t} for t in texts.values()],
                                          sample.id)
        pair = encode_pair(self.processor, messages, texts, sample.id, self.response_format, self.length_rule)
        reference = {name: sample.labels.get(f"ref_logp_{name}") for name in self.responses}
        if self.require_reference:
            self._check_reference(sample, reference)
        return {"id": sample.id, "sequences": pair.sequences, "truncated": pair.truncated, "reference": reference,
                "meta": sample.meta, "pixel_values": self.pixels(sample)}

    def _check_reference(self, sample: Sample, reference: dict[str, float | None]) -> None:
        for name, value in reference.items():
            if value is None:
                raise SampleError(sample.id, f"labels.ref_logp_{name}", "is missing; reference='precomputed' needs "
                                                                        "shards written by tools/precompute_reference.py")
        provenance = sample.meta.get("reference") or {}
        written_with = provenance.get("average_logprob")
        if written_with is not None and bool(written_with) != self.average_logprob:
            raise SampleError(sample.id, "meta.reference.average_logprob",
                              f"reference log-probs were computed with average_logprob={written_with} but the "
                              f"module uses {self.average_logprob}")
        for name in ("response_format", "length_rule"):  # other scored tokens -> other log-probs
            if provenance.get(name) is not None and provenance[name] != getattr(self, name):
                raise SampleError(sample.id, f"meta.reference.{name}",
                                  f"reference log-probs were computed with {name}={provenance[name]!r} but the "
                                  f"module uses {getattr(self, name)!r}")

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [item["sequences"][name][0] for name in self.responses for item in items]
        labels = [item["sequences"][name][1] for name in self.responses for item in items]
        batch = self.processor.collate_text(ids, labels, "right")
        batch["pixel_values"] = stack_images(items, self.processor, self.normalize_images)
        batch["ids"] = [item["id"] for item in items]
        batch["responses"] = list(self.responses)
        # responses the length rule cut, per name: the module reports them at the end of the run
        batch["truncated_responses"] = {name: sum(name in item["truncated"] for item in items)
                                        for name in self.responses}
        values = [[item["reference"][name] for item in items] for name in self.responses]
        batch["ref_logps"] = (torch.tensor(values, dtype=torch.float32)
                              if all(v is not None for row in values for v in row) else None)
        return batch
