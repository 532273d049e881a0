"""What every method module shares: building the core, trainability, optimiser and schedule, generation.

Methods subclass `VLMModule` (text-only ones `MethodModule`) and add their loss, metrics and
`data_encoder(stage)`. Hyperparameters are
stored as plain data (the builder's `config()`), so checkpoints load with `torch.load(weights_only=True)`
and `Module.load_from_checkpoint(path)` rebuilds the same model.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import lightning as L
import torch

from vlsafe.builders import VLMBuilder, build_on_meta
from vlsafe.core.lora import (
    LoraSettings,
    count_parameters,
    enable_gradient_checkpointing,
    peft_free_name,
    set_trainable,
)
from vlsafe.core.streaming import materialize
from vlsafe.core.vlm import VLM
from vlsafe.data.encoding.processor import VLMProcessor
from vlsafe.scale.deepspeed import register_zero3_external_parameters
from vlsafe.scale.fsdp2 import (
    average_gradients,
    broadcast_parameters,
    replicated_trainable_parameters,
    shard_report,
    shard_vlm,
)

Schedule = Literal["cosine", "linear", "constant"]
Fused = Literal["auto", "true", "false"]


@dataclass
class OptimSettings:
    """AdamW with LLaVA-style parameter groups and a warmup + decay schedule stepped per optimiser step.

    `projector_lr` / `vision_lr` give those modules their own learning rate (LLaVA-1.5 LoRA: 2e-4 for the
    LLM adapters, 2e-5 for the projector). Biases and norm weights get no weight decay.

    `fused` picks torch's fused AdamW kernel, one kernel over all parameters instead of a Python loop over
    them (about 3x faster optimizer steps on CPU; the same maths up to float rounding):
    `auto` uses it whenever every trainable parameter allows it (floating point, a device with the kernel,
    a plain or FSDP2 DTensor parameter; not under DeepSpeed, which runs its own optimizer), `true` requires
    it (an error names the parameter that prevents it), `false` keeps torch's default implementation.
    """

    lr: float = 2e-5
    projector_lr: float | None = None
    vision_lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.0
    fused: Fused | bool = "auto"


FUSED_CHOICES: tuple[str, ...] = get_args(Fused)


@dataclass
class GenerationSettings:
    """Defaults for `generate` (greedy unless `do_sample`)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    num_beams: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def _as(cls, value):
    if value is None or isinstance(value, cls):
        return value
    return cls(**value)


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    """Multiplier for step `s`: linear warmup to 1, then cosine/linear decay to `min_ratio`, or constant."""
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; use cosine, linear or constant")

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return factor


def fused_adamw_blocker(named_params: list[tuple[str, torch.Tensor]]) -> str | None:
    """Why torch's fused AdamW cannot take these parameters (naming the first one that prevents it), or None.

    The kernel needs floating-point tensors on a device that has it, as plain tensors or DTensors (FSDP2);
    other tensor subclasses (e.g. quantised weights) go through their own code paths.
    """
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    plain_types = (torch.Tensor, torch.nn.Parameter)
    try:
        from torch.distributed.tensor import DTensor
        plain_types += (DTensor,)
    except ImportError:  # torch built without distributed
        pass
    for name, param in named_params:
        if type(param) not in plain_types:
            return f"parameter {name} is a {type(param).__name__}, not a plain tensor or DTensor"
        if not torch.is_floating_point(param):
            return f"parameter {name} has dtype {param.dtype}, not floating point"
        if param.device.type not in devices:
            return f"parameter {name} is on {param.device.type}, which has no fused AdamW kernel"
    return None


def _fused_setting(value: str | bool) -> str:
    text = str(value).lower()
    if text not in FUSED_CHOICES:
        raise ValueError(f"optim.fused must be one of {', '.join(FUSED_CHOICES)}, got {value!r}")
    return text


def _silence_known_false_alarms() -> None:
    """Lightning warnings that are wrong for vlsafe by design, filtered by exact message."""
    # The frozen vision tower is kept in eval mode on purpose (no dropout/BN updates in a frozen part).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # ShardStream's len() is exact for any number of workers (it plans every worker's slice).
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


