"""Reference log-probs computed once with a frozen model, stored in the samples for `reference: precomputed`.

`PreferenceModule(reference="precomputed")` reads `labels["ref_logp_<response>"]` (through
`PreferenceEncoder`) instead of running a frozen reference copy every step. `reference_logps` computes
them with exactly the code path the copy-mode module uses (`PreferenceEncoder` batches and
`batch_reference_logps`), and `with_reference` stores them. tools/precompute_reference.py is the CLI.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch

from vlsafe.data.encoding.processor import VLMProcessor
from vlsafe.data.schema import Sample, SampleError
from vlsafe.methods.preference.encoding import PREFERENCE_RESPONSES, PreferenceEncoder
from vlsafe.methods.preference.module import batch_reference_logps

LABEL_PREFIX = "ref_logp_"


def label_name(response: str) -> str:
    return f"{LABEL_PREFIX}{response}"


def check_responses(responses: Sequence[str]) -> tuple[str, ...]:
    responses = tuple(responses)
    if responses[:2] != ("chosen", "rejected") or set(responses) - set(PREFERENCE_RESPONSES) \
            or len(set(responses)) != len(responses):
        raise ValueError(f"responses must be 'chosen rejected' optionally followed by 'blind', got {list(responses)}")
    return responses


@torch.no_grad()
def reference_logps(vlm, processor: VLMProcessor, samples: Sequence[Sample],
                    responses: Sequence[str] = ("chosen", "rejected"), batch_size: int = 8, average: bool = False,
                    on_sample_error: Callable[[SampleError], None] | None = None, response_format: str = "released",
                    length_rule: str = "released") -> list[dict[str, float] | None]:
    """`{"ref_logp_chosen": ..., "ref_logp_rejected": ...[, "ref_logp_blind": ...]}` per sample, in order.

    Log-probs are sums over the response tokens (means with `average=True`, which must match the training
    run's `average_logprob`); `response_format` and `length_rule` must match it too (they decide which tokens
    are scored). A sample the encoder rejects raises `SampleError`, or, with `on_sample_error`, is reported
    there and gets `None` (so does a pair the length rule leaves out).
    """

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    responses = check_responses(responses)
    encoder = PreferenceEncoder(processor, responses, response_format=response_format, length_rule=length_rule)
    device = next(vlm.parameters()).device
    encoded: list[dict | None] = []
    for sample in samples:
        try:
            encoded.append(encoder.encode(sample))
        except SampleError as err:
            if on_sample_error is None:
                raise
            on_sample_error(err)
            encoded.append(None)
    usable = [i for i, item in enumerate(encoded) if item is not None]
    out: list[dict[str, float] | None] = [None] * len(encoded)
    for start in range(0, len(usable), batch_size):
        rows = usable[start:start + batch_size]
        batch = encoder.collate([encoded[i] for i in rows])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        values = batch_reference_logps(vlm, batch, average).float().cpu()  # (k, B)
        for column, i in enumerate(rows):
            out[i] = {label_name(name): float(values[r, column]) for r, name in enumerate(responses)}
    return out


def with_reference(sample: Sample, logps: dict[str, float], provenance: dict | None = None) -> Sample:
    """A copy of `sample` with the `ref_logp_*` labels set (and `meta["reference"] = provenance` if given)."""
    out = copy.deepcopy(sample)
    out.labels = {**out.labels, **logps}
    if provenance is not None:
        out.meta = {**out.meta, "reference": provenance}
    return out
