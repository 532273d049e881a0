"""A model card that says how a model was made, generated from its checkpoint, its run's logs and (optionally)
an evaluation folder: `README.md` for people (and the Hugging Face Hub), `model_card.json` for scripts.

Everything in the card is read from what the run recorded: the checkpoint (hyperparameters, steps, the
method class `CheckpointGuard` stores), the log folder Lightning and LightningCLI write (config.yaml with the
data sources and their weights, hparams.yaml, metrics.csv, the eval callbacks' before/after JSONs; read with
`vlsafe.monitoring.logs`), shard indexes for sample counts, and `vlsafe evaluate`'s metrics.json. Whatever
was not recorded is written as "not recorded", never guessed.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import typing
from pathlib import Path
from typing import Any

from vlsafe.monitoring.logs import (
    RunLogError,
    read_evaluations,
    read_metrics_csv,
    read_yaml,
)

NOT_RECORDED = "not recorded"
CARD_VERSION = 1

#: The settings docs/fidelity.md documents as switches (`name: value` in its "switch" column, "no switch:" cells
#: aside; a test keeps this list equal to the document). The card lists those a run set to a non-default value.
DOCUMENTED_SWITCHES = (
    "special_tokens_in_text", "rgb_mode", "pad_color", "group_by_modality_length", "max_length",
    "helpfulness_prompt", "judge_templates", "height_bug", "generation", "image_preprocess", "preset", "blind",
    "response_format", "length_rule", "reference", "mask_decoder.vision_features", "dice_reduction", "giou_boxes",
    "vision", "projector", "packing",
)
_RATE_SUFFIXES = ("_n", "_unjudged")


# ---------------------------------------------------------------------------------------------- run folder
def find_run_files(run_dir: Path | None) -> dict[str, Path]:
    """The log folder of a run: the newest folder under `run_dir` (itself included) holding a LightningCLI
    config.yaml, else an hparams.yaml or metrics.csv; returns the files found there by name."""
    if run_dir is None:
        return {}
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    for name in ("config.yaml", "hparams.yaml", "metrics.csv"):
        found = sorted(run_dir.rglob(name), key=lambda p: p.stat().st_mtime)
        if found:
            folder = found[-1].parent
            return {f.name: f for f in folder.iterdir() if f.name in ("config.yaml", "hparams.yaml", "metrics.csv")}
    return {}


def guess_run_dir(checkpoint: Path) -> Path | None:
    """`runs/x` for `runs/x/checkpoints/<checkpoint>` (Lightning's layout), else None."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == "checkpoints" else None


# ---------------------------------------------------------------------------------------------- defaults
def _vlsafe_class(class_path: Any) -> type | None:
    """The class named by a recorded class_path, imported only when it is vlsafe's own."""
    if not isinstance(class_path, str) or not class_path.startswith("vlsafe."):
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _dataclass_in(annotation: Any) -> type | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if dataclasses.is_dataclass(candidate) and isinstance(candidate, type):
            return candidate
    return None


def _default(cls: type | None, path: list[str]) -> Any:
    """The constructor default of `cls` for the setting at `path` (a nested dataclass field for `a.b`), or
    `inspect.Parameter.empty` when it cannot be known."""
    empty = inspect.Parameter.empty
    if cls is None or not path:
        return empty
    try:
        parameter = inspect.signature(cls.__init__).parameters.get(path[0])
    except (TypeError, ValueError):
        return empty
    if parameter is None:
        return empty
    if len(path) == 1:
        return parameter.default
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:
        return empty
    settings = _dataclass_in(hints.get(path[0]))
    if settings is None or len(path) != 2:
        return empty
    for item in dataclasses.fields(settings):
        if item.name == path[1]:
            if item.default is not dataclasses.MISSING:
                return item.default
            if item.default_factory is not dataclasses.MISSING:
                return item.default_factory()
    return empty


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) == list(default)
    return value == default


