"""The trust catalogue (`tools/reliability_report.py`'s hostile-user rows): every area has rows, names are
unique, and the configuration rows (not pinned by a test elsewhere) end as documented."""
from __future__ import annotations

from vlsafe.reliability.bad_inputs import Bench
from vlsafe.reliability.trust_cases import _configuration_cases, all_trust_cases


def test_every_area_of_the_catalogue_has_rows_with_unique_names():
    cases = all_trust_cases()
    areas = {case.area for case in cases}
    assert {"security", "preemption", "checkpoints", "evaluation", "data", "text", "configuration"} <= areas
    names = [case.name for case in cases]
    assert len(names) == len(set(names))


def test_configuration_rows_end_as_documented(tmp_path):
    bench = Bench(tmp_path)
    for case in _configuration_cases():
        outcome = case.run(bench)
        assert case.passed(outcome), (case.name, outcome.kind, outcome.detail)