class MethodModule(L.LightningModule):
    """What `tools/fit.py` and the data modules expect of every trainable method, VLM or text-only.

    A method says how a sample becomes tensors (`data_encoder(stage)`), stores its settings as plain data
    (`extra_hparams`), and has `optim: OptimSettings`. `tools/fit.py` accepts any subclass in a recipe.
    """

    optim: OptimSettings

    def extra_hparams(self) -> dict[str, Any]:
        """Subclasses add their own constructor arguments here (plain data only)."""
        return {}

    # ------------------------------------------------------------------ data
    def data_encoder(self, stage: str):
        raise NotImplementedError

    # ------------------------------------------------------------------ optimisation
    def _use_fused_adamw(self, groups: list[dict[str, Any]]) -> bool | None:
        """`optim.fused` resolved against the parameters the optimizer gets (None: torch's default)."""
        setting = _fused_setting(self.optim.fused)
        if setting == "false":
            return None
        from lightning.pytorch.strategies import DeepSpeedStrategy

        trainer = self._trainer
        if trainer is not None and isinstance(trainer.strategy, DeepSpeedStrategy):
            blocker = "DeepSpeed steps the optimizer on its own flattened partitions (configure its optimizer instead)"
        else:
            names = {id(param): name for name, param in self.named_parameters()}
            blocker = fused_adamw_blocker([(names.get(id(param), "?"), param)
                                           for group in groups for param in group["params"]])
        if blocker is None:
            return True
        if setting == "true":
            raise ValueError(f"optim.fused=true, but torch's fused AdamW cannot be used: {blocker}; "
                             f"set optim.fused to auto or false")
        return None


