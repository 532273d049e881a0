"""Shared fixtures: a tiny tokenizer, tiny shard sets and the synthetic world, built once per session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer():
    from vlsafe.core.tokenizer import train_bpe_tokenizer
    from vlsafe.data.encoding.templates import (
        LLAMA2_SYSTEM,
        LLAVA_SYSTEM,
        VICUNA_SYSTEM,
    )

    texts = [VICUNA_SYSTEM, LLAVA_SYSTEM, LLAMA2_SYSTEM, "USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>>",
             "What color is the circle? red green blue yellow. Is there a square? yes no. Describe the image."]
    return train_bpe_tokenizer(texts * 3, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_vlm_builder():
    from vlsafe.builders import TinyVLM

    return TinyVLM(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, max_length=256)


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """Small synthetic shard sets: train (qa), val (qa) and a mixed-kind set."""
    from vlsafe.data.synthetic.world import write_world

    root = tmp_path_factory.mktemp("world")
    write_world(root / "train", 600, seed=0, kinds=["qa"], split="train", max_samples_per_shard=128)
    write_world(root / "val", 80, seed=0, kinds=["qa"], split="val", max_samples_per_shard=128)
    write_world(root / "mixed", 70, seed=0, kinds=["qa", "caption", "negative", "safety", "preference",
                                                  "harm_text", "grounding"], split="train", max_samples_per_shard=32)
    return root
