"""Will this recipe fit? Per-GPU memory for the recipe's strategy and the alternatives, a verdict, the cheapest fix.

    vlsafe plan recipes/scale/sft_7b_fsdp2.yaml --gpu-memory 80
    vlsafe plan --config recipes/sft.yaml --config recipes/strategies/fsdp2.yaml --gpus 8 --gpu-memory 40
    vlsafe plan recipes/scale/bpo_13b_deepspeed3.yaml --gpu-memory 40 --json

The model is built from the recipe's own builder on the meta device (exact parameter counts, no weights
read, no memory used; placeholder paths such as /path/to/vicuna-7b-v1.5 use the published architecture of
that name). Later --config files override earlier ones key by key, as `vlsafe fit` merges them. The memory
model and its assumptions: vlsafe/scale/plan.py and docs/scaling.md ("Will it fit?").
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

STRATEGY_CHOICES = ("ddp", "fsdp", "fsdp2", "zero2", "zero3", "zero3-offload")
_DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}
_PRECISION_ALIASES = {"32": "32-true", 32: "32-true", "bf16": "bf16-mixed", "16": "16-mixed", 16: "16-mixed"}


class RecipeError(ValueError):
    """The recipe cannot be planned (no model, unknown strategy, ...)."""


# ---------------------------------------------------------------------------------------------- recipe reading
def merge(base: Any, override: Any) -> Any:
    """`override` on top of `base` key by key; a class spec naming a different class_path replaces the old one."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    if "class_path" in override and override.get("class_path") != base.get("class_path"):
        return override
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base.get(key), value) if key in base else value
    return out


def load_recipe(paths: list[str]) -> dict[str, Any]:
    recipe: dict[str, Any] = {}
    for path in paths:
        file = Path(path)
        if not file.is_file():
            raise RecipeError(f"recipe {path} does not exist")
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
        recipe = merge(recipe, data)
    return recipe


def _args(spec: Any) -> dict[str, Any]:
    return (spec or {}).get("init_args") or {} if isinstance(spec, dict) else {}


def _devices(trainer: dict[str, Any]) -> int:
    devices = trainer.get("devices", 1)
    if isinstance(devices, list):
        devices = len(devices)
    if devices in ("auto", -1, "-1", None):
        raise RecipeError("trainer.devices is 'auto': pass --gpus")
    return int(devices) * int(trainer.get("num_nodes", 1) or 1)


def strategy_from_recipe(spec: Any, devices_per_node: int):
    """trainer.strategy (a Lightning name or a class spec) -> `Strategy`."""
    from vlsafe.scale.plan import Strategy

    if spec in (None, "auto", "single_device") or (isinstance(spec, str) and spec.startswith("ddp")):
        return Strategy("ddp")
    if isinstance(spec, str):
        names = {"fsdp": Strategy("fsdp"), "deepspeed_stage_2": Strategy("zero2"),
                 "deepspeed_stage_2_offload": Strategy("zero2", offload_optimizer=True),
                 "deepspeed_stage_3": Strategy("zero3"),
                 "deepspeed_stage_3_offload": Strategy("zero3", offload_optimizer=True, offload_parameters=True)}
        if spec not in names:
            raise RecipeError(f"unknown strategy {spec!r}; the planner knows ddp, {', '.join(names)} and the class "
                              f"specs vlsafe.scale.FSDP / FSDP2 / DeepSpeed")
        return names[spec]
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise RecipeError(f"trainer.strategy must be a name or a class_path spec, got {spec!r}")
    name, args = spec["class_path"].rpartition(".")[2], _args(spec)
    checkpointing = bool(args.get("activation_checkpointing") or args.get("activation_checkpointing_policy"))
    if name in ("FSDP2", "ModelParallelStrategy"):
        dtype = args.get("param_dtype")
        if dtype is not None and dtype not in _DTYPE_BYTES:
            raise RecipeError(f"FSDP2 param_dtype={dtype!r}; use one of {sorted(_DTYPE_BYTES)}")
        return Strategy("fsdp2", reshard_after_forward=bool(args.get("reshard_after_forward", True)),
                        param_dtype_bytes=_DTYPE_BYTES.get(dtype) if dtype else None,
                        offload_optimizer=bool(args.get("cpu_offload")), activation_checkpointing=checkpointing)
    if name in ("FSDP", "FSDPStrategy"):
        sharding = str(args.get("sharding_strategy", "FULL_SHARD")).upper()
        if sharding == "NO_SHARD":
            return Strategy("ddp", activation_checkpointing=checkpointing)
        if sharding not in ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD"):
            raise RecipeError(f"unknown FSDP sharding_strategy {sharding!r}")
        return Strategy("fsdp", reshard_after_forward=sharding != "SHARD_GRAD_OP",
                        shard_group=devices_per_node if sharding == "HYBRID_SHARD" else None,
                        offload_optimizer=bool(args.get("cpu_offload")), activation_checkpointing=checkpointing)
    if name in ("DeepSpeed", "DeepSpeedStrategy"):
        stage = int(args.get("stage", 2))
        if stage not in (2, 3):
            raise RecipeError(f"DeepSpeed stage {stage} is not modelled; the planner knows stages 2 and 3")
        return Strategy(f"zero{stage}", offload_optimizer=bool(args.get("offload_optimizer")),
                        offload_parameters=bool(args.get("offload_parameters")) and stage == 3)
    if name == "DDPStrategy":
        return Strategy("ddp")
    raise RecipeError(f"unknown strategy class {spec['class_path']!r}; the planner knows vlsafe.scale.FSDP, "
                      f"vlsafe.scale.FSDP2, vlsafe.scale.DeepSpeed and Lightning's DDP/FSDP/DeepSpeed/ModelParallel")