def fidelity_switches(settings: dict[str, Any], owner: type | None, where: str) -> list[dict[str, Any]]:
    """Every documented switch set in `settings` (nested class_path/init_args blocks included): its value, its
    constructor default (from the class that takes it) and whether the run changed it."""
    found: list[dict[str, Any]] = []

    def walk(node: dict[str, Any], cls: type | None, prefix: list[str]) -> None:
        if "class_path" in node and isinstance(node.get("init_args"), dict):
            walk(node["init_args"], _vlsafe_class(node["class_path"]), prefix + ["init_args"])
            return
        for key, value in node.items():
            for switch in DOCUMENTED_SWITCHES:
                head, *rest = switch.split(".")
                if key != head:
                    continue
                leaf = value
                for part in rest:
                    leaf = leaf.get(part, inspect.Parameter.empty) if isinstance(leaf, dict) else \
                        inspect.Parameter.empty
                if leaf is inspect.Parameter.empty or isinstance(leaf, dict):
                    continue
                default = _default(cls, [head, *rest])
                known = default is not inspect.Parameter.empty
                found.append({"switch": switch, "where": f"{where}:{'.'.join(prefix + [key, *rest])}",
                              "value": leaf, "default": default if known else "unknown",
                              "non_default": (not _same(leaf, default)) if known else True})
            if isinstance(value, dict):  # a plain settings mapping: its defaults are not the owner's
                walk(value, None, prefix + [key])

    walk(settings, owner, [])
    return found


# ---------------------------------------------------------------------------------------------- sections
def _base_model(vlm: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """What the model started from, from the builder config stored in the checkpoint."""
    class_path = vlm.get("class_path", NOT_RECORDED)
    args = vlm.get("init_args") or {}
    name = class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) else NOT_RECORDED
    base: dict[str, Any] = {"builder": class_path}
    if name == "FromParts":
        base.update(llm=args.get("llm", NOT_RECORDED), vision=args.get("hf_vision") or args.get("vision", NOT_RECORDED),
                    vision_pretrained=args.get("vision_pretrained"), projector=args.get("projector", NOT_RECORDED),
                    projector_weights=args.get("projector_weights"))
    elif name in ("LlavaHF", "LlavaOriginal"):
        base.update(path=args.get("path", NOT_RECORDED))
    elif name == "TinyVLM":
        base.update(description="vlsafe TinyVLM (randomly initialised demo/test model)",
                    sizes={k: args[k] for k in ("image_size", "patch_size", "hidden_size", "num_layers", "vocab_size")
                           if k in args})
    elif name == "FromCheckpoint":
        base.update(path=args.get("path", NOT_RECORDED), merge_lora=args.get("merge_lora", True))
        parent = _parent_checkpoint_base(args.get("path"), depth)
        if parent is not None:
            base["started_from"] = parent
    for key in ("template", "max_length", "torch_dtype", "select_layer"):
        if key in args:
            base[key] = args[key]
    return base


def _parent_checkpoint_base(path: Any, depth: int) -> dict[str, Any] | None:
    """The base model of the checkpoint a FromCheckpoint run continued, when that file is still here."""
    if not isinstance(path, str) or depth >= 4 or not Path(path).exists():
        return None
    from vlsafe.scale.convert import ConversionError, read_meta
    try:
        meta = read_meta(path)
    except (ConversionError, OSError):
        return None
    hparams = meta.get("hyper_parameters") or {}
    if "vlm" not in hparams:
        return None
    return {"method": meta.get("vlsafe_method", NOT_RECORDED), "steps": meta.get("global_step", NOT_RECORDED),
            **_base_model(hparams["vlm"], depth + 1)}


def _method(meta: dict[str, Any], config: dict[str, Any]) -> tuple[str, type | None]:
    class_path = meta.get("vlsafe_method") or (config.get("model") or {}).get("class_path") or NOT_RECORDED
    return class_path, _vlsafe_class(class_path)


def _hyperparameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """The method's settings (everything stored except the builder, which the base-model section shows)."""
    return {key: value for key, value in hparams.items() if key != "vlm"}


def _source_rows(spec: Any, stage: str) -> list[dict[str, Any]]:
    """One row per data source of a ShardDataModule stage (a path or a list of `Source` mappings)."""
    from vlsafe.data.plan import PlannedSource
    from vlsafe.data.shards import load_index

    if spec is None:
        return []
    items = spec if isinstance(spec, list) else [spec]
    rows = []
    for item in items:
        source = {"path": item} if isinstance(item, str) else dict(item)
        path = source.get("path", NOT_RECORDED)
        weight, num_samples = source.get("weight", 1.0), source.get("num_samples")
        row = {"stage": stage, "name": source.get("name") or path, "path": path, "weight": weight,
               "num_samples": num_samples, "samples_available": NOT_RECORDED, "samples_per_epoch": NOT_RECORDED}
        if num_samples is not None:
            row["samples_per_epoch"] = num_samples
        try:
            index = load_index(path)
        except (FileNotFoundError, ValueError, OSError, KeyError):
            row["note"] = "shard index not readable here; counts not recorded"
        else:
            planned = PlannedSource(row["name"], tuple(index.shards), weight, num_samples)
            row["samples_available"], row["samples_per_epoch"] = planned.size, planned.allotment
        rows.append(row)
    return rows


