"""Bad conversations: placeholder mismatches, empty answers, no assistant turn, non-UTF-8, over-long
conversations and degenerate preference pairs are rejected with the sample and field, never cut silently."""
import pytest

from vlsafe.reliability.bad_inputs import text_cases
from vlsafe.reliability.text_shard_cases import text_and_shard_cases


@pytest.mark.parametrize("case", text_cases(), ids=lambda c: c.name)
def test_text_case(case, bench, assert_case):
    assert_case(case, bench)


def test_truncated_samples_keep_their_answer_tokens_and_are_counted(bench):
    from vlsafe.constants import IGNORE_INDEX
    from vlsafe.data.encoding.encoders import ConversationEncoder
    from vlsafe.reliability.bad_inputs import qa

    encoder = ConversationEncoder(bench.short)
    items = [encoder.encode(qa("long", [], question="Hi", answer="A red square. " * 40)),
             encoder.encode(qa("short", [], question="Hi"))]
    assert len(items[0]["input_ids"]) == bench.short.max_length
    assert any(label != IGNORE_INDEX for label in items[0]["labels"])
    assert encoder.collate(items)["num_truncated"] == 1


@pytest.mark.parametrize("case", text_and_shard_cases(), ids=lambda c: c.name)
def test_untrusted_text_and_shard_case(case, bench, assert_case):
    """Issue 16 cases 11-13, 15 as catalogue rows (details: tests/data/test_untrusted_text.py)."""
    assert_case(case, bench)