def named_strategy(name: str, like):
    """`--strategy NAME` (and the comparison columns), keeping the recipe strategy's checkpointing."""
    from vlsafe.scale.plan import Strategy

    if name not in STRATEGY_CHOICES:
        raise RecipeError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_CHOICES)}")
    offload = name == "zero3-offload"
    return Strategy(name.removesuffix("-offload"), offload_optimizer=offload, offload_parameters=offload,
                    activation_checkpointing=like.activation_checkpointing and name in ("fsdp", "fsdp2"))


def _reference(model_spec: dict[str, Any]) -> tuple[str, int]:
    """(reference mode, policy rows per sample) of a method spec."""
    name, args = model_spec.get("class_path", ""), _args(model_spec)
    if not name.endswith("PreferenceModule"):
        return "none", 1
    rows = 3 if args.get("blind") == "sum" else 2
    loss = args.get("loss")
    if isinstance(loss, dict) and loss.get("class_path", "").rpartition(".")[2] in ("SimPOLoss", "ORPOLoss"):
        return "none", rows
    return args.get("reference", "copy"), rows


def setup_from_recipe(recipe: dict[str, Any], gpus: int | None = None, strategy: str | None = None,
                      micro_batch: int | None = None, seq_len: int | None = None, with_lora_option: bool = False):
    """The planner's `Setup` for a merged recipe (model counted on the meta device) and the builder's name.

    `with_lora_option` also counts the model with LLaVA's LoRA (r 128, all linear layers) so the fix search
    can offer it; it costs a second meta build, so the command asks for it only when the recipe does not fit."""
    from vlsafe.builders import VLMBuilder
    from vlsafe.scale.model_size import count_recipe_model
    from vlsafe.scale.plan import Setup, Workload

    model_spec = recipe.get("model")
    vlm_spec = _args(model_spec).get("vlm") if isinstance(model_spec, dict) else None
    if not isinstance(vlm_spec, dict) or "class_path" not in vlm_spec:
        raise RecipeError("the recipe has no model to plan: it needs model.init_args.vlm with a class_path "
                          "(a vlsafe builder such as vlsafe.builders.FromParts)")
    try:
        builder = VLMBuilder.from_config(vlm_spec)
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        raise RecipeError(f"model.init_args.vlm: {err}") from err
    args, trainer = _args(model_spec), recipe.get("trainer") or {}
    devices = _devices(trainer) if gpus is None else gpus
    per_node = trainer.get("devices")
    recipe_strategy = strategy_from_recipe(trainer.get("strategy"), per_node if isinstance(per_node, int) else devices)
    chosen = named_strategy(strategy, recipe_strategy) if strategy else recipe_strategy
    reference, rows = _reference(model_spec)
    train = {"train_vision": bool(args.get("train_vision", False)),
             "train_projector": bool(args.get("train_projector", True)), "train_llm": bool(args.get("train_llm", True))}
    model = count_recipe_model(builder, lora=args.get("lora"), **train)
    lora_model = None
    if with_lora_option and not args.get("lora") and train["train_llm"]:
        lora_model = count_recipe_model(builder, lora={"r": 128, "alpha": 256, "target_modules": "all-linear"}, **train)
    precision = trainer.get("precision", "32-true")
    precision = _PRECISION_ALIASES.get(precision, str(precision))
    batch = micro_batch or int(_args(recipe.get("data")).get("batch_size", 8))
    workload = Workload(gpus=devices, micro_batch=batch, seq_len=seq_len or int(getattr(builder, "max_length", 2048)),
                        precision=precision, gradient_checkpointing=bool(args.get("gradient_checkpointing", False)),
                        rows_per_sample=rows, reference=reference, train_vision=train["train_vision"])
    return Setup(model=model, strategy=chosen, workload=workload, lora_model=lora_model), type(builder).__name__


