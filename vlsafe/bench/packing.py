"""SFT packing benchmark (issue 19 §3): packed vs padded batches of the same samples, in one process.

Lengths follow LLaVA-665k's shape, scaled to the benchmark model: text tokens log-normal with median 150 and a
tail clipped at 1,500 (LLaVA-665k conversations), 90% of samples with one image of 576 tokens (the rest
text-only, like its ShareGPT part), everything divided by `576 / num_image_tokens` of the benchmark tower so
the image:text ratio stays LLaVA's while a CPU can run it. About 40% of a sample's text tokens are the
supervised answer.

Every side trains the same `SFTModule` weights on the same samples: one padded row per sample, packed rows of
up to the model's `max_length` (the default), and packed rows no longer than the batch's longest sample
(`packing_max_tokens: 1`). Their steps are interleaved (padded step i, packed step i, ...) so that load from other
processes on the machine hits every side alike; a step is forward + backward + AdamW step (no Lightning loop: its
overhead is the same on every side). The losses are reported side by side: equal work means equal loss.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch

from vlsafe.bench.setup import BenchConfig
from vlsafe.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

LLAVA_IMAGE_TOKENS = 576
TEXT_MEDIAN, TEXT_SIGMA, TEXT_MAX, TEXT_MIN = 150, 0.9, 1500, 24
IMAGE_FRACTION, ANSWER_FRACTION = 0.9, 0.4


def llava_like_lengths(n: int, scale: float, seed: int) -> list[tuple[int, bool]]:
    """(text tokens, has image) for `n` samples: log-normal text lengths (median `TEXT_MEDIAN`), divided by
    `scale`, with `IMAGE_FRACTION` of the samples carrying an image."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=generator, dtype=torch.float64)
    text = (math.log(TEXT_MEDIAN) + TEXT_SIGMA * normal).exp().clamp(TEXT_MIN, TEXT_MAX) / scale
    has_image = torch.rand(n, generator=generator, dtype=torch.float64) < IMAGE_FRACTION
    return [(max(4, round(float(t))), bool(i)) for t, i in zip(text, has_image)]


def encoded_items(processor: Any, lengths: list[tuple[int, bool]], seed: int) -> list[dict[str, Any]]:
    """What `ConversationEncoder.encode` returns, with exact lengths: BOS, the image's tokens, a prompt
    (unsupervised) and an answer (supervised); random ids from the vocabulary, random normalised pixels."""
    generator = torch.Generator().manual_seed(seed)
    vocab = len(processor.tokenizer)
    size = processor.image_size
    items = []
    for index, (text, has_image) in enumerate(lengths):
        answer = max(1, round(ANSWER_FRACTION * text))
        prompt = text - answer
        words = torch.randint(4, vocab, (text,), generator=generator).tolist()
        image = [IMAGE_TOKEN_INDEX] * processor.num_image_tokens if has_image else []
        bos = [processor.tokenizer.bos_token_id] if processor.add_bos else []
        input_ids = bos + image + words
        labels = [IGNORE_INDEX] * (len(bos) + len(image) + prompt) + words[prompt:]
        pixels = torch.randn((1 if has_image else 0, 3, size, size), generator=generator)
        items.append({"id": f"llava-like-{index}", "input_ids": input_ids, "labels": labels,
                      "pixel_values": pixels, "truncated": False})
    return items


def _timed_step(module: Any, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> tuple[float, float]:
    start = time.perf_counter()
    loss, _, _ = module._loss(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - start, float(loss.detach())


def sft_packed_vs_padded(cfg: BenchConfig, workdir: Path) -> dict[str, Any]:
    """The packed contender's result, with the padded baseline's (same process, same samples) as companion."""
    from vlsafe.data.encoding.encoders import ConversationEncoder
    from vlsafe.data.encoding.packing import PackedConversationEncoder
    from vlsafe.methods.base import OptimSettings
    from vlsafe.methods.sft import SFTModule

    torch.manual_seed(cfg.seed)
    padded_module = SFTModule(vlm=cfg.builder(), optim=OptimSettings(lr=cfg.lr, warmup_steps=0, schedule="constant"))
    packed_module = copy.deepcopy(padded_module)  # the same weights on every side
    processor = padded_module.processor
    scale = LLAVA_IMAGE_TOKENS / processor.num_image_tokens
    steps = cfg.warmup_steps + cfg.timed_steps
    lengths = llava_like_lengths(steps * cfg.batch_size, scale, cfg.seed)
    items = encoded_items(processor, lengths, cfg.seed)
    chunks = [items[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(steps)]
    padded = [ConversationEncoder(processor).collate(chunk) for chunk in chunks]
    packed = [PackedConversationEncoder(processor).collate(chunk) for chunk in chunks]
    # rows no longer than the batch's longest sample: more, shorter rows (never more attention than padding)
    short_rows = [PackedConversationEncoder(processor, max_tokens=1).collate(chunk) for chunk in chunks]
    sides = {"padded": (padded_module, padded), "packed": (packed_module, packed),
             "packed_longest": (copy.deepcopy(padded_module), short_rows)}
    optimizers = {name: torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=cfg.lr,
                                          weight_decay=0.0) for name, (module, _) in sides.items()}
    times: dict[str, list[float]] = {name: [] for name in sides}
    losses: dict[str, list[float]] = {name: [] for name in sides}
    for step in range(steps):
        for name, (module, data) in sides.items():
            seconds, loss = _timed_step(module, optimizers[name], data[step])
            times[name].append(seconds)
            losses[name].append(loss)

    def result(name: str) -> dict[str, Any]:
        data = sides[name][1]
        work = {"samples": float(cfg.batch_size),
                "tokens": sum(int(b["attention_mask"].sum()) for b in data) / steps,
                "computed_tokens": sum(b["input_ids"].numel() for b in data) / steps,
                "rows": sum(b["input_ids"].shape[0] for b in data) / steps}
        return {"step_seconds": times[name][cfg.warmup_steps:], "work_per_step": work, "first_loss": losses[name][0],
                "losses": losses[name], "peak_rss_mb": None}

    report = result("packed")
    report["companions"] = {"sft/padded": result("padded"), "sft/packed_longest": result("packed_longest")}
    report["length_distribution"] = {
        "text_tokens": f"log-normal median {TEXT_MEDIAN}, sigma {TEXT_SIGMA}, clipped to [{TEXT_MIN}, {TEXT_MAX}]",
        "image_tokens": f"{LLAVA_IMAGE_TOKENS} on {IMAGE_FRACTION:.0%} of samples",
        "scaled_by": scale, "image_tokens_here": processor.num_image_tokens,
        "sample_tokens_here": sorted(len(item["input_ids"]) for item in items)}
    report["max_loss_difference"] = max(abs(a - b) for name in ("packed", "packed_longest")
                                        for a, b in zip(losses[name], losses["padded"]))
    return report


def packing_config(cfg: BenchConfig) -> BenchConfig:
    """The benchmark model with a tower whose image-token count divides LLaVA's 576 (192 px / 16 = 144 = 576/4)
    unless the config is the tests' tiny one."""
    if cfg.image_size <= 64:
        return cfg
    return dataclasses.replace(cfg, image_size=192, patch_size=16)


def sft_packed(cfg: BenchConfig, workdir: Path) -> dict[str, Any]:
    return sft_packed_vs_padded(packing_config(cfg), workdir)


PACKING_CONTENDERS = {"sft/packed": sft_packed}
