"""Lightning's FSDP (FSDP1) with the wrap policy derived from the model: `trainer.strategy: vlsafe.scale.FSDP`.

Each LLM decoder layer and each ViT block becomes one FSDP unit (and, with `activation_checkpointing`,
one checkpointed region); the projector, embeddings and LM head stay in the root unit. The classes are
found when the model is wrapped (see `vlsafe.scale.blocks`), so the same recipe line works for Llama,
Vicuna, Mistral or Qwen2 LLMs and any open_clip ViT.

`use_orig_params=True` (Lightning's default, kept) is what lets one FSDP unit hold frozen and trainable
parameters together: a LoRA-wrapped decoder layer (frozen base, trainable adapters) or a partly frozen
model, with the optimizer seeing only `requires_grad` parameters.
"""
from __future__ import annotations

from typing import Any, Iterable, Literal

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from vlsafe.scale.blocks import block_classes


class BlockWrapPolicy(ModuleWrapPolicy):
    """A `ModuleWrapPolicy` whose classes are the model's transformer blocks, resolved on first use.

    FSDP hands the policy the root module (`_run_policy`) and `apply_activation_checkpointing` calls it
    with the root first, so the classes are read off the real model; `extra` adds class names.
    """

    def __init__(self, extra: Iterable[str] = ()):
        super().__init__(())
        self.extra = tuple(extra)
        self.resolved: set[type[nn.Module]] | None = None

    def resolve(self, root: nn.Module) -> set[type[nn.Module]]:
        if self.resolved is None:
            self.resolved = block_classes(root, self.extra)
            self._module_classes = set(self.resolved)
            self._module_classes_str = str(self._module_classes)
        return self.resolved

    def _run_policy(self, root_module: nn.Module, ignored_modules: set[nn.Module],
                    root_kwargs: dict[str, Any]) -> dict[nn.Module, dict[str, Any]]:
        self.resolve(root_module)
        return super()._run_policy(root_module, ignored_modules, root_kwargs)

    def __call__(self, module: nn.Module, recurse: bool, *args: Any, **kwargs: Any) -> bool:
        if self.resolved is None:  # the first call is on the root (torch's _recursive_wrap)
            self.resolve(module)
        return super().__call__(module, recurse, *args, **kwargs)


class FSDP(FSDPStrategy):
    """`FSDPStrategy` preset for VLMs: block-level wrapping and optional activation checkpointing.

    - `sharding_strategy`: FULL_SHARD (ZeRO-3-like), SHARD_GRAD_OP (ZeRO-2-like), HYBRID_SHARD (shard
      within a node, replicate across nodes), NO_SHARD.
    - `state_dict_type`: `sharded` (one DCP folder, every rank writes its shard; fast, the default) or
      `full` (gathered on rank 0 into one file). `tools/export.py` reads both.
    - `activation_checkpointing`: recompute each block in backward. Leave the module's
      `gradient_checkpointing` off when this is on (checkpointing twice only costs time).
    - `extra_block_classes`: more class names to wrap (and checkpoint) besides the discovered blocks.
    Remaining keyword arguments go to `FSDPStrategy` / `FullyShardedDataParallel` unchanged.
    """

    def __init__(self, sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
                 state_dict_type: Literal["full", "sharded"] = "sharded", activation_checkpointing: bool = False,
                 cpu_offload: bool = False, extra_block_classes: list[str] | None = None,
                 limit_all_gathers: bool = True, **kwargs: Any):
        self.wrap_policy = BlockWrapPolicy(extra_block_classes or ())
        checkpoint_policy = BlockWrapPolicy(extra_block_classes or ()) if activation_checkpointing else None
        kwargs.setdefault("use_orig_params", True)
        super().__init__(auto_wrap_policy=self.wrap_policy, activation_checkpointing_policy=checkpoint_policy,
                         sharding_strategy=sharding_strategy, state_dict_type=state_dict_type,
                         cpu_offload=cpu_offload, limit_all_gathers=limit_all_gathers, **kwargs)
