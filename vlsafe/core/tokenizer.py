"""A small byte-level BPE tokenizer trained offline, for tiny demo/test models.

Real runs use the LLM's own tokenizer; this exists because the machine that runs tests may have no
model hub. Byte-level BPE never produces unknown tokens and decodes text exactly, so generation and
exact-match scoring behave like they do with real tokenizers.
"""
from __future__ import annotations

from typing import Iterable

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a deterministic byte-level BPE and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = sorted(set(texts))  # order-independent: same corpus -> same merges
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)
