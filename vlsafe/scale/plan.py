"""Will this recipe fit? Per-GPU memory of a training run, per strategy, and the cheapest change that makes it fit.

Pure functions over dataclasses: the model's counts come from `vlsafe.scale.model_size` (the recipe's model on
the meta device), the run's shape from the recipe (`vlsafe.tools.plan` reads it). What each strategy holds
per GPU (N = processes that share the shards, P = parameters, T = trainable ones, b = bytes of their dtype):

| strategy | parameters | gradients | optimizer (AdamW) | transient |
|---|---|---|---|---|
| DDP | P·b | T·b | 2·T·b | a gradient-bucket copy T·b |
| FSDP / FSDP2 (full shard) | P·b/N | T·b/N | 2·T·b/N | two gathered blocks (+ FSDP2's root unit) |
| ZeRO-2 (bf16) | P·2 | T·2/N | T·12/N (fp32 master, m, v) | reduce/all-gather buckets |
| ZeRO-3 (bf16) | P·2/N | T·2/N | T·12/N | prefetched blocks + buckets |

Offload moves the optimizer (and with parameter offload, the parameters) to host memory. The reference
model of preference training is frozen: a `copy` costs the policy's frozen-parameter bytes again (a frozen
vision tower is shared, so not counted twice), `adapter` only a projector copy, `precomputed` nothing.

Activations are an estimate for a Llama-style decoder with SDPA/flash attention (no s×s scores kept): per
token and layer, the tensors backward needs, `28·h + 8·i` bytes in bf16 (attention inputs, q/k/v and their
rotated copies, the attention output, the SwiGLU gate/up/product, RMSNorm inputs kept in fp32), scaled for
fp32 compute; with gradient checkpointing each layer keeps only its input and one layer is recomputed at a
time. Every row is taken at the full sequence length (image tokens included), so it is an upper bound for
padded batches. The LM head's logits (bf16, their fp32 copy and its gradient) are counted on the text positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from vlsafe.scale.model_size import ModelCount

GIB = 1024 ** 3
STRATEGIES = ("ddp", "fsdp", "fsdp2", "zero2", "zero3")
REFERENCES = ("none", "copy", "adapter", "precomputed")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
CONTEXT_BYTES = int(1.5 * GIB)  # CUDA context, cuBLAS/NCCL workspaces, allocator slack: an assumption, shown as such
DEEPSPEED_BUCKET_ELEMENTS = 2 * 200_000_000  # Lightning's reduce + all-gather bucket defaults (2e8 elements each)


class PlanError(ValueError):
    """A setting the planner cannot work with (unknown strategy, no GPU memory, ...)."""


@dataclass(frozen=True)
class Strategy:
    """How parameters, gradients and optimizer states are spread over the processes."""

    kind: str  # one of STRATEGIES
    shard_group: int | None = None  # processes sharing one shard set (FSDP HYBRID_SHARD: GPUs per node)
    reshard_after_forward: bool = True  # FSDP FULL_SHARD / FSDP2 default; False = SHARD_GRAD_OP-like
    param_dtype_bytes: int | None = None  # FSDP2 mixed precision: bytes of the gathered compute copy
    offload_optimizer: bool = False
    offload_parameters: bool = False
    activation_checkpointing: bool = False  # the strategy's own (FSDP/FSDP2 `activation_checkpointing`)

    def __post_init__(self) -> None:
        if self.kind not in STRATEGIES:
            raise PlanError(f"unknown strategy {self.kind!r}; the planner knows {', '.join(STRATEGIES)}")

    @property
    def label(self) -> str:
        """Short column name: `ZeRO-3 offload` (optimizer and parameters), `FSDP2 no-reshard`, ..."""
        names = {"ddp": "DDP", "fsdp": "FSDP", "fsdp2": "FSDP2", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}
        label = names[self.kind]
        if self.kind in ("fsdp", "fsdp2") and not self.reshard_after_forward:
            label += " no-reshard"
        if self.shard_group:
            label += " hybrid"
        if self.offload_optimizer and self.offload_parameters:
            label += " offload"
        elif self.offload_optimizer:
            label += " offload-opt" if self.kind.startswith("zero") else " offload"
        return label


@dataclass(frozen=True)
class Workload:
    """The shape of one training step on one GPU."""

    gpus: int
    micro_batch: int
    seq_len: int  # tokens per row, image tokens included (the builder's max_length)
    precision: str = "bf16-mixed"
    gradient_checkpointing: bool = False  # the module's own switch
    rows_per_sample: int = 1  # sequences per sample through the policy: 2 for DPO pairs, 3 with BPO `blind: sum`
    reference: str = "none"
    train_vision: bool = False

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise PlanError(f"GPU count must be at least 1, got {self.gpus}")
        if self.micro_batch < 1 or self.seq_len < 1:
            raise PlanError(f"micro-batch and sequence length must be positive (got {self.micro_batch}, {self.seq_len})")
        if self.precision not in PRECISIONS:
            raise PlanError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.reference not in REFERENCES:
            raise PlanError(f"unknown reference {self.reference!r}; use one of {', '.join(REFERENCES)}")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU, by what holds them; host bytes for what offload moves off the GPU."""

    strategy: str
    rows: dict[str, int]
    gpu_bytes: int
    host_bytes: int = 0
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes

    @property
    def headroom(self) -> int:
        return self.gpu_bytes - self.total


