"""DeepSpeed ZeRO-2/3 for VLMs: an explicit config generator and a strategy that keeps it consistent with the Trainer.

The Trainer stays the single source of truth for precision, gradient clipping, gradient accumulation and
micro-batch size: `zero_config` never writes them, Lightning fills them in from the Trainer, and
`DeepSpeed` refuses a user-supplied config that contradicts the Trainer (a config saying
`gradient_clipping: 1.0` while the Trainer clips at 0.5 would otherwise silently win).

ZeRO-3 also saves 16-bit consolidated weights on `save_checkpoint` only when asked; `tools/export.py`
does the consolidation offline from the ZeRO shards with DeepSpeed's own `zero_to_fp32`.
"""
from __future__ import annotations

import copy
from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy

# Bucket sizes LLaVA's zero2/zero3 configs resolve to for a 4096-wide 7B LLM under HF's "auto" rules
# (hidden^2, 0.9 * hidden^2, 10 * hidden); fine for 13B too. Larger buckets = fewer, bigger collectives.
_BUCKET = 4096 * 4096


def zero_config(stage: int = 2, offload_optimizer: bool = False, offload_parameters: bool = False,
                offload_device: str = "cpu", nvme_path: str = "/local_nvme", pin_memory: bool = True,
                overlap_comm: bool = True, contiguous_gradients: bool = True,
                reduce_bucket_size: int = _BUCKET, allgather_bucket_size: int = 2 * 10**8,
                stage3_prefetch_bucket_size: int = int(0.9 * _BUCKET),
                stage3_param_persistence_threshold: int = 10 * 4096,
                stage3_max_live_parameters: int = 10**9, stage3_max_reuse_distance: int = 10**9,
                sub_group_size: int = 10**9) -> dict[str, Any]:
    """A DeepSpeed config dict for ZeRO stage 2 or 3 with optional optimizer/parameter offload.

    Offloading parameters exists only in stage 3. Precision, clipping, accumulation and batch size are
    deliberately absent (Lightning derives them from the Trainer).
    """
    if stage not in (2, 3):
        raise ValueError(f"ZeRO stage must be 2 or 3, got {stage}")
    if offload_parameters and stage != 3:
        raise ValueError("offload_parameters needs ZeRO stage 3 (stage 2 does not partition parameters)")
    if offload_device not in ("cpu", "nvme"):
        raise ValueError(f"offload_device must be 'cpu' or 'nvme', got {offload_device!r}")
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": overlap_comm, "contiguous_gradients": contiguous_gradients,
                            "reduce_bucket_size": reduce_bucket_size, "reduce_scatter": True}
    if stage == 2:
        zero.update({"allgather_partitions": True, "allgather_bucket_size": allgather_bucket_size})
    else:
        zero.update({"sub_group_size": sub_group_size, "stage3_prefetch_bucket_size": stage3_prefetch_bucket_size,
                     "stage3_param_persistence_threshold": stage3_param_persistence_threshold,
                     "stage3_max_live_parameters": stage3_max_live_parameters,
                     "stage3_max_reuse_distance": stage3_max_reuse_distance,
                     "stage3_gather_16bit_weights_on_model_save": False})
    offload = {"device": offload_device, "pin_memory": pin_memory}
    if offload_device == "nvme":
        offload["nvme_path"] = nvme_path
    if offload_optimizer:
        zero["offload_optimizer"] = dict(offload)
    if offload_parameters:
        zero["offload_param"] = dict(offload)
    # torch's AdamW (what VLMModule builds) is not DeepSpeed's fused Adam; allowed, as in Lightning's default.
    return {"zero_optimization": zero, "zero_allow_untested_optimizer": True}


def _precision_conflict(config: dict[str, Any], precision: str) -> str | None:
    wants = {name for name in ("bf16", "fp16") if (config.get(name) or {}).get("enabled")}
    has = {"bf16"} if "bf16" in precision else {"fp16"} if "16" in precision else set()
    if wants and wants != has:
        return f"the DeepSpeed config enables {sorted(wants)} but the Trainer's precision is {precision!r}"
    return None


def check_consistent(config: dict[str, Any], gradient_clip_val: float | None, gradient_clip_algorithm: str | None,
                     precision: str) -> None:
    """Raise when a DeepSpeed config disagrees with the Trainer on clipping or precision."""
    problems = []
    clip = config.get("gradient_clipping")
    if clip is not None and gradient_clip_val is not None and float(clip) != float(gradient_clip_val):
        problems.append(f"gradient_clipping={clip} in the DeepSpeed config but trainer.gradient_clip_val="
                        f"{gradient_clip_val}")
    if gradient_clip_val and gradient_clip_algorithm not in (None, "norm"):
        problems.append(f"DeepSpeed clips by norm only, but trainer.gradient_clip_algorithm={gradient_clip_algorithm!r}")
    conflict = _precision_conflict(config, precision)
    if conflict:
        problems.append(conflict)
    if problems:
        raise ValueError("DeepSpeed config disagrees with the Trainer: " + "; ".join(problems)
                         + ". Set these on the Trainer only (vlsafe.scale.zero_config leaves them out).")


class DeepSpeed(DeepSpeedStrategy):
    """`DeepSpeedStrategy` built from `zero_config` (or a given config file/dict), checked against the Trainer.

    Recipe line: `strategy: {class_path: vlsafe.scale.DeepSpeed, init_args: {stage: 3, offload_optimizer: true}}`.
    Other keyword arguments go to Lightning's `DeepSpeedStrategy` (e.g. `logging_batch_size_per_gpu`).
    """

    def __init__(self, stage: int = 2, offload_optimizer: bool = False, offload_parameters: bool = False,
                 offload_device: str = "cpu", config: str | dict[str, Any] | None = None, **kwargs: Any):
        if config is None:
            config = zero_config(stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters,
                                 offload_device=offload_device)
        elif isinstance(config, dict):
            config = copy.deepcopy(config)
        super().__init__(config=config, **kwargs)

    def _format_config(self) -> None:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and isinstance(self.config, dict):
            check_consistent(self.config, trainer.gradient_clip_val, trainer.gradient_clip_algorithm,
                             str(self.precision_plugin.precision))
        super()._format_config()


def register_zero3_external_parameters(model: Any) -> int:
    """Tell ZeRO-3 to gather parameters that are used outside their owner's `forward`; returns the count.

    ZeRO-3 gathers a module's own parameters around its `forward`. Two places in a VLM read parameters
    without calling their owner's `forward`, and would see empty (partitioned) tensors:
    - `VisionTower.forward` runs the open_clip ViT through `forward_intermediates`, never
      `VisionTransformer.forward` (class/position embeddings, projection);
    - `nn.MultiheadAttention` (open_clip's attention) passes `out_proj.weight` to the functional
      kernel without calling `out_proj`.
    """
    from deepspeed.runtime.zero import register_external_parameter
    from torch import nn

    from vlsafe.core.vision import VisionTower

    count = 0
    for module in model.modules():
        if isinstance(module, VisionTower):
            params = list(module.visual.parameters(recurse=False))
        elif isinstance(module, nn.MultiheadAttention):
            params = list(module.out_proj.parameters())
        else:
            continue
        for param in params:
            register_external_parameter(module, param)
            count += 1
    return count
