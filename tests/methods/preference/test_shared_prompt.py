"""Running the prompt once and continuing each response from its cache must not change the numbers."""
import pytest
import torch

from vlsafe.core.lora import LoraSettings
from vlsafe.data.synthetic.world import WorldConfig, generate
from vlsafe.methods.logprobs import sequence_logps
from vlsafe.methods.preference.encoding import PreferenceEncoder
from vlsafe.methods.preference.module import PreferenceModule
from vlsafe.methods.preference.shared_prompt import (
    response_buckets,
    shared_prompt_logps,
)


def _batch(module, responses, n=5, response_format="released"):
    samples = list(generate(n, seed=3, kinds=["preference"], cfg=WorldConfig(image_size=64), split="t"))
    encoder = PreferenceEncoder(module.processor, responses, response_format=response_format)
    return encoder.collate([encoder.encode(s) for s in samples])


def _response_lengths(batch) -> list[int]:
    starts = (batch["labels"] != -100).int().argmax(1)
    return (batch["attention_mask"].sum(1) - starts).tolist()


@pytest.mark.parametrize("responses,lora", [(("chosen", "rejected"), False), (("chosen", "rejected", "blind"), True)])
def test_shared_prompt_matches_the_concatenated_forward_in_value_and_gradient(tiny_vlm_builder, responses, lora):
    torch.manual_seed(0)
    module = PreferenceModule(vlm=tiny_vlm_builder, reference="precomputed",
                              lora=LoraSettings(r=4, alpha=8, dropout=0.0) if lora else None)
    module.vlm.eval()  # no dropout: both paths must see the same function
    batch = _batch(module, responses)
    k, n = len(responses), len(batch["ids"])
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1, "responses of different lengths"
    assert len(response_buckets(_response_lengths(batch))) > 1, "the length-bucketed path must be exercised"
    params = [p for p in module.vlm.parameters() if p.requires_grad]

    def run(fn):
        module.zero_grad(set_to_none=True)
        logps = fn()
        (logps * torch.linspace(1, 2, logps.numel())).sum().backward()
        return logps.detach(), [p.grad.clone() for p in params]

    features = lambda: module.vlm.encode_images(batch["pixel_values"])  # noqa: E731 (a fresh graph per run)
    full, full_grads = run(lambda: sequence_logps(module.vlm, batch, features().repeat(k, 1, 1)))
    shared, shared_grads = run(lambda: shared_prompt_logps(module.vlm, batch, features()))
    assert shared.shape == (k * n,)
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-4)
    for a, b in zip(shared_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_responses_with_different_prompt_tokens_fall_back_to_the_concatenated_forward(tiny_vlm_builder):
    module = PreferenceModule(vlm=tiny_vlm_builder, reference="precomputed")
    batch = _batch(module, ("chosen", "rejected"), n=2)
    n = len(batch["ids"])
    batch["input_ids"][n, 1] = batch["input_ids"][n, 1] + 1  # rejected row of sample 0: a different prompt token
    assert shared_prompt_logps(module.vlm, batch, module.vlm.encode_images(batch["pixel_values"])) is None


def test_a_one_token_response_in_its_own_bucket_gets_the_concatenated_log_prob(tiny_vlm_builder):
    torch.manual_seed(0)
    module = PreferenceModule(vlm=tiny_vlm_builder, reference="precomputed").eval()
    batch = _batch(module, ("chosen", "rejected"), n=3, response_format="template")  # no other 1-token answer
    row = 1  # sample 1's chosen answer keeps only its first token
    start = int((batch["labels"][row] != -100).int().argmax())
    batch["attention_mask"][row, start + 1:] = 0
    batch["labels"][row, start + 1:] = -100
    assert _response_lengths(batch)[row] == 1 and [row] in response_buckets(_response_lengths(batch), 0)
    with torch.no_grad():
        features = module.vlm.encode_images(batch["pixel_values"])
        full = sequence_logps(module.vlm, batch, features.repeat(2, 1, 1))
        shared = shared_prompt_logps(module.vlm, batch, features, bucket_cost=0)
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-4)


def _padded_slots(lengths: list[int], buckets: list[list[int]], cost: int) -> int:
    return sum(len(b) * max(lengths[i] for i in b) + cost for b in buckets)


def _partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _partitions(rest):
        yield [[first]] + partition
        for i in range(len(partition)):
            yield partition[:i] + [[first] + partition[i]] + partition[i + 1:]


@pytest.mark.parametrize("seed", range(20))
def test_response_buckets_are_the_cheapest_grouping_of_the_rows(seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (int(torch.randint(1, 7, (1,), generator=generator)),), generator=generator).tolist()
    cost = int(torch.randint(0, 30, (1,), generator=generator))
    buckets = response_buckets(lengths, cost)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    best = min(_padded_slots(lengths, p, cost) for p in _partitions(list(range(len(lengths)))))
    assert _padded_slots(lengths, buckets, cost) == best