@dataclass(frozen=True)
class Change:
    """One edit to the recipe, what it costs (a rank, not a time: higher = slower or further from the paper)."""

    name: str
    cost: int
    recipe_edit: str


@dataclass(frozen=True)
class Fix:
    changes: tuple[Change, ...]
    plan: MemoryPlan

    @property
    def description(self) -> str:
        return " + ".join(c.name for c in self.changes)


@dataclass(frozen=True)
class Setup:
    """Everything a plan depends on; the search for a fix edits copies of it."""

    model: ModelCount
    strategy: Strategy
    workload: Workload
    lora_model: ModelCount | None = None  # the same recipe with LoRA (offered as a change when given)
    applied: tuple[Change, ...] = field(default=())


# ---------------------------------------------------------------------------------------------- the model
def _bytes_per(total_bytes: int, count: int) -> float:
    return total_bytes / count if count else 0.0


def _deepspeed_low_precision(workload: Workload) -> bool:
    return workload.precision != "32-true"


def _compute_bytes(strategy: Strategy, workload: Workload, storage: float) -> float:
    """Bytes per element of activations and gathered weights."""
    if strategy.param_dtype_bytes:
        return strategy.param_dtype_bytes
    if workload.precision != "32-true":
        return 2
    return storage


def activation_bytes(model: ModelCount, workload: Workload, strategy: Strategy) -> int:
    """Estimated bytes kept for backward on one GPU (see the module docstring for the formula)."""
    storage = _bytes_per(model.parts["llm"].bytes, model.parts["llm"].total)
    act = _compute_bytes(strategy, workload, storage)
    scale = act / 2  # the per-token coefficients below are for 16-bit activations
    rows = workload.micro_batch * workload.rows_per_sample
    tokens = rows * workload.seq_len
    h, i = model.llm_hidden, model.llm_intermediate
    per_layer_token = (28 * h + 8 * i) * scale
    checkpointing = workload.gradient_checkpointing or strategy.activation_checkpointing
    if checkpointing:
        layers = model.llm_layers * h * act * tokens + per_layer_token * tokens  # layer inputs + one recomputed layer
    else:
        layers = model.llm_layers * per_layer_token * tokens
    text_positions = max(workload.seq_len - model.image_tokens, 1)
    logits = rows * text_positions * model.vocab_size * (act + 4 + 4)
    vision = 0.0
    if workload.train_vision and model.vision_layers:
        images = workload.micro_batch  # the image is encoded once per sample and shared across its responses
        vision_tokens = images * (model.image_tokens + 1)
        per_block = 34 * model.vision_hidden * scale * vision_tokens
        vision = (model.vision_hidden * act * vision_tokens * model.vision_layers + per_block if checkpointing
                  else per_block * model.vision_layers)
    return int(layers + logits + vision)


def _reference_bytes(setup: Setup, shards: int, deepspeed_bytes: int | None) -> int:
    model, reference = setup.model, setup.workload.reference
    if reference in ("none", "precomputed"):
        return 0
    if reference == "adapter":
        return setup.model.parts["projector"].bytes  # the starting projector; the base LLM is the policy's own
    # copy: the frozen starting model; a frozen tower is shared with the policy; a LoRA policy's copy is merged,
    # so its adapters (the LLM's trainable parameters) are not in it
    llm = model.parts["llm"]
    parts = [model.parts["projector"]] + ([model.parts["vision"]] if setup.workload.train_vision else [])
    llm_count, llm_bytes = (llm.total - llm.trainable, llm.bytes - llm.trainable_bytes) if model.lora else (
        llm.total, llm.bytes)
    if deepspeed_bytes:  # DeepSpeed casts the whole module, reference included, to its 16-bit dtype
        total = (llm_count + sum(p.total for p in parts)) * deepspeed_bytes
    else:
        total = llm_bytes + sum(p.bytes for p in parts)
    return int(total / shards)


