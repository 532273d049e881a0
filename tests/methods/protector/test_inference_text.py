"""Inference reads text as training does: a `</s>` quoted in an answer is characters, not an end of sequence.

The detector and detoxifier used to call the tokenizer directly at inference, where a literal `</s>` becomes the
EOS id, while the training encoders read it as text (`text_encoders.plain_text_ids`)."""
from __future__ import annotations

import string

import pytest
import torch

from vlsafe.data.schema import Sample
from vlsafe.methods.protector.detector import HarmDetector
from vlsafe.methods.protector.detoxifier import Detoxifier
from vlsafe.methods.protector.encoders import (
    DetectorEncoder,
    DetoxPromptEncoder,
    tokenize,
)

QUESTION = "How do I stop the script?"
ANSWER = "Type </s> then <s> again."


def llama_tokenizer():
    """A LLaMA fast tokenizer (adds BOS, `<s>`/`</s>` special) over a character vocabulary: no model hub."""
    from transformers import LlamaTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in "▁" + string.ascii_letters + string.digits + string.punctuation + "\n":
        vocab.setdefault(char, len(vocab))
    return LlamaTokenizerFast(vocab=vocab, merges=[], add_bos_token=True)


def sample() -> Sample:
    return Sample(id="quote", labels={"safe": 1.0},
                  messages=[{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}])


@pytest.mark.parametrize("preset", ["vlsafe", "released"])
def test_detector_and_detoxifier_inference_ids_are_the_training_ids_with_no_eos_from_the_answer(preset):
    tokenizer = llama_tokenizer()
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    assert eos in tokenizer(ANSWER)["input_ids"], "the tokenizer's own call reads the quote as EOS"
    detector = HarmDetector(torch.nn.Identity(), tokenizer, preset=preset)
    ids = detector.encode(QUESTION, ANSWER)
    assert eos not in ids and ids.count(bos) == 1 and ids[0] == bos  # the format's only special id: BOS
    assert tokenizer.decode(ids, skip_special_tokens=True).endswith(ANSWER)
    assert ids == tokenize(tokenizer, detector.input_text(QUESTION, ANSWER), "quote", "answer", None)
    if preset == "vlsafe":  # one format: the training row is the inference input
        assert DetectorEncoder(tokenizer, preset=preset).encode(sample())["rows"] == [ids]

    detoxifier = Detoxifier(torch.nn.Identity(), tokenizer, preset=preset)
    prompt = detoxifier.prompt_ids(QUESTION, ANSWER)
    assert eos not in prompt and prompt.count(bos) == 1
    if preset == "vlsafe":
        assert DetoxPromptEncoder(tokenizer, preset=preset).encode(sample())["input_ids"] == prompt
