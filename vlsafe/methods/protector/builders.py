"""Recipe-facing constructors for the text-only LMs of MLLM-Protector (harm detector, detoxifier).

A builder records its constructor arguments as plain data (`config()`), so a training checkpoint stores
how to rebuild the model without pickling anything and loads with `torch.load(weights_only=True)`.
`build(head)` returns `(model, tokenizer)`; the *method* chooses the head:

- ``"classifier"``: a `*ForSequenceClassification` with ``num_labels=1`` — one logit read at the last
  non-pad token (transformers' Llama/Mistral/... heads do that), so `sigmoid(logit)` is one probability;
- ``"causal_lm"``: a `*ForCausalLM` for generation (the detoxifier).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from vlsafe.builders import resolve_dtype
from vlsafe.core.tokenizer import train_bpe_tokenizer
from vlsafe.data.synthetic.world import corpus
from vlsafe.moved import import_vlsafe_class

HEADS = ("classifier", "causal_lm")


def _check_head(head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; use one of {HEADS}")


def ensure_pad_token(tokenizer, model=None) -> None:
    """Give the tokenizer (and the model config) a pad token.

    Llama-family tokenizers ship without one; like the released detector, the EOS token is used then.
    The classification head finds "the last non-pad token" through `config.pad_token_id`, so the two
    must agree.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; give it a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


class TextLMBuilder:
    """Base class: subclasses implement `build(head)`; `config()` records the constructor arguments."""

    def build(self, head: str) -> tuple[torch.nn.Module, Any]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        params = inspect.signature(type(self).__init__).parameters
        args = {name: getattr(self, name) for name in params if name != "self"}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}

    @staticmethod
    def from_config(config: dict[str, Any] | "TextLMBuilder") -> "TextLMBuilder":
        """Rebuild a builder from `config()` output; only vlsafe text builders are accepted."""
        if isinstance(config, TextLMBuilder):
            return config
        cls = import_vlsafe_class(config.get("class_path", ""), TextLMBuilder, "text builder")
        return cls(**config.get("init_args", {}))


class HFTextLM(TextLMBuilder):
    """Any transformers causal LM folder or hub id (e.g. `openlm-research/open_llama_3b_v2`,
    `lmsys/vicuna-7b-v1.5`), loaded with `AutoModelForSequenceClassification(num_labels=1)` or
    `AutoModelForCausalLM`. `trust_remote_code` stays off unless a recipe sets it."""

    def __init__(self, path: str, tokenizer: str | None = None, torch_dtype: str | None = None,
                 attn_implementation: str | None = None, use_fast: bool = True, trust_remote_code: bool = False):
        self.path, self.tokenizer, self.torch_dtype = path, tokenizer, torch_dtype
        self.attn_implementation, self.use_fast = attn_implementation, use_fast
        self.trust_remote_code = trust_remote_code

    def build(self, head: str) -> tuple[torch.nn.Module, Any]:
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        _check_head(head)
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.torch_dtype:
            kwargs["dtype"] = resolve_dtype(self.torch_dtype)
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        if head == "classifier":
            model = AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(self.path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer or self.path, use_fast=self.use_fast,
                                                  trust_remote_code=self.trust_remote_code)
        ensure_pad_token(tokenizer, model)
        return model, tokenizer


class TinyTextLM(TextLMBuilder):
    """A random-init Llama small enough to train on a CPU in seconds, for demos and tests.

    Uses the project's byte-level BPE trained on the synthetic world's text (`vlsafe.core.tokenizer`), the
    same one `TinyVLM` uses, so detector/detoxifier and the demo VLM read the same vocabulary.
    Same seed -> same weights.
    """

    def __init__(self, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 128,
                 vocab_size: int = 1024, max_position_embeddings: int = 512, seed: int = 0,
                 tokenizer: str | None = None):
        self.hidden_size, self.num_layers, self.num_heads = hidden_size, num_layers, num_heads
        self.intermediate_size, self.vocab_size = intermediate_size, vocab_size
        self.max_position_embeddings, self.seed, self.tokenizer = max_position_embeddings, seed, tokenizer

    def build(self, head: str) -> tuple[torch.nn.Module, Any]:
        from transformers import (
            AutoTokenizer,
            LlamaConfig,
            LlamaForCausalLM,
            LlamaForSequenceClassification,
        )

        _check_head(head)
        if self.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer, use_fast=True)
        else:
            tokenizer = tiny_tokenizer(self.vocab_size)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=self.hidden_size,
                             intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                             num_attention_heads=self.num_heads, num_key_value_heads=self.num_heads,
                             max_position_embeddings=self.max_position_embeddings,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, num_labels=1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = (LlamaForSequenceClassification if head == "classifier" else LlamaForCausalLM)(config)
        ensure_pad_token(tokenizer, model)
        return model, tokenizer


_TOKENIZERS: dict[int, Any] = {}


def tiny_tokenizer(vocab_size: int = 1024):
    """The synthetic world's BPE (cached per process: training it takes about a second)."""
    if vocab_size not in _TOKENIZERS:

        _TOKENIZERS[vocab_size] = train_bpe_tokenizer(corpus(), vocab_size=vocab_size)
    import copy
    return copy.deepcopy(_TOKENIZERS[vocab_size])