def plan_memory(setup: Setup, gpu_gib: float) -> MemoryPlan:
    """Per-GPU bytes of `setup` on GPUs with `gpu_gib` GiB each."""
    if not gpu_gib or gpu_gib <= 0:
        raise PlanError(f"GPU memory must be a positive number of GiB, got {gpu_gib!r}")
    model, strategy, workload = setup.model, setup.strategy, setup.workload
    n = workload.gpus
    group = min(strategy.shard_group or n, n)
    storage = _bytes_per(model.bytes, model.total)
    trainable_storage = _bytes_per(model.trainable_bytes, model.trainable)
    notes: list[str] = []
    rows: dict[str, float] = {}
    host = 0.0
    kind = strategy.kind
    if kind in ("zero2", "zero3"):
        low = _deepspeed_low_precision(workload)
        p_bytes, g_bytes = (2, 2) if low else (4, 4)
        o_bytes = 12 if low else 8  # fp32 master + exp_avg + exp_avg_sq (no separate master in fp32)
        params = model.total * p_bytes / (n if kind == "zero3" else 1)
        grads = model.trainable * g_bytes / n
        optimizer = model.trainable * o_bytes / n
        if strategy.offload_optimizer:
            host += optimizer
            optimizer = 0.0
        if strategy.offload_parameters and kind == "zero3":
            host += params
            params = 0.0
        gathered = (2 * model.largest_block * p_bytes + model.output_embedding * p_bytes) if kind == "zero3" else 0
        rows.update(parameters=params, gradients=grads, optimizer=optimizer,
                    reference=_reference_bytes(setup, n if kind == "zero3" else 1, p_bytes),
                    gathered=gathered + DEEPSPEED_BUCKET_ELEMENTS * g_bytes)
        notes.append(f"DeepSpeed {'bf16' if low else 'fp32'}: parameters {p_bytes} B, gradients {g_bytes} B, "
                     f"optimizer {o_bytes} B per trainable parameter")
    else:
        shards = 1 if kind == "ddp" else group
        params = model.bytes / shards
        grads = model.trainable_bytes / shards
        optimizer = 2 * model.trainable_bytes / shards  # AdamW exp_avg + exp_avg_sq in the parameter's dtype
        if strategy.offload_optimizer and kind != "ddp":  # FSDP cpu_offload: parameters, gradients and states
            host += params + grads + optimizer
            params = grads = optimizer = 0.0
        compute = _compute_bytes(strategy, workload, storage)
        if kind == "ddp":
            gathered = model.trainable_bytes  # gradient buckets (gradient_as_bucket_view=False)
        elif strategy.reshard_after_forward:
            gathered = 2 * model.largest_block * compute + (model.output_embedding * compute if kind == "fsdp2" else 0)
        else:
            gathered = model.total * compute  # every unit stays gathered from forward to backward
        rows.update(parameters=params, gradients=grads, optimizer=optimizer,
                    reference=_reference_bytes(setup, shards, None), gathered=gathered)
        if trainable_storage and trainable_storage != storage:
            notes.append(f"trainable parameters stored in {trainable_storage:.0f} B, all parameters {storage:.2f} B "
                         f"on average")
    rows["activations"] = activation_bytes(model, workload, strategy)
    rows["context"] = CONTEXT_BYTES
    return MemoryPlan(strategy=strategy.label, rows={k: int(v) for k, v in rows.items()}, gpu_bytes=int(gpu_gib * GIB),
                      host_bytes=int(host), notes=tuple(notes))


