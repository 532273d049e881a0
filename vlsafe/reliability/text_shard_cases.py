"""Trust cases for data that must not be trusted blindly: a failed shard rewrite, special-token text inside a
conversation, a multi-megabyte text field and an answer of zero-width spaces (issue 16, cases 11-13, 15).

Each runs the real writer, reader and encoder; `tests/data/test_untrusted_text.py` pins the details.
"""
from __future__ import annotations

from typing import Iterator

from vlsafe.data.schema import Sample, SampleError
from vlsafe.data.shards import read_samples, write_shards
from vlsafe.reliability.bad_inputs import LOADS, REJECTED, Bench, Case, WrongResult, qa


def _failed_rewrite(bench: Bench) -> str:
    out = bench.folder("rewrite")
    old = [qa(f"old-{i}", [], question=f"Question {i}?") for i in range(6)]
    write_shards(old, out, max_samples=2)

    def new_data() -> Iterator[Sample]:
        yield from (qa(f"new-{i}", [], question=f"New {i}?") for i in range(4))
        yield qa("bad", [], question="Hi", answer="")  # two new shards' worth are written before this one

    try:
        write_shards(new_data(), out, max_samples=2)
    except SampleError as err:
        failure = str(err)
    else:
        raise WrongResult("the bad record did not stop the run")
    ids = [sample.id for sample in read_samples(out)]
    if ids != [sample.id for sample in old]:
        raise WrongResult(f"the folder reads as a mix after the failed run: {ids}")
    return f"the run stopped ({failure}); the folder still reads as the old set: {ids[0]}..{ids[-1]}"


def _special_token_text(bench: Bench) -> str:
    tokenizer = bench.processor.tokenizer
    sample = qa("lit", [], question="Scraped <s>HTML</s>?", answer="Type </s> to stop.")
    _, encoded = bench.through_pipeline(sample)
    ids, labels = encoded["input_ids"], encoded["labels"]
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    counts = (ids.count(eos), labels.count(eos), ids.count(bos))
    if counts != (1, 1, 1):
        raise WrongResult(f"{counts[0]} EOS ids ({counts[1]} supervised) and {counts[2]} BOS ids; expected 1, 1, 1")
    return "1 EOS id (the template's end of turn, supervised) and 1 BOS id; the literal </s>, <s> stay text"


def _huge_field(bench: Bench) -> str:
    sample = qa("huge", [], question="spam " * 4_800_000)  # 24 MB: 70 s and 7.2 GB to tokenise before
    back, _ = bench.through_pipeline(sample)  # raises before the tokenizer runs
    return f"loaded {back.id}"


def _zero_width_answer(bench: Bench) -> str:
    bench.through_pipeline(qa("zw", [], question="Hi", answer="\u200b\u200b\u200d"))
    return "loaded"


def text_and_shard_cases() -> list[Case]:
    return [
        Case("shards", "make_shards fails midway into a folder holding an older set", LOADS,
             ("still reads as the old set", "sample 'bad'"), _failed_rewrite),
        Case("text", "special-token text (</s>, <s>) inside a question and an answer", LOADS,
             ("1 EOS id", "stay text"), _special_token_text),
        Case("text", "24 MB text field", REJECTED, ("'messages[0].content'", "over max_text_chars=100,000"),
             _huge_field),
        Case("text", "answer of only zero-width characters", REJECTED, ("'messages[1].content'", "empty"),
             _zero_width_answer),
    ]

