"""Data that must not be trusted blindly: a failed shard rewrite, special-token text, huge fields, blank answers.

Issue 16 cases 11-13 and 15 (blank answers): each test runs the real writer, tool, tokenizer or encoder.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from vlsafe.constants import IGNORE_INDEX
from vlsafe.data.encoding.processor import VLMProcessor
from vlsafe.data.schema import Sample, SampleError
from vlsafe.data.shards import load_index, read_samples

ROOT = Path(__file__).resolve().parents[2]


def make_shards_tool():
    spec = importlib.util.spec_from_file_location("make_shards_tool_untrusted", ROOT / "tools" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llava_json(path: Path, records: list[tuple[str, str]]) -> Path:
    path.write_text(json.dumps([{"id": sample_id, "conversations": [
        {"from": "human", "value": f"Question {sample_id}?"}, {"from": "gpt", "value": answer}]}
        for sample_id, answer in records]))
    return path


# ------------------------------------------------------------------------------------------ case 11
def test_failed_make_shards_into_an_existing_set_leaves_it_intact_never_mixed(tmp_path):
    tool = make_shards_tool()
    out = tmp_path / "shards"
    old = [(f"old-{i}", f"Old answer {i}.") for i in range(6)]
    tool.main(["llava", "--json", str(llava_json(tmp_path / "old.json", old)), "--out", str(out), "--max-samples", "2"])
    assert load_index(out).total == 6 and len(load_index(out).shards) == 3
    # The new data has a bad record (empty answer) after two full shards' worth of good ones.
    new = [(f"new-{i}", f"New answer {i}.") for i in range(4)] + [("bad", "")]
    with pytest.raises(SystemExit, match="sample 'bad', field 'messages\\[1\\].content'"):
        tool.main(["llava", "--json", str(llava_json(tmp_path / "new.json", new)), "--out", str(out),
                   "--max-samples", "2", "--on-error", "raise"])
    # Read with the normal reader: the old set, whole and alone (before: new-0..3 under the old index, then old-4, 5)
    assert [s.id for s in read_samples(out)] == [sample_id for sample_id, _ in old]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar", "shard-000001.tar",
                                                     "shard-000002.tar"], "no staging folder or partial shard left"
    # A successful rewrite with fewer shards replaces the set and removes the old shard it no longer uses.
    tool.main(["llava", "--json", str(llava_json(tmp_path / "ok.json", new[:3])), "--out", str(out),
               "--max-samples", "2"])
    assert [s.id for s in read_samples(out)] == ["new-0", "new-1", "new-2"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]


def test_failed_chunked_rewrite_leaves_nothing_readable_and_index_refuses_the_partial_folder(tmp_path):
    """The shard-rewriting tools (blind_generate, precompute_reference) share `run_chunked`: it removes a stale
    index.json before its first chunk and saves the new one last, so a failed run leaves nothing readable;
    `make_shards index` must not turn that partial folder (new tars beside older ones) into a readable mix."""
    from vlsafe.methods.preference.blind import ChunkResult, run_chunked

    tool = make_shards_tool()
    source, out = tmp_path / "source", tmp_path / "out"
    tool.main(["llava", "--json", str(llava_json(tmp_path / "a.json", [(f"s{i}", "A.") for i in range(4)])),
               "--out", str(source), "--max-samples", "2"])
    tool.main(["llava", "--json", str(llava_json(tmp_path / "b.json", [(f"old-{i}", "B.") for i in range(4)])),
               "--out", str(out), "--max-samples", "2"])

    def process(items):
        if items[0][0] >= 2:
            raise RuntimeError("model crashed on the second chunk")
        return ChunkResult([sample for _, sample in items])

    with pytest.raises(RuntimeError, match="second chunk"):
        run_chunked(source, out, process, chunk_size=2, progress=False)
    with pytest.raises(FileNotFoundError, match="no shard index"):
        load_index(out)
    with pytest.raises(SystemExit, match="unfinished resumable run"):
        tool.main(["index", str(out)])


# ------------------------------------------------------------------------------------------ case 12
def llama_style_tokenizer():
    """A LLaMA tokenizer (transformers' own class: Metaspace, prepend_scheme='first', <s>/</s> special) over a
    tiny vocabulary, so no model hub is needed."""
    import string

    from transformers import LlamaTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in "▁" + string.ascii_letters + string.digits + string.punctuation + "\n":
        vocab.setdefault(char, len(vocab))
    merges = [("▁", "U"), ("▁U", "S"), ("E", "R"), ("▁US", "ER"), ("▁", "a")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    return LlamaTokenizerFast(vocab=vocab, merges=merges)


def supervised_text(tokenizer, encoded) -> str:
    return tokenizer.decode([label for label in encoded.labels if label != IGNORE_INDEX])


def test_special_token_text_in_a_conversation_stays_plain_text(tokenizer):
    processor = VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=4)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    messages = [{"role": "user", "content": "<image>\nScraped: <s>Hello</s> what?"},
                {"role": "assistant", "content": "Type </s> to stop."}]
    encoded = processor.encode_conversation(messages, "lit")
    # one EOS (the template's end of turn, supervised), one BOS (add_bos): the literals are text
    assert encoded.input_ids.count(eos) == 1 and encoded.labels.count(eos) == 1 and encoded.labels[-1] == eos
    assert encoded.input_ids.count(bos) == 1 and encoded.input_ids[0] == bos
    assert supervised_text(tokenizer, encoded) == " Type </s> to stop.</s>"
    plain_ids = tokenizer("</s>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(plain_ids) > 1 and not set(plain_ids) & {eos, bos}
    # the generation prompt reads the question the same way, and is a prefix of the training sequence
    prompt = processor.encode_prompt(messages[:1], "lit")
    assert prompt.input_ids.count(bos) == 1 and encoded.input_ids[:len(prompt.input_ids)] == prompt.input_ids


def test_llama_tokenizer_llama2_template_literals_are_text_and_the_rest_is_unchanged():
    tokenizer = llama_style_tokenizer()
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    processor = VLMProcessor(tokenizer, "llama2", image_size=32, num_image_tokens=4)
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a</s>USER"},
             {"role": "user", "content": "<s>"}, {"role": "assistant", "content": "ok"}]
    encoded = processor.encode_conversation(turns, "llama")
    # template: BOS (add_bos) + BOS before the second [INST]; EOS after each answer, both supervised
    assert encoded.input_ids.count(bos) == 2 and encoded.input_ids.count(eos) == 2
    assert encoded.labels.count(eos) == 2 and encoded.labels.count(bos) == 0
    assert tokenizer.convert_ids_to_tokens([label for label in encoded.labels if label != IGNORE_INDEX]) == [
        "▁a", "<", "/", "s", ">", "U", "S", "ER", "▁", "</s>", "▁", "o", "k", "▁", "</s>"]
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    second_turn = tokens.index("<s>", 1)
    assert tokens[second_turn:second_turn + 9] == ["<s>", "[", "I", "N", "S", "T", "]", "▁", "<"], \
        "text after the template's <s> is read in context (no '▁'), the question's <s> as characters"
    # Same text without literals: the plain-text path gives exactly the tokenizer's own ids (text after a
    # template special token keeps its context: "USER" after </s> has no "▁", as in one tokenizer call).
    text = "[INST] Hi [/INST] ok </s>USER: a"
    own = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = (text.index("</s>"), text.index("</s>") + 4)
    plain = processor._encode_plain(text, [special], "llama")
    assert [i for i, _ in plain] == own["input_ids"] and [tuple(o) for _, o in plain] == [
        tuple(o) for o in own["offset_mapping"]]


def test_text_encoders_read_special_token_text_as_text(tokenizer):
    from vlsafe.methods.protector.encoders import DetectorEncoder, DetoxifierEncoder

    eos = tokenizer.eos_token_id
    pair = Sample(id="p", messages=[{"role": "user", "content": "How? <s>"}], chosen="Safe </s> answer.",
                  rejected="Bad </s> answer.", labels={"chosen_safe": 1.0, "rejected_safe": 0.0})
    rows = DetectorEncoder(tokenizer, max_length=200).encode(pair)["rows"]
    assert all(eos not in row and tokenizer.bos_token_id not in row for row in rows)
    detox = DetoxifierEncoder(tokenizer, max_length=300).encode(pair)
    assert detox["input_ids"].count(eos) == 1 and detox["input_ids"][-1] == eos
    assert [label for label in detox["labels"] if label != IGNORE_INDEX].count(eos) == 1


# ------------------------------------------------------------------------------------------ case 13
class CountingTokenizer:
    """The real tokenizer, counting how often text is tokenised."""

    def __init__(self, tokenizer):
        self._tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_huge_text_field_is_refused_before_tokenising(tokenizer, monkeypatch):
    from vlsafe.data.encoding.encoders import ConversationEncoder, PromptEncoder
    from vlsafe.methods.preference.encoding import PreferenceEncoder
    from vlsafe.methods.protector.encoders import DetectorEncoder

    counting = CountingTokenizer(tokenizer)
    processor = VLMProcessor(counting, "vicuna_v1", image_size=32, num_image_tokens=4)
    huge = "lorem ipsum " * 400_000  # 4.8 MB: tens of seconds and GBs of RAM to tokenise
    long_question = Sample(id="big-q", messages=[{"role": "user", "content": huge},
                                                 {"role": "assistant", "content": "Fine."}])
    for encoder in (ConversationEncoder(processor), PromptEncoder(processor)):
        with pytest.raises(SampleError, match=r"sample 'big-q', field 'messages\[0\].content': is 4,800,000 "
                                              r"characters long, over max_text_chars=100,000"):
            encoder.encode(long_question)
    pair = Sample(id="big-c", messages=[{"role": "user", "content": "Hi"}], chosen=huge, rejected="No.")
    with pytest.raises(SampleError, match="sample 'big-c'.*over max_text_chars"):
        PreferenceEncoder(processor).encode(pair)
    with pytest.raises(SampleError, match="sample 'big-c', field 'chosen'.*over max_text_chars"):
        DetectorEncoder(counting, max_length=100, require_labels=False).encode(pair)
    assert counting.calls == 0, "the tokenizer never saw the huge text"
    # the cap is configurable: per processor, or for every worker through the environment
    short = Sample(id="s", messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x" * 60}])
    with pytest.raises(SampleError, match="is 60 characters long, over max_text_chars=50"):
        VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=4, max_text_chars=50) \
            .encode_conversation(short.messages, "s")
    monkeypatch.setenv("VLSAFE_MAX_TEXT_CHARS", "50")
    with pytest.raises(SampleError, match="over max_text_chars=50"):
        VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=4).encode_conversation(short.messages)
    ConversationEncoder(processor).encode(short)  # the processor's own cap (100,000) still accepts it
    assert counting.calls == 1


def test_converter_warns_about_huge_text_at_conversion_time(tmp_path, caplog, capsys):
    tool = make_shards_tool()
    data = llava_json(tmp_path / "data.json", [("normal", "Short."), ("essay", "word " * 30_000)])
    with caplog.at_level("WARNING", logger="vlsafe.data.sources"):
        tool.main(["llava", "--json", str(data), "--out", str(tmp_path / "out")])
    warnings = [r.getMessage() for r in caplog.records if r.name == "vlsafe.data.sources"]
    assert len(warnings) == 1 and "sample 'essay'" in warnings[0] and "'messages[1].content' (150,000 characters)" \
        in warnings[0] and "max_text_chars=100,000" in warnings[0]
    assert "llava: long_text=1" in capsys.readouterr().out
    assert load_index(tmp_path / "out").total == 2, "written (a larger cap may be configured for training)"


# ------------------------------------------------------------------------------------------ case 15
@pytest.mark.parametrize("blank", ["\u200b", "\u200b\u200c\u200d", " \ufeff\u2060 ", "\u3164", "\u00ad\n"])
def test_answers_of_zero_width_characters_are_empty(tokenizer, blank):
    from vlsafe.methods.preference.encoding import PreferenceEncoder
    from vlsafe.methods.protector.encoders import labelled_responses

    sample = Sample(id="zw", messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": blank}])
    with pytest.raises(SampleError, match=r"sample 'zw', field 'messages\[1\].content': assistant turn is empty"):
        sample.validate()
    processor = VLMProcessor(tokenizer, "vicuna_v1", image_size=32, num_image_tokens=4)
    with pytest.raises(SampleError, match="'messages\\[1\\].content': assistant answer is empty"):
        processor.encode_conversation(sample.messages, "zw")
    pair = Sample(id="zp", messages=[{"role": "user", "content": "Hi"}], chosen="Yes.", rejected=blank)
    for check in (pair.validate, lambda: PreferenceEncoder(processor).encode(pair),
                  lambda: labelled_responses(pair, require_labels=False)):
        with pytest.raises(SampleError, match="sample 'zp', field 'rejected'"):
            check()
    with pytest.raises(SampleError, match="field 'id'"):
        Sample(id=blank, messages=[{"role": "user", "content": "Hi"}]).validate()
    from vlsafe.data.schema import is_blank

    assert is_blank(blank) and not is_blank(blank + "Yes") and not is_blank("\u200bYes")