# ---------------------------------------------------------------------------------------------- fixes
def _changes(setup: Setup) -> list[tuple[Change, Callable[[Setup], Setup]]]:
    """The edits that apply to `setup`, each with a function that makes the edited setup."""
    s, w = setup.strategy, setup.workload
    out: list[tuple[Change, Callable[[Setup], Setup]]] = []
    if w.reference == "copy":
        out.append((Change("precomputed reference", 1,
                           "model.init_args.reference: precomputed (after `vlsafe precompute-reference`)"),
                    lambda x: replace(x, workload=replace(x.workload, reference="precomputed"))))
    if s.kind == "ddp":
        out.append((Change("FSDP2 sharding", 2, "--config recipes/strategies/fsdp2.yaml"),
                    lambda x: replace(x, strategy=Strategy("fsdp2", activation_checkpointing=x.strategy.activation_checkpointing))))
    if s.kind == "zero2":
        out.append((Change("ZeRO-3", 2, "--config recipes/strategies/deepspeed_zero3.yaml"),
                    lambda x: replace(x, strategy=replace(x.strategy, kind="zero3"))))
    if s.kind in ("fsdp", "fsdp2") and not s.reshard_after_forward:
        out.append((Change("reshard after forward", 2, "FULL_SHARD / reshard_after_forward: true"),
                    lambda x: replace(x, strategy=replace(x.strategy, reshard_after_forward=True))))
    if not (w.gradient_checkpointing or s.activation_checkpointing):
        out.append((Change("gradient checkpointing", 3, "model.init_args.gradient_checkpointing: true"),
                    lambda x: replace(x, workload=replace(x.workload, gradient_checkpointing=True))))
    if not any(c.name.startswith("micro-batch") for c in setup.applied):
        smaller, halvings = w.micro_batch // 2, 1
        while smaller >= 1:  # one change per size, costed by the halvings: accumulation keeps the global batch
            factor = w.micro_batch // smaller
            out.append((Change(f"micro-batch {smaller}", 2 * halvings,
                               f"data.init_args.batch_size: {smaller} and trainer.accumulate_grad_batches "
                               f"x{factor} (same global batch)"),
                        lambda x, size=smaller: replace(x, workload=replace(x.workload, micro_batch=size))))
            smaller, halvings = smaller // 2, halvings + 1
    if s.kind != "ddp" and not s.offload_optimizer:
        edit = ("offload_optimizer: true" if s.kind.startswith("zero") else "cpu_offload: true")
        out.append((Change("CPU offload (optimizer)", 5, f"trainer.strategy.init_args.{edit}"),
                    lambda x: replace(x, strategy=replace(x.strategy, offload_optimizer=True))))
    if s.kind == "zero3" and not s.offload_parameters:
        out.append((Change("CPU offload (parameters)", 6, "trainer.strategy.init_args.offload_parameters: true"),
                    lambda x: replace(x, strategy=replace(x.strategy, offload_parameters=True))))
    if setup.lora_model is not None and not setup.model.lora:
        out.append((Change("LoRA", 8, "model.init_args.lora: {r: 128, alpha: 256, target_modules: all-linear}"),
                    lambda x: replace(x, model=x.lora_model,
                                      workload=replace(x.workload, reference="adapter")
                                      if x.workload.reference == "copy" else x.workload)))
    return out


def cheapest_fix(setup: Setup, gpu_gib: float, max_changes: int = 4) -> Fix | None:
    """The lowest-cost set of changes after which the plan fits (ties: more headroom), or None.

    Every sequence of up to `max_changes` applicable changes is planned, so the answer is computed from the
    same memory model as the table, not read from a list. Cost ranks: precomputed reference 1, sharding /
    smaller micro-batch 2, checkpointing 3, optimizer offload 5, parameter offload 6, LoRA 8 (changes the method).
    """
    best: Fix | None = None
    best_key: tuple[int, int] | None = None
    frontier = [setup]
    seen: set[tuple[str, ...]] = set()
    for _ in range(max_changes):
        next_frontier = []
        for current in frontier:
            for change, apply in _changes(current):
                names = tuple(sorted(c.name for c in (*current.applied, change)))
                if names in seen:
                    continue
                seen.add(names)
                edited = replace(apply(current), applied=(*current.applied, change))
                plan = plan_memory(edited, gpu_gib)
                cost = sum(c.cost for c in edited.applied)
                if plan.fits:
                    key = (cost, -plan.headroom)
                    if best_key is None or key < best_key:
                        best, best_key = Fix(edited.applied, plan), key
                else:
                    next_frontier.append(edited)
        frontier = next_frontier
    return best


def single_changes(setup: Setup, gpu_gib: float) -> list[Fix]:
    """What each applicable change alone would give (for the table under a verdict)."""
    return [Fix((change,), plan_memory(replace(apply(setup), applied=(change,)), gpu_gib))
            for change, apply in _changes(setup)]


def as_gib(value: int) -> float:
    return round(value / GIB, 2)


def plan_dict(plan: MemoryPlan) -> dict:
    """JSON-ready plan (GiB rounded to 0.01)."""
    return {"strategy": plan.strategy, "per_gpu_gib": {k: as_gib(v) for k, v in plan.rows.items()},
            "total_gib": as_gib(plan.total), "gpu_gib": as_gib(plan.gpu_bytes), "fits": plan.fits,
            "headroom_gib": as_gib(plan.headroom), "host_gib": as_gib(plan.host_bytes), "notes": list(plan.notes)}