def data_section(config: dict[str, Any]) -> dict[str, Any]:
    """Data module, sources with weights and sample counts, batch size: from the run's config.yaml."""
    data = config.get("data")
    if not isinstance(data, dict):
        return {"recorded": False}
    args = data.get("init_args") or {}
    section: dict[str, Any] = {"recorded": True, "data_module": data.get("class_path", NOT_RECORDED),
                               "batch_size": args.get("batch_size", NOT_RECORDED), "seed": args.get("seed",
                                                                                                    NOT_RECORDED)}
    if "kinds" in args:  # the synthetic world: sample kinds with mixing weights, generated per split
        kinds = args["kinds"]
        weights = kinds if isinstance(kinds, dict) else {kind: 1.0 for kind in kinds}
        section["synthetic"] = {"kinds": weights, "train_samples": args.get("train_samples", NOT_RECORDED),
                                "val_samples": args.get("val_samples", NOT_RECORDED),
                                "world_seed": args.get("world_seed", NOT_RECORDED)}
    section["sources"] = [row for stage, key in (("train", "train"), ("val", "val"))
                          for row in _source_rows(args.get(key), stage)]
    return section


def training_section(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    section = {"global_step": meta.get("global_step", NOT_RECORDED),
               "epochs_completed": meta.get("epoch", NOT_RECORDED)}
    for key in ("max_steps", "max_epochs", "accumulate_grad_batches", "precision", "devices", "num_nodes"):
        section[key] = trainer.get(key, NOT_RECORDED) if trainer else NOT_RECORDED
    strategy = trainer.get("strategy") if trainer else None
    section["strategy"] = (strategy.get("class_path") if isinstance(strategy, dict) else strategy) or NOT_RECORDED
    section["seed_everything"] = config.get("seed_everything", NOT_RECORDED) if config else NOT_RECORDED
    return section


def _final_metrics(metrics_csv: Path | None) -> dict[str, Any]:
    if metrics_csv is None:
        return {}
    try:
        series = read_metrics_csv(metrics_csv)
    except RunLogError:
        return {}
    return {name: {"value": s.last, "step": s.steps[-1]} for name, s in sorted(series.items())
            if name.startswith(("train/loss", "val/", "heldout/")) and not math.isnan(s.last)}


def _judges(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            if (key == "judge" or key.endswith("_judge")) and isinstance(value, dict):
                out[path] = value
            else:
                _judges(value, path, out)


def evaluation_section(eval_dir: Path, checkpoint: Path) -> dict[str, Any]:
    """Metrics of a `vlsafe evaluate` folder, each rate with its denominator and unjudged count, plus the
    judge settings and run facts it recorded."""
    path = eval_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"--eval-dir {eval_dir}: no metrics.json (write one with `vlsafe evaluate`)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    metrics = record.get("metrics")
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: no 'metrics' mapping (not written by `vlsafe evaluate`)")
    rows = []
    for key, value in metrics.items():
        if key.endswith(_RATE_SUFFIXES):
            continue
        rate = key + "_n" in metrics  # a rate has a denominator; counts and other numbers have none (None)
        rows.append({"metric": key, "value": value, "n": metrics[key + "_n"] if rate else None,
                     "unjudged": metrics.get(key + "_unjudged", NOT_RECORDED) if rate else None})
    judges: dict[str, Any] = {}
    for tag, suite in (record.get("suites") or {}).items():
        _judges((suite or {}).get("info") or {}, tag, judges)
    run = record.get("run") or {}
    evaluated = (run.get("identity") or {}).get("path") or run.get("checkpoint") or NOT_RECORDED
    same = evaluated != NOT_RECORDED and Path(evaluated).resolve() == checkpoint.resolve()
    return {"folder": str(eval_dir), "evaluated_checkpoint": evaluated, "is_exported_checkpoint": same,
            "metrics": rows, "judges": judges or NOT_RECORDED,
            "max_judge_failures": run.get("max_judge_failures", NOT_RECORDED),
            "judge_failures": run.get("judge_failures", NOT_RECORDED),
            "image_preprocess": run.get("image_preprocess") or NOT_RECORDED,
            "suites": {tag: (suite or {}).get("suite", NOT_RECORDED) for tag, suite in
                       (record.get("suites") or {}).items()}}


# ---------------------------------------------------------------------------------------------- the card
def build_card(checkpoint: str | Path, meta: dict[str, Any], *, run_dir: str | Path | None = None,
               eval_dir: str | Path | None = None, prompting: dict[str, Any] | None = None,
               export: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card as plain data. `meta` is the checkpoint's record (`vlsafe.scale.convert.read_meta`)."""
    checkpoint = Path(checkpoint)
    run_path = Path(run_dir) if run_dir is not None else guess_run_dir(checkpoint)
    files = find_run_files(run_path) if run_path is not None and run_path.is_dir() else {}
    if run_dir is not None and not files:
        raise FileNotFoundError(f"--run-dir {run_dir}: no config.yaml, hparams.yaml or metrics.csv under it")
    config = read_yaml(files["config.yaml"]) if "config.yaml" in files else {}
    hparams = meta.get("hyper_parameters") or {}
    method, method_cls = _method(meta, config)
    switches = fidelity_switches(hparams, method_cls, "checkpoint")
    if isinstance(config.get("data"), dict):
        switches += fidelity_switches({"data": config["data"]}, None, "config.yaml")
    log_dir = files[next(iter(files))].parent if files else None
    card = {
        "card_version": CARD_VERSION,
        "checkpoint": str(checkpoint),
        "run_log_folder": str(log_dir) if log_dir else NOT_RECORDED,
        "base_model": _base_model(hparams.get("vlm") or {}) if hparams.get("vlm") else NOT_RECORDED,
        "method": method,
        "hyperparameters": _hyperparameters(hparams) or NOT_RECORDED,
        "training": training_section(meta, config),
        "data": data_section(config) if config else {"recorded": False},
        "fidelity_switches": {"non_default": [s for s in switches if s["non_default"]],
                              "at_default": sorted({s["switch"] for s in switches if not s["non_default"]})},
        "training_metrics": _final_metrics(files.get("metrics.csv")) or NOT_RECORDED,
        "training_evaluations": (read_evaluations(log_dir) or NOT_RECORDED) if log_dir else NOT_RECORDED,
        "prompting": prompting or NOT_RECORDED,
        "export": export or {},
        "evaluation": evaluation_section(Path(eval_dir), checkpoint) if eval_dir is not None else NOT_RECORDED,
    }
    return card


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _flatten(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        return [pair for key, value in node.items() for pair in _flatten(value, f"{prefix}.{key}" if prefix else key)]
    return [(prefix, node)]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def render_markdown(card: dict[str, Any]) -> str:
    """README.md: Hub front matter, then one section per part of the card."""
    base = card["base_model"]
    method = card["method"]
    tags = ["vlsafe", "llava", "vision-language", method.rsplit(".", 1)[-1] if method != NOT_RECORDED else "vlsafe"]
    lines = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
             "tags:", *[f"- {tag}" for tag in dict.fromkeys(tags)], "---", "",
             "# Model card (generated by `vlsafe export`)", "",
             f"Exported from `{card['checkpoint']}`. Everything below was read from the checkpoint, its run's logs "
             f"(`{card['run_log_folder']}`) and the evaluation folder given; \"{NOT_RECORDED}\" marks what the run "
             "did not record. Machine-readable copy: `model_card.json`.", ""]
    lines += ["## Base model", ""]
    lines += _table(["field", "value"], [[k, v] for k, v in _flatten(base)]) if isinstance(base, dict) else [base]
    lines += ["", "## Method and hyperparameters", "", f"Method: `{method}`", ""]
    hyper = card["hyperparameters"]
    lines += _table(["setting", "value"], [[k, v] for k, v in _flatten(hyper)]) if isinstance(hyper, dict) \
        else [hyper]
    lines += ["", "## Training", ""]
    lines += _table(["field", "value"], [[k, v] for k, v in card["training"].items()])
    lines += ["", "## Data", ""]
    data = card["data"]
    if not data.get("recorded"):
        lines.append(f"Data sources: {NOT_RECORDED} (no LightningCLI config.yaml found for this run; pass "
                     "`--run-dir`).")
    else:
        lines.append(f"Data module `{data['data_module']}`, batch size {data['batch_size']}, seed {data['seed']}.")
        if "synthetic" in data:
            synthetic = data["synthetic"]
            lines += ["", f"Synthetic world: {synthetic['train_samples']} training samples, kinds mixed with weights "
                          f"{_cell(synthetic['kinds'])} (world seed {synthetic['world_seed']})."]
        if data["sources"]:
            lines += [""] + _table(["stage", "source", "path", "weight", "num_samples", "samples available",
                                    "samples per epoch"],
                                   [[r["stage"], r["name"], r["path"], r["weight"], r["num_samples"] or "—",
                                     r["samples_available"], r["samples_per_epoch"]] for r in data["sources"]])
    lines += ["", "## Fidelity switches", "",
              "Documented switches (docs/fidelity.md) this run set to a value other than the default:", ""]
    switches = card["fidelity_switches"]
    if switches["non_default"]:
        lines += _table(["switch", "value", "default", "set at"],
                        [[s["switch"], s["value"], s["default"], s["where"]] for s in switches["non_default"]])
    else:
        lines.append("none.")
    if switches["at_default"]:
        lines += ["", "At their defaults: " + ", ".join(f"`{name}`" for name in switches["at_default"]) + "."]
    lines += ["", "## Prompting", ""]
    prompting = card["prompting"]
    if isinstance(prompting, dict):
        how = {"pad": "padded to a square with the mean colour, then resized",
               "resize": "resized to a square without padding or cropping"}.get(prompting["image_preprocess"], "")
        lines += [f"Conversation template `{prompting['template']}` (the tokenizer's and processor's "
                  f"`chat_template`); BOS added: {prompting['add_bos_token']}; images: "
                  f"{prompting['image_preprocess']} ({how}).", "",
                  "generation_config.json: " + _cell(prompting["generation_config"])
                  + ("" if prompting["generation_recorded"] else
                     f" (generation settings {NOT_RECORDED} in the checkpoint: token ids only)"), ""]
        lines += [f"- {note}" for note in prompting["notes"]]
    else:
        lines.append(str(prompting))
    lines += ["", "## Evaluation", ""]
    evaluation = card["evaluation"]
    if not isinstance(evaluation, dict):
        lines.append(f"{NOT_RECORDED} (export with `--eval-dir <folder written by vlsafe evaluate>`).")
    else:
        if not evaluation["is_exported_checkpoint"]:
            lines += [f"**Note:** these numbers are for `{evaluation['evaluated_checkpoint']}`, not the exported "
                      "checkpoint.", ""]
        lines += [f"From `{evaluation['folder']}` (suites: {_cell(evaluation['suites'])}). Rates are over the judged "
                  "prompts: `n` is the denominator, `unjudged` the prompts the judge gave no usable verdict for "
                  f"(\"{NOT_RECORDED}\" where the judge cannot fail, e.g. string matching); \"—\": not a rate.", ""]
        lines += _table(["metric", "value", "n", "unjudged"],
                        [[r["metric"], r["value"], "—" if r["n"] is None else r["n"],
                          "—" if r["unjudged"] is None else r["unjudged"]] for r in evaluation["metrics"]])
        facts = (f"max_judge_failures: {evaluation['max_judge_failures']}; judge failures: "
                 f"{_cell(evaluation['judge_failures'])}; image preprocessing: "
                 f"{_cell(evaluation['image_preprocess'])}.")
        lines += ["", "Judges: " + _cell(evaluation["judges"]), "", facts]
    checks = card["training_evaluations"]
    if isinstance(checks, dict):
        lines += ["", "## Held-out checks during training (eval callbacks)", ""]
        lines += _table(["check", "when", "values"],
                        [[name, when, record] for name, records in checks.items() for when, record in records.items()])
    metrics = card["training_metrics"]
    if isinstance(metrics, dict):
        lines += ["", "## Last logged training metrics", ""]
        lines += _table(["metric", "value", "step"], [[k, v["value"], v["step"]] for k, v in metrics.items()])
    return "\n".join(lines) + "\n"


def write_model_card(out_dir: str | Path, card: dict[str, Any]) -> tuple[Path, Path]:
    """Write README.md and model_card.json into the export folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    readme, machine = out / "README.md", out / "model_card.json"
    readme.write_text(render_markdown(card), encoding="utf-8")
    machine.write_text(json.dumps(card, indent=2, default=str) + "\n", encoding="utf-8")
    return readme, machine