class VLMModule(MethodModule):
    """A method that owns one VLM core and its processor."""

    def __init__(self, vlm: VLMBuilder, lora: LoraSettings | None = None, train_vision: bool = False,
                 train_projector: bool = True, train_llm: bool = True, gradient_checkpointing: bool = False,
                 optim: OptimSettings | None = None, generation: GenerationSettings | None = None):
        super().__init__()
        _silence_known_false_alarms()
        builder = vlm if isinstance(vlm, VLMBuilder) else VLMBuilder.from_config(vlm)
        self.lora = _as(LoraSettings, lora)
        self.optim = _as(OptimSettings, optim) or OptimSettings()
        _fused_setting(self.optim.fused)  # a typo fails at construction, not at the first optimiser step
        self.generation = _as(GenerationSettings, generation) or GenerationSettings()
        self.save_hyperparameters({
            "vlm": builder.config(), "lora": asdict(self.lora) if self.lora else None, "train_vision": train_vision,
            "train_projector": train_projector, "train_llm": train_llm,
            "gradient_checkpointing": gradient_checkpointing, "optim": asdict(self.optim),
            "generation": asdict(self.generation), **self.extra_hparams()})
        self._weights = None  # streamed load: where configure_model reads this rank's tensors from
        if getattr(builder, "load", "eager") == "streamed":
            skeleton = build_on_meta(builder)
            self.vlm, self.processor, self._weights = skeleton.vlm, skeleton.processor, skeleton.weights
        else:
            self.vlm, self.processor = builder.build()
        self.vlm.train()  # loaders return eval-mode models; Lightning 2.6 no longer calls .train() for us
        set_trainable(self.vlm, train_vision=train_vision, train_projector=train_projector, train_llm=train_llm,
                      lora=self.lora)
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.vlm, vision=train_vision)

    # ------------------------------------------------------------------ optimisation
    def _param_groups(self) -> list[dict[str, Any]]:
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, param in self.vlm.named_parameters():
            if not param.requires_grad:
                continue
            part = "projector" if name.startswith("projector.") else "vision" if name.startswith("vision.") else "llm"
            decay = param.ndim >= 2 and "norm" not in name.lower()
            groups.setdefault((part, decay), []).append(param)
        lrs = {"llm": self.optim.lr,
               "projector": self.optim.lr if self.optim.projector_lr is None else self.optim.projector_lr,
               "vision": self.optim.lr if self.optim.vision_lr is None else self.optim.vision_lr}
        return [{"params": params, "lr": lrs[part], "weight_decay": self.optim.weight_decay if decay else 0.0,
                 "name": f"{part}{'' if decay else '_no_decay'}"} for (part, decay), params in groups.items()]

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self._param_groups()
        if not groups:
            raise ValueError("nothing to train: every parameter is frozen (check train_* flags and lora)")
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps,
                                      fused=self._use_fused_adamw(groups))
        total = int(self.trainer.estimated_stepping_batches)
        warmup = self.optim.warmup_steps if self.optim.warmup_steps is not None else int(
            round(self.optim.warmup_ratio * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.optim.schedule, warmup, total, self.optim.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ sharding
    def sharded_cores(self) -> list[VLM]:
        """The VLMs `configure_model` shards under FSDP2: the trained core first, then frozen copies
        (e.g. a DPO reference), so a vision tower they share becomes a unit of the trained core."""
        cores = [self.vlm]
        cores += [m for m in self.children() if isinstance(m, VLM) and m is not self.vlm]
        return cores

    def materialize(self, device: torch.device | str = "cpu") -> None:
        """`load: streamed`: read every parameter still on the meta device from the checkpoint, tensor by tensor
        (only this rank's rows of FSDP2-sharded ones). A no-op for eager loads and when already done."""
        if self._weights is None:
            return

        for core in self.sharded_cores():
            materialize(core, self._weights, device=device, rename=peft_free_name)

    def configure_model(self) -> None:
        """Under `ModelParallelStrategy` (e.g. `vlsafe.scale.FSDP2`), shard each core with FSDP2.

        Under DeepSpeed ZeRO-3, register the vision tower's externally used parameters. Other strategies
        need nothing here: DDP replicates, Lightning's FSDP wraps the whole module itself. Called once per
        Trainer entry point, so it is a no-op when already sharded. With `load: streamed` the cores are on the
        meta device until here: sharded first, then each rank reads only its shard (FSDP2); every other
        strategy (and no Trainer, e.g. `load_from_checkpoint`) reads the whole model, tensor by tensor.
        """
        from lightning.pytorch.strategies import (
            DeepSpeedStrategy,
            ModelParallelStrategy,
        )

        if not hasattr(self, "_unsharded_counts"):
            self._unsharded_counts = count_parameters(self.vlm)
        trainer = self._trainer
        model_parallel = trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)
        if not model_parallel:
            self.materialize()
        if trainer is not None and isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3:
            register_zero3_external_parameters(self)
        if not model_parallel:
            return
        from torch.distributed.fsdp import FSDPModule


        mesh = self.device_mesh
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(f"vlsafe shards with FSDP2 only, but the device mesh has tensor_parallel size "
                             f"{mesh['tensor_parallel'].size()}: use strategy vlsafe.scale.FSDP2 or "
                             f"ModelParallelStrategy(data_parallel_size=<world size>, tensor_parallel_size=1)")
        options = trainer.strategy.shard_options() if hasattr(trainer.strategy, "shard_options") else {}
        for core in self.sharded_cores():
            if isinstance(core, FSDPModule):
                continue
            shared = core is not self.vlm and core.vision is self.vlm.vision
            if shared:
                # A frozen tower shared with the trained core stays a unit of the trained core only: FSDP2
                # allows one root per unit, so the copy refers to it without owning it as a submodule.
                vision = core._modules.pop("vision")
                object.__setattr__(core, "vision", vision)
            classes = shard_vlm(core, mesh["data_parallel"], **options)
            if core is self.vlm:
                self.print(f"vlsafe: {shard_report(classes, core)} over {mesh['data_parallel'].size()} processes")
        self.materialize("cpu" if options.get("cpu_offload") else trainer.strategy.root_device)
        # A method's own trainable heads outside the cores stay whole on every rank, DDP-style.
        self._replicated = replicated_trainable_parameters(self)
        broadcast_parameters(self._replicated, mesh["data_parallel"])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        replicated = getattr(self, "_replicated", None)
        if replicated:
            average_gradients(replicated, self.device_mesh["data_parallel"])

    def on_fit_start(self) -> None:
        # Counted before sharding when configure_model ran: FSDP1 shows only local shards afterwards.
        trainable, total = getattr(self, "_unsharded_counts", None) or count_parameters(self.vlm)
        self.print(f"vlsafe: {trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_batch(self, batch: dict[str, Any], **overrides: Any) -> list[str]:
        """Generate for a left-padded prompt batch (from `PromptEncoder`); returns decoded responses."""
        settings = {**asdict(self.generation), **overrides}
        extra = settings.pop("extra") or {}
        if not settings["do_sample"]:
            settings.pop("temperature"), settings.pop("top_p"), settings.pop("top_k")
        elif settings.get("top_k") is None:
            settings.pop("top_k")
        tokenizer = self.processor.tokenizer
        new_tokens = self.vlm.generate(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                                       pad_token_id=self.processor.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id, **settings, **extra)
        return [self.processor.decode(row) for row in new_tokens]

    def vlm_core(self) -> VLM:
        return self.vlm

    def processor_for_eval(self) -> VLMProcessor:
        return self.processor
