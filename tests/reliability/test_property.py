"""Property: every randomly malformed sample either loads unchanged or is rejected with SampleError.

Three doors into the pipeline are fuzzed (see vlsafe/reliability/fuzz.py): Sample objects through the
shard writer/reader and encoder, raw records in a foreign tar, and LLaVA JSON records through the converter.
"""
from collections import Counter

from hypothesis import HealthCheck, given, settings

from vlsafe.reliability import fuzz

SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
outcomes: dict[str, Counter] = {"samples": Counter(), "records": Counter(), "llava": Counter()}


def test_random_samples_load_unchanged_or_raise_sample_error(bench):
    @settings(max_examples=150, **SETTINGS)
    @given(fuzz.samples)
    def run(sample):
        outcomes["samples"][fuzz.check_sample(sample, bench.processor)] += 1

    run()
    counts = outcomes["samples"]
    assert counts[fuzz.LOADED] >= 10 and counts[fuzz.REJECTED] >= 50, counts  # both branches are exercised


def test_random_shard_records_load_or_raise_sample_error(bench):
    @settings(max_examples=100, **SETTINGS)
    @given(fuzz.raw_records())
    def run(members):
        outcomes["records"][fuzz.check_raw_record(members, bench.processor)] += 1

    run()
    assert outcomes["records"][fuzz.LOADED] >= 5 and outcomes["records"][fuzz.REJECTED] >= 10, outcomes["records"]


def test_random_llava_records_convert_or_raise_sample_error():
    @settings(max_examples=200, **SETTINGS)
    @given(fuzz.llava_records())
    def run(record):
        outcomes["llava"][fuzz.check_llava_record(record)] += 1

    run()
    assert outcomes["llava"][fuzz.LOADED] >= 5 and outcomes["llava"][fuzz.REJECTED] >= 50, outcomes["llava"]
