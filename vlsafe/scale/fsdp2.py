"""FSDP2 (`torch.distributed.fsdp.fully_shard`) under Lightning's `ModelParallelStrategy`.

`trainer.strategy: vlsafe.scale.FSDP2` shards every parameter across all processes (data parallel size =
world size, no tensor parallelism) and lets `VLMModule.configure_model` call `shard_vlm` on the core:
one FSDP2 unit per LLM decoder layer and per ViT block, one each for the vision tower, projector and
token embedding, and the VLM as the root. This is the path proven on CPU here (2 processes, gloo):
training, distributed checkpoint save and resume.

FSDP2 keeps parameter names and `requires_grad` per parameter (DTensors), so frozen towers and LoRA
adapters need no special flag: the optimiser is built from `requires_grad` parameters after sharding.
Trainable parameters outside the VLM (a method's own heads) are kept whole on every rank and their
gradients averaged once per optimizer step (`average_gradients`), as DDP would.
"""
from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from vlsafe.scale.blocks import block_classes, describe

# Methods that run parts of the VLM outside `VLM.forward` (preference methods encode images once and
# reuse the features); registering them makes FSDP2 gather the root's parameters around each call.
FORWARD_METHODS = ("vision_features", "project", "encode_images", "embed", "generate")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


class FSDP2(ModelParallelStrategy):
    """`ModelParallelStrategy` preset: pure FSDP2 over all processes, sharding options for `shard_vlm`.

    - `reshard_after_forward`: free gathered block weights after forward (ZeRO-3-like, default) or keep
      them until backward (ZeRO-2-like: more memory, less communication).
    - `param_dtype` / `reduce_dtype`: FSDP2 mixed precision (e.g. `bf16` / `fp32`); None keeps the
      parameters' dtype. Use with `precision: 32-true` or `bf16-true` in the Trainer.
    - `activation_checkpointing`: recompute every block in backward.
    - `cpu_offload`: keep sharded parameters, gradients and optimizer state in CPU memory.
    """

    def __init__(self, data_parallel_size: int | Literal["auto"] = "auto",
                 tensor_parallel_size: int | Literal["auto"] = 1, save_distributed_checkpoint: bool = True,
                 reshard_after_forward: bool = True, param_dtype: str | None = None, reduce_dtype: str | None = None,
                 activation_checkpointing: bool = False, cpu_offload: bool = False, **kwargs: Any):
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value is not None and value not in _DTYPES:
                raise ValueError(f"FSDP2 {name}={value!r}; use one of {sorted(_DTYPES)} or null")
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.activation_checkpointing, self.cpu_offload = activation_checkpointing, cpu_offload

    def setup_environment(self) -> None:
        # Lightning's "auto" means dp = number of nodes and tp = devices per node; vlsafe applies no tensor
        # parallelism, so "auto" here means: shard over every process.
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard_options(self) -> dict[str, Any]:
        return {"reshard_after_forward": self.reshard_after_forward, "param_dtype": self.param_dtype,
                "reduce_dtype": self.reduce_dtype, "activation_checkpointing": self.activation_checkpointing,
                "cpu_offload": self.cpu_offload}


def _fsdp_kwargs(mesh: Any, reshard_after_forward: bool, param_dtype: str | None, reduce_dtype: str | None,
                 cpu_offload: bool) -> dict[str, Any]:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype or reduce_dtype:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype] if param_dtype else None,
                                                   reduce_dtype=_DTYPES[reduce_dtype] if reduce_dtype else None)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    return kwargs


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def _input_embeddings(vlm: nn.Module) -> nn.Module | None:
    """The LLM's token embedding, unless it is tied to the LM head (then it must stay in the root unit)."""
    llm = getattr(vlm, "llm", None)
    if llm is None or not hasattr(llm, "get_input_embeddings"):
        return None
    embed, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    return None if head is not None and head.weight is embed.weight else embed


def shard_vlm(vlm: nn.Module, mesh: Any, reshard_after_forward: bool = True, param_dtype: str | None = None,
              reduce_dtype: str | None = None, activation_checkpointing: bool = False,
              cpu_offload: bool = False) -> set[type[nn.Module]]:
    """Apply `fully_shard` bottom-up and return the block classes.

    Units: every block; the vision tower, the projector and the token embedding, because methods call
    them outside `VLM.forward` (`vision_features`, `project`, `embed`); the VLM itself as the root (final
    norm, LM head). Modules that already are FSDP2 units (a frozen tower shared with a reference model
    sharded first) are left alone, so a shared tower is sharded once.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # FSDP2 warns on every call of a unit whose output is a view (Linear on 3-D input, the LM output);
    # vlsafe never modifies those outputs in place, which is what the warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")
    kwargs = _fsdp_kwargs(mesh, reshard_after_forward, param_dtype, reduce_dtype, cpu_offload)
    classes = block_classes(vlm)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointWrapper,
            apply_activation_checkpointing,
        )
        apply_activation_checkpointing(vlm, check_fn=lambda m: isinstance(m, tuple(classes)))
        blocks = [m for m in vlm.modules() if isinstance(m, CheckpointWrapper)]
    else:
        blocks = [m for m in vlm.modules() if isinstance(m, tuple(classes))]
    parts = [getattr(vlm, "vision", None), getattr(vlm, "projector", None), _input_embeddings(vlm)]
    for module in [*blocks, *parts]:
        if module is not None and not _is_sharded(module):
            fully_shard(module, **kwargs)
    if not _is_sharded(vlm):
        fully_shard(vlm, **{**kwargs, "reshard_after_forward": False})
    # Entry points other than forward run the root's hooks too (lazy init, gathering the LM head).
    for name in FORWARD_METHODS:
        if hasattr(vlm, name):
            register_fsdp_forward_method(vlm, name)
    return classes


def shard_report(classes: set[type[nn.Module]], vlm: nn.Module) -> str:
    from torch.distributed.fsdp import FSDPModule
    units = sum(isinstance(m, FSDPModule) for m in vlm.modules())
    return f"FSDP2: {units} units (blocks: {describe(classes)}; vision tower, projector, embeddings, root)"


def replicated_trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters that no FSDP2 unit manages (a method's own heads outside the VLM)."""
    from torch.distributed.tensor import DTensor

    return [p for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]


def broadcast_parameters(params: list[nn.Parameter], mesh: Any) -> None:
    """Start every rank from rank 0's values of the replicated parameters."""
    import torch.distributed as dist

    group = mesh.get_group()
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=dist.get_global_rank(group, 0), group=group)


def average_gradients(params: list[nn.Parameter], mesh: Any) -> None:
    """Average the replicated parameters' gradients over the data-parallel group, as DDP would.

    Called once per optimizer step on every rank with the same parameter list, so the collectives always
    match, also when a head received no gradient on some rank (it then contributes zeros).
    """
    import torch.distributed as dist

    group = mesh.get_group()
    size = dist.get_world_size(group)
    for param in params:
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        dist.all_reduce(grad, group=group)
        param.grad = grad.div_(size)
