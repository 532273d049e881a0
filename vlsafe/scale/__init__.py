"""Scale-out: strategy presets a recipe names by `class_path`, and the model-derived sharding units.

- `vlsafe.scale.FSDP` — Lightning FSDP (FSDP1) wrapping each LLM decoder layer and ViT block.
- `vlsafe.scale.FSDP2` — Lightning `ModelParallelStrategy` with FSDP2 `fully_shard` per block.
- `vlsafe.scale.DeepSpeed` — ZeRO-2/3 (+ CPU/NVMe offload) from `zero_config`, checked against the Trainer.
Plain `ddp`, `deepspeed_stage_2`, `deepspeed_stage_3` strings work as Lightning defines them.
Imports are lazy so `import vlsafe.scale` costs nothing until a class is used.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {"FSDP": "vlsafe.scale.fsdp", "BlockWrapPolicy": "vlsafe.scale.fsdp", "FSDP2": "vlsafe.scale.fsdp2",
            "shard_vlm": "vlsafe.scale.fsdp2", "DeepSpeed": "vlsafe.scale.deepspeed",
            "zero_config": "vlsafe.scale.deepspeed", "block_classes": "vlsafe.scale.blocks"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlsafe.scale' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(_EXPORTS[name]), name)
