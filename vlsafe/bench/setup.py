"""What every benchmark contender shares: the model config, the synthetic data and the batch conversions.

The model is a "tiny but not trivial" LLaVA layout (open_clip ViT at 224 px + an 8-layer Llama with hidden
512) so that the matmuls, not Python overhead, dominate a step — as they do at real scale.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vlsafe.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run; `quick()` keeps the whole run under a few minutes on 2 CPU cores."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 256
    vision_layers: int = 4
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    intermediate_size: int = 1376
    batch_size: int = 8
    warmup_steps: int = 3
    timed_steps: int = 10
    data_samples: int = 512
    generate_prompts: int = 16
    new_tokens: int = 24
    lr: float = 1e-5
    seed: int = 0

    @classmethod
    def quick(cls) -> "BenchConfig":
        return cls(patch_size=32, batch_size=4, warmup_steps=2, timed_steps=5, data_samples=192,
                   generate_prompts=8, new_tokens=16)

    @classmethod
    def tiny(cls) -> "BenchConfig":
        """For tests: seconds per contender, same code paths."""
        return cls(image_size=64, patch_size=16, vision_width=64, vision_layers=2, hidden_size=64, num_layers=2,
                   num_heads=4, intermediate_size=128, batch_size=2, warmup_steps=1, timed_steps=2,
                   data_samples=64, generate_prompts=4, new_tokens=4)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def builder(self):
        from vlsafe.builders import TinyVLM

        return TinyVLM(tokenizer=str(bench_tokenizer()), image_size=self.image_size, patch_size=self.patch_size, vision_width=self.vision_width,
                       vision_layers=self.vision_layers, vision_heads=max(1, self.vision_width // 64),
                       hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
                       intermediate_size=self.intermediate_size, select_layer=-2, max_length=512, seed=self.seed)


def bench_tokenizer() -> Path:
    """The synthetic world's BPE tokenizer plus an `<image>` token, saved once per machine.

    With the image token already in the vocabulary, exporting to `LlavaForConditionalGeneration` adds no
    embedding row, so both sides of a comparison normalise their softmax over the same vocabulary.
    """
    import os
    import tempfile

    from vlsafe.core.tokenizer import train_bpe_tokenizer
    from vlsafe.data.synthetic.world import WORLD_VERSION, corpus

    folder = Path(tempfile.gettempdir()) / f"vlsafe-bench-tokenizer-v{WORLD_VERSION}"
    if not (folder / "tokenizer.json").exists():
        tokenizer = train_bpe_tokenizer(corpus(), vocab_size=1024)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
        tokenizer.save_pretrained(str(staging))
        try:
            os.replace(staging, folder)
        except OSError:  # another process won the race; its copy is identical
            pass
    return folder


def synthetic_samples(kind: str, n: int, seed: int = 0, image_size: int = 224) -> list:
    """`n` samples of one synthetic-world kind, deterministic (the same in every contender's process)."""
    from vlsafe.data.synthetic.world import WorldConfig, generate

    return list(generate(n, seed=seed, kinds=[kind], cfg=WorldConfig(image_size=image_size), split="bench"))


def batches(encoder: Any, samples: list, batch_size: int, count: int) -> list[dict[str, Any]]:
    """`count` collated batches, cycling through `samples` (identical in every process)."""
    out, i = [], 0
    for _ in range(count):
        chunk = [samples[(i + j) % len(samples)] for j in range(batch_size)]
        i += batch_size
        out.append(encoder.collate([encoder.encode(s) for s in chunk]))
    return out


def real_tokens(batch: dict[str, Any]) -> int:
    return int(batch["attention_mask"].sum())


def export_hf(module: Any, out_dir: Path, **load_options: Any):
    """The module's VLM as a transformers `LlavaForConditionalGeneration` with identical weights
    (`load_options` go to `from_pretrained`, e.g. `attn_implementation="sdpa"`)."""
    from transformers import LlavaForConditionalGeneration

    from vlsafe.core.interop import export_llava_hf

    folder = export_llava_hf(module.vlm, module.processor.tokenizer, out_dir)
    model = LlavaForConditionalGeneration.from_pretrained(str(folder), **{"dtype": torch.float32, **load_options})
    return model, folder


def to_hf_inputs(batch: dict[str, Any], image_token_index: int, copies: int = 1) -> dict[str, torch.Tensor]:
    """A vlsafe batch as `LlavaForConditionalGeneration` inputs: sentinel -200 ids become the image token.

    `copies` repeats the images for batches whose sequences come in groups (chosen, rejected, ...).
    """
    input_ids = batch["input_ids"].clone()
    input_ids[input_ids == IMAGE_TOKEN_INDEX] = image_token_index
    pixels = batch["pixel_values"]
    return {"input_ids": input_ids, "attention_mask": batch["attention_mask"],
            "pixel_values": pixels.repeat(copies, 1, 1, 1) if copies > 1 else pixels}


def hf_labels(batch: dict[str, Any]) -> torch.Tensor:
    return batch["labels"].masked_fill(batch["labels"] == IGNORE_INDEX, -100)


def freeze_like_vlsafe(model: Any) -> None:
    """Train what vlsafe trains by default (LLM + projector), keep the vision tower frozen."""
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)


def frozen_copy(model: Any) -> Any:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
