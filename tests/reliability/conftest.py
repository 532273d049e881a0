"""A shared scratch bench (folder + small processor) for the bad-input catalogue."""
import pytest


@pytest.fixture(scope="session")
def bench(tmp_path_factory, tokenizer):
    from vlsafe.reliability.bad_inputs import Bench

    return Bench(tmp_path_factory.mktemp("bad-inputs"), tokenizer)


@pytest.fixture(scope="session")
def assert_case():
    """Run one catalogue case through the pipeline and check it ended as documented."""
    return _assert_case


def _assert_case(case, bench):
    outcome = case.run(bench)
    assert outcome.kind == case.expect, f"{case.name}: expected {case.expect}, got {outcome.kind}: {outcome.detail}"
    for text in case.must_mention:
        assert text in outcome.detail, f"{case.name}: {text!r} not in {outcome.detail!r}"
    if outcome.kind == "rejected" and case.area != "files":
        from vlsafe.data.schema import SampleError
        assert isinstance(outcome.error, SampleError) or "not UTF-8" in outcome.detail, outcome.detail
    return outcome
