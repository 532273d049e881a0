"""Which tokens preference training scores, and what a too-long pair becomes, against MMSafe-PO's released code.

The released rule is transcribed here from Lu-Yang666/MMsafe-PO (LLaVA's `tokenizer_image_token`,
all_utils/data_utils/data_utils_ppo.py:211-249, data_utils_dpo.py:209-241) and run on a LLaMA-style tokenizer
(sentencepiece-like: "▁" word starts, byte fallback for "\\n", BOS added), trained here in a few milliseconds.
"""
import pytest
import torch
from PIL import Image

from vlsafe.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlsafe.data.encoding.processor import VLMProcessor, image_bytes
from vlsafe.data.encoding.templates import VICUNA_SYSTEM
from vlsafe.data.schema import Sample, SampleLeftOut
from vlsafe.methods.preference.encoding import PreferenceEncoder

IMAGE_TOKENS = 4
QUESTION = "What colour is the circle?"
REFUSAL = "I'm sorry, but I can't help with that."
ANSWER = "The circle is red, and there are two squares and one blue triangle next to it."


@pytest.fixture(scope="module")
def llama_like():
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]  # no "\n" piece: byte fallback
    core.train_from_iterator([VICUNA_SYSTEM, f"USER: {QUESTION} ASSISTANT:", REFUSAL, ANSWER],
                             trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _processor(tokenizer, max_length=2048):
    return VLMProcessor(tokenizer, "vicuna_v1", image_size=16, num_image_tokens=IMAGE_TOKENS, max_length=max_length)


def _sample(chosen=REFUSAL, rejected=ANSWER, question=QUESTION, sample_id="s0"):
    return Sample(id=sample_id, messages=[{"role": "user", "content": "<image>\n" + question}],
                  images=[image_bytes(Image.new("RGB", (16, 16), (200, 30, 30)))], chosen=chosen, rejected=rejected)


# ------------------------------------------------------------------ the released rule, transcribed
def released_query(tokenizer, question=QUESTION):
    """conv.append_message(ASSISTANT, "\\n"), tokenizer_image_token, then `[:-2]` (data_utils_dpo.py:217-219)."""
    prompt = f"{VICUNA_SYSTEM} USER: <image>\n{question} ASSISTANT: \n</s>"
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids = [chunks[0][0]]  # one BOS; tokenizer_image_token strips every chunk's own
    for i, chunk in enumerate(chunks):
        ids += ([IMAGE_TOKEN_INDEX] if i else []) + chunk[1:]
    return ids[:-2]


def released_pair(tokenizer, query, chosen, rejected, max_length):
    """QueryChosenRejectedResponseDataset2 (data_utils_dpo.py:225-241): (chosen, rejected) ids or None."""
    budget = max_length - IMAGE_TOKENS
    c, r = tokenizer(chosen).input_ids[1:], tokenizer(rejected).input_ids[1:]
    if len(query) > budget:
        return None
    if len(query) + len(c) < budget and len(query) + len(r) < budget:
        return c, r
    r = r[:len(r) - (len(query) + len(r) + 1 - budget)]
    return (c, r) if len(query) + len(c) < budget and len(query) + len(r) < budget else None


def collapse_image(ids):
    """vlsafe expands an image to IMAGE_TOKENS slots; the released query holds one placeholder."""
    out = []
    for token in ids:
        if not (token == IMAGE_TOKEN_INDEX and out and out[-1] == IMAGE_TOKEN_INDEX):
            out.append(token)
    return out


def _scored(ids, labels):
    return [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]


# ------------------------------------------------------------------ tests
def test_scored_tokens_are_the_released_ones_exactly(llama_like):
    item = PreferenceEncoder(_processor(llama_like)).encode(_sample())
    query = released_query(llama_like)
    assert llama_like.convert_ids_to_tokens(query[-1]) == "▁", "the released query ends 'ASSISTANT:▁'"
    expected = released_pair(llama_like, query, REFUSAL, ANSWER, 2048)
    for name, response in zip(("chosen", "rejected"), expected):
        ids, labels = item["sequences"][name]
        assert collapse_image(ids) == query + response
        assert _scored(ids, labels) == response and llama_like.eos_token_id not in _scored(ids, labels)
        assert labels[:len(ids) - len(response)] == [IGNORE_INDEX] * (len(ids) - len(response))
    # the documented switch: the template's own turn, " " + response + "</s>", EOS scored
    template = PreferenceEncoder(_processor(llama_like), response_format="template").encode(_sample())
    ids, labels = template["sequences"]["chosen"]
    assert _scored(ids, labels)[-1] == llama_like.eos_token_id
    assert llama_like.decode(_scored(ids, labels), skip_special_tokens=True).strip() == REFUSAL


def test_length_rule_drops_long_chosen_cuts_long_rejected_and_counts_long_prompts(llama_like):
    query = released_query(llama_like)
    short = llama_like(REFUSAL).input_ids[1:]
    max_length = len(query) + len(short) + 3 + IMAGE_TOKENS  # budget: chosen fits, the long answer does not
    encoder = PreferenceEncoder(_processor(llama_like, max_length))

    item = encoder.encode(_sample())
    chosen, rejected = released_pair(llama_like, query, REFUSAL, ANSWER, max_length)
    assert len(rejected) < len(llama_like(ANSWER).input_ids) - 1, "the released rule cuts this rejected"
    assert _scored(*item["sequences"]["rejected"]) == rejected and _scored(*item["sequences"]["chosen"]) == chosen
    assert item["truncated"] == ["rejected"]
    assert encoder.collate([item])["truncated_responses"] == {"chosen": 0, "rejected": 1}

    assert released_pair(llama_like, query, ANSWER, REFUSAL, max_length) is None
    with pytest.raises(SampleLeftOut, match="'chosen'.*left out"):
        encoder.encode(_sample(chosen=ANSWER, rejected=REFUSAL))
    long_question = QUESTION + " Please look carefully." * 3
    assert released_pair(llama_like, released_query(llama_like, long_question), REFUSAL, ANSWER, max_length) is None
    with pytest.raises(SampleLeftOut, match="'messages'.*no room for a response"):
        encoder.encode(_sample(question=long_question))
    # `length_rule: truncate` cuts the chosen response instead of leaving the pair out
    cut = PreferenceEncoder(_processor(llama_like, max_length), length_rule="truncate").encode(
        _sample(chosen=ANSWER, rejected=REFUSAL))
    assert cut["truncated"] == ["chosen"]


def test_a_run_reports_left_out_and_cut_pairs_and_never_stops_on_length(llama_like, tmp_path, capsys):
    """A real fit with on_error='raise': long pairs are counted and reported at the end, not fatal."""
    import lightning as L

    from vlsafe.builders import TinyVLM
    from vlsafe.data.datamodule import ShardDataModule
    from vlsafe.data.shards import write_shards
    from vlsafe.methods.preference.module import PreferenceModule

    llama_like.save_pretrained(tmp_path / "tok")
    query = released_query(llama_like)
    max_length = len(query) + len(llama_like(REFUSAL).input_ids[1:]) + 3 + IMAGE_TOKENS
    samples = [_sample(sample_id="ok-cut-0"), _sample(sample_id="ok-cut-1"),
               _sample(chosen=ANSWER, rejected=REFUSAL, sample_id="long-chosen"),
               _sample(question=QUESTION + " Please look carefully." * 3, sample_id="long-prompt"),
               _sample(sample_id="ok-cut-2"), _sample(sample_id="ok-cut-3")]
    write_shards(samples, tmp_path / "shards")
    torch.manual_seed(0)
    module = PreferenceModule(vlm=TinyVLM(image_size=16, patch_size=8, vision_width=16, vision_layers=1,
                                          hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                          tokenizer=str(tmp_path / "tok"), max_length=max_length),
                              optim={"lr": 1e-3})
    data = ShardDataModule(train=str(tmp_path / "shards"), batch_size=2, num_workers=0, shuffle_buffer=0,
                           on_error="raise")
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, data)
    report = module.length_report
    assert "2 left out (chosen too long 1, prompt too long 1)" in report, report
    # the two left-out slots are taken by repeats of kept pairs (the data module keeps every rank's step count),
    # so 6 pairs trained, each with its long rejected answer cut
    assert "6 pair(s) trained" in report and "chosen 0, rejected 6" in report, report
    assert report in capsys.readouterr().out