# ---------------------------------------------------------------------------------------------- output
def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


ROW_LABELS = {"parameters": "parameters", "gradients": "gradients", "optimizer": "optimizer states",
              "reference": "reference model", "gathered": "gathered / buckets", "activations": "activations (est.)",
              "context": "CUDA context (assumed)"}


def comparison(setup, gpu_gib: float) -> list[tuple[str, Any]]:
    """The recipe's plan first, then every other strategy on the same model and workload."""
    from vlsafe.scale.plan import plan_memory

    plans = [("recipe: " + setup.strategy.label, plan_memory(setup, gpu_gib))]
    # the recipe's checkpointing stays on whichever strategy does it (FSDP's own or the module's switch)
    checkpointing = setup.workload.gradient_checkpointing or setup.strategy.activation_checkpointing
    workload = replace(setup.workload, gradient_checkpointing=checkpointing)
    for name in STRATEGY_CHOICES:
        other = named_strategy(name, setup.strategy)
        if other.label != setup.strategy.label:
            plans.append((other.label, plan_memory(replace(setup, strategy=other, workload=workload), gpu_gib)))
    return plans


def render(recipe_name: str, builder: str, setup, gpu_gib: float) -> str:
    from vlsafe.scale.plan import GIB, cheapest_fix

    m, w = setup.model, setup.workload
    parts = ", ".join(f"{k} {_count(p.total)}" for k, p in m.parts.items())
    checkpointing = "on" if w.gradient_checkpointing or setup.strategy.activation_checkpointing else "off"
    lines = [f"recipe: {recipe_name}",
             (f"model: {builder}, {_count(m.total)} parameters ({m.total:,}: {parts}); trainable "
              f"{_count(m.trainable)}{' (LoRA)' if m.lora else ''}; architecture from {m.source}"),
             (f"run: {w.gpus} GPU(s) x {gpu_gib:g} GiB, precision {w.precision}, micro-batch {w.micro_batch} x "
              f"{w.rows_per_sample} row(s) x {w.seq_len} tokens ({m.image_tokens} image), gradient checkpointing "
              f"{checkpointing}, reference {w.reference}"), ""]
    plans = comparison(setup, gpu_gib)
    heads = ["per GPU, GiB"] + [name for name, _ in plans]
    table = [[ROW_LABELS[key]] + [f"{p.rows[key] / GIB:.2f}" for _, p in plans] for key in plans[0][1].rows]
    table.append(["total"] + [f"{p.total / GIB:.2f}" for _, p in plans])
    table.append(["fits"] + ["yes" if p.fits else "no" for _, p in plans])
    table.append(["host (offload)"] + [f"{p.host_bytes / GIB:.2f}" for _, p in plans])
    widths = [max(len(row[i]) for row in [heads, *table]) for i in range(len(heads))]
    for row in [heads, *table]:
        lines.append("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(row)).rstrip())
    own = plans[0][1]
    lines.append("")
    if own.fits:
        lines.append(f"verdict: fits with {own.headroom / GIB:.1f} GiB headroom per GPU ({own.strategy})")
    else:
        lines.append(f"verdict: does NOT fit ({own.strategy}): {own.total / GIB:.1f} GiB needed per GPU, "
                     f"{-own.headroom / GIB:.1f} GiB over")
        fix = cheapest_fix(setup, gpu_gib)
        if fix is None:
            lines.append("no combination of up to 4 changes fits: use more or larger GPUs")
        else:
            lines.append(f"cheapest change that fits: {fix.description} -> {fix.plan.total / GIB:.1f} GiB "
                         f"({fix.plan.headroom / GIB:.1f} GiB headroom)")
            lines += [f"  {c.name}: {c.recipe_edit}" for c in fix.changes]
    return "\n".join(lines)


def as_json(recipe_name: str, builder: str, setup, gpu_gib: float) -> dict[str, Any]:
    from vlsafe.scale.plan import cheapest_fix, plan_dict

    m, w = setup.model, setup.workload
    plans = comparison(setup, gpu_gib)
    fix = None if plans[0][1].fits else cheapest_fix(setup, gpu_gib)
    return {"recipe": recipe_name, "builder": builder,
            "model": {"total_parameters": m.total, "trainable_parameters": m.trainable, "lora": m.lora,
                      "parts": {k: {"total": p.total, "trainable": p.trainable} for k, p in m.parts.items()},
                      "image_tokens": m.image_tokens, "architecture_source": m.source},
            "workload": {"gpus": w.gpus, "gpu_gib": gpu_gib, "precision": w.precision, "micro_batch": w.micro_batch,
                         "rows_per_sample": w.rows_per_sample, "seq_len": w.seq_len, "reference": w.reference,
                         "gradient_checkpointing": w.gradient_checkpointing or setup.strategy.activation_checkpointing},
            "plan": plan_dict(plans[0][1]), "alternatives": [plan_dict(p) for _, p in plans[1:]],
            "cheapest_fix": None if fix is None else {"changes": [c.name for c in fix.changes],
                                                      "edits": [c.recipe_edit for c in fix.changes],
                                                      "plan": plan_dict(fix.plan)}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlsafe plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", help="recipe YAML file(s), merged in order (same as --config)")
    parser.add_argument("--config", action="append", default=[], help="recipe or overlay YAML (repeatable)")
    parser.add_argument("--gpus", type=int, default=None, help="GPU count (default: trainer.devices x num_nodes)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--strategy", choices=STRATEGY_CHOICES, default=None,
                        help="plan this strategy instead of the recipe's")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: data.init_args.batch_size")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the builder's max_length")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    from vlsafe.scale.model_size import ModelSizeError
    from vlsafe.scale.plan import PlanError, plan_memory

    args = build_parser().parse_args(argv)
    paths = [*args.recipes, *args.config]
    try:
        if not paths:
            raise RecipeError("no recipe given: vlsafe plan RECIPE.yaml [--config OVERLAY.yaml]")
        if args.gpu_memory <= 0:
            raise PlanError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory:g}")
        if args.gpus is not None and args.gpus < 1:
            raise PlanError(f"--gpus must be at least 1, got {args.gpus}")
        recipe, options = load_recipe(paths), {"gpus": args.gpus, "strategy": args.strategy,
                                               "micro_batch": args.micro_batch, "seq_len": args.seq_len}
        setup, builder = setup_from_recipe(recipe, **options)
        if not plan_memory(setup, args.gpu_memory).fits:
            setup, builder = setup_from_recipe(recipe, **options, with_lora_option=True)
        name = " + ".join(paths)
        if args.json:
            print(json.dumps(as_json(name, builder, setup, args.gpu_memory), indent=2))
        else:
            print(render(name, builder, setup, args.gpu_memory))
    except (RecipeError, PlanError, ModelSizeError) as err:
        print(f"vlsafe plan: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
