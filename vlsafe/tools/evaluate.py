"""Evaluate a checkpoint on the benchmarks an eval spec lists; write metrics, tables, predictions, charts.

    python tools/evaluate.py --checkpoint runs/sft/last.ckpt --spec recipes/eval/vlguard.yaml --out eval/sft
    python tools/evaluate.py --checkpoint /models/llava-1.5-7b-hf --model-type llava-hf \\
        --spec recipes/eval/safety.yaml --out eval/llava --batch-size 16 --device cuda --dtype fp16

The spec (YAML) names suites from vlsafe/eval/suites/ and, optionally, judges they share:

    judges:
      gpt4: {type: endpoint, base_url: https://api.openai.com/v1, api_key_env: OPENAI_API_KEY, model: gpt-4o}
    suites:
      - {name: vlguard, test_json: /data/VLGuard/test.json, images: /data/VLGuard/test,
         reference: /data/VLGuard/gpt4_safe_safes.json, helpfulness_judge: gpt4}
      - {name: mmsafetybench, root: /data/MM-SafetyBench, judge: gpt4}

A suite may appear twice with different `tag`s (its output folder and metric prefix). Output in --out:
metrics.json (every number plus run facts and judge settings), predictions.jsonl (every answer and its
verdict), <suite>/<table>.csv|.md, <suite>/*.png and report.md.

Resumable and cheap to re-run: each suite caches its answers in <out>/<suite>/answers.jsonl after every
batch, and endpoint verdicts in <out>/<suite>/judge_cache.jsonl; a killed run continues where it stopped,
and a finished one re-runs without loading the model or calling a judge. --fresh discards the answers.

Every rate is printed, and written, with its denominator: `vlguard/unsafes/asr: 12.5 (n=442)`. Prompts a judge
gave no usable verdict for (a failed request, an unparsable reply) are *unjudged*: in neither count of any
rate. When more than --max-judge-failures (a fraction, default 0: any) of a rate's prompts are unjudged, the
outputs are still written, marked, and the tool exits with status 1 and says which rates; a re-run asks the
judge again only for those prompts.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


SPEC_KEYS = {"suites", "judges"}


def build_parser() -> argparse.ArgumentParser:
    from vlsafe.eval.checkpoint import MODEL_TYPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="vlsafe checkpoint (.ckpt) or LLaVA folder (--model-type)")
    parser.add_argument("--spec", required=True, help="eval spec YAML (see recipes/eval/)")
    parser.add_argument("--out", required=True, help="output folder (answer caches live here too)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="ckpt",
                        help="ckpt = vlsafe checkpoint (default); llava-hf / llava-original = LLaVA folders")
    parser.add_argument("--model-class", default=None,
                        help="rebuild this vlsafe module class from the checkpoint (e.g. for extra heads); default: "
                             "the core inside an SFTModule")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="cast the model after loading: bf16, fp16 or fp32")
    parser.add_argument("--suites", nargs="+", default=None,
                        help="run only these suites (names or tags) of the spec; metrics.json then holds only them")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="set every suite's max_samples (a quick smoke run; answers stay cached for the full run)")
    parser.add_argument("--fresh", action="store_true", help="discard cached answers and generate again")
    parser.add_argument("--max-judge-failures", type=float, default=0.0,
                        help="fraction of a rate's prompts that may be left unjudged (failed judge request or "
                             "unparsable reply) before the run fails; default 0: any unjudged prompt fails it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def load_spec(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"spec {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"spec {path}: not valid YAML ({err})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("suites"), list) or not spec["suites"]:
        raise ValueError(f"spec {path}: expected a mapping with a non-empty `suites:` list")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"spec {path}: unknown top-level key(s) {unknown}; allowed: {sorted(SPEC_KEYS)}")
    judges = spec.get("judges") or {}
    if not isinstance(judges, dict):
        raise ValueError(f"spec {path}: `judges:` must map names to judge configs")
    for i, entry in enumerate(spec["suites"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"spec {path}: suites[{i}] must be a mapping with a `name`")
    return spec


def plan_suites(spec: dict[str, Any], only: list[str] | None) -> list[tuple[str, str, dict[str, Any]]]:
    """`(suite name, tag, options)` per spec entry, named judges substituted, tags unique."""
    from vlsafe.eval.suites import suite_modules

    modules = suite_modules()
    judges = spec.get("judges") or {}
    planned, tags = [], set()
    for i, entry in enumerate(spec["suites"]):
        options = dict(entry)
        name, tag = options.pop("name"), options.pop("tag", None) or entry["name"]
        if name not in modules:
            raise ValueError(f"suites[{i}]: unknown suite {name!r}; available: {sorted(modules)}")
        if tag in tags:
            raise ValueError(f"suites[{i}]: {tag!r} appears twice; give one of them a distinct `tag`")
        tags.add(tag)
        for key, value in options.items():
            if (key == "judge" or key.endswith("_judge")) and isinstance(value, str) and value in judges:
                options[key] = judges[value]
        if only is None or name in only or tag in only:
            planned.append((name, tag, options))
    if only:
        missing = sorted(set(only) - {n for n, _, _ in planned} - {t for _, t, _ in planned})
        if missing:
            raise ValueError(f"--suites {missing} not in the spec (it lists {sorted(tags)})")
    return planned


def retag(metrics: dict[str, float], name: str, tag: str) -> dict[str, float]:
    if tag == name:
        return dict(metrics)
    return {(tag + key[len(name):] if key.startswith(name + "/") else f"{tag}/{key}"): v for key, v in metrics.items()}


def judge_failures(metrics: dict[str, Any], tolerated: float) -> list[str]:
    """Rates with more unjudged prompts than tolerated, as `name: 9 of 9 prompts unjudged`."""
    from vlsafe.eval.suites import DENOMINATOR, UNJUDGED

    out = []
    for key, unjudged in metrics.items():
        if not key.endswith(UNJUDGED) or not unjudged:
            continue
        rate = key[:-len(UNJUDGED)]
        total = unjudged + (metrics.get(rate + DENOMINATOR) or 0)
        if unjudged / total > tolerated:
            out.append(f"{rate}: {unjudged} of {total} prompts unjudged")
    return out


def breaker_notes(info: Any) -> list[str]:
    """Why an endpoint judge stopped asking (its circuit breaker), wherever a suite's info records it."""
    if isinstance(info, dict):
        notes = [info["breaker"]] if isinstance(info.get("breaker"), str) else []
        return notes + [note for value in info.values() for note in breaker_notes(value)]
    if isinstance(info, list):
        return [note for value in info for note in breaker_notes(value)]
    return []


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from vlsafe.eval import report
    from vlsafe.eval.checkpoint import LazyModule, file_identity, load_module
    from vlsafe.eval.judges import JudgeError
    from vlsafe.eval.suites import suite_modules

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.max_judge_failures <= 1.0:
        raise ValueError(f"--max-judge-failures is a fraction in [0, 1], got {args.max_judge_failures}")
    spec = load_spec(args.spec)
    planned = plan_suites(spec, args.suites)
    if args.max_samples is not None:
        if args.max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {args.max_samples}")
        planned = [(name, tag, {**options, "max_samples": args.max_samples}) for name, tag, options in planned]
    checkpoint = Path(args.checkpoint)
    if not checkpoint.exists():
        raise ValueError(f"--checkpoint {checkpoint} does not exist")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    identity = {**file_identity(checkpoint), "model_type": args.model_type, "model_class": args.model_class,
                "dtype": args.dtype}
    model = LazyModule(lambda: load_module(checkpoint, model_type=args.model_type, model_class=args.model_class,
                                           device=device, dtype=args.dtype), identity=identity)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    all_metrics: dict[str, float] = {}
    suites: dict[str, Any] = {}
    predictions: list[dict[str, Any]] = []
    sections = []
    preprocessing: dict[str, str] = {}
    modules = suite_modules()
    for name, tag, options in planned:
        suite_dir = out / tag
        if args.fresh and (suite_dir / "answers.jsonl").exists():
            (suite_dir / "answers.jsonl").unlink()
        suite_dir.mkdir(parents=True, exist_ok=True)
        print(f"[{tag}] evaluating ({name})", flush=True)
        result = modules[name].evaluate(model, options, suite_dir, batch_size=args.batch_size,
                                        progress=not args.no_progress)
        metrics = retag(result.metrics, name, tag)
        all_metrics.update(metrics)
        if result.info.get("image_preprocess"):
            preprocessing[tag] = result.info["image_preprocess"]
            print(f"  images: {result.info['image_preprocess']} (image_preprocess)", flush=True)
        suites[tag] = {"suite": name, "metrics": metrics, "info": result.info}
        predictions += [{"suite": tag, **row} for row in result.predictions]
        tables, charts = [], []
        for table_name, rows in result.tables.items():
            if rows:
                tables.append(report.write_table(rows, suite_dir / table_name)[1])
        for chart in result.charts:
            rows = result.tables.get(chart.table) or []
            path = report.bar_chart(rows, suite_dir / f"{chart.table}.png", y=chart.y, x=chart.x, group=chart.group,
                                    title=chart.title or f"{tag}: {chart.table}", ylabel=chart.ylabel)
            if path:
                charts.append(path)
        path = report.bar_chart(report.chartable_metrics(metrics), suite_dir / "metrics.png", y="value", x="metric",
                                title=f"{tag}: metrics")
        if path:
            charts.append(path)
        sections.append((tag, tables, charts))
        for key in metrics:
            if not key.endswith(("_n", "_unjudged")):  # printed beside their rate
                print(f"  {key}: {report.format_metric(metrics, key)}", flush=True)

    failures = judge_failures(all_metrics, args.max_judge_failures)
    run_facts = {"checkpoint": identity["path"], "model_type": args.model_type, "spec": str(Path(args.spec).resolve()),
                 "batch_size": args.batch_size, "device": device, "model_loaded": model.loaded,
                 "seconds": round(time.time() - started, 2), "image_preprocess": preprocessing,
                 "max_judge_failures": args.max_judge_failures,
                 "judge_failures": failures or "none"}
    report.write_json({"metrics": all_metrics, "suites": suites, "run": {**run_facts, "identity": identity}},
                      out / "metrics.json")
    report.write_jsonl(predictions, out / "predictions.jsonl")
    (out / "report.md").write_text(report.markdown_overview(all_metrics, sections, run_facts, out), encoding="utf-8")
    print(f"wrote {out / 'metrics.json'}, {out / 'predictions.jsonl'} ({len(predictions)} rows) and "
          f"{out / 'report.md'}" + ("" if model.loaded else " (all answers were cached; the model was not loaded)"))
    if failures:
        notes = sorted(set(breaker_notes([entry["info"] for entry in suites.values()])))
        raise JudgeError("the judge left too many prompts without a usable verdict (more than --max-judge-failures "
                         f"{args.max_judge_failures:g}): " + "; ".join(failures)
                         + (". Endpoint: " + "; ".join(notes) if notes else "")
                         + f". Rates above are over the judged prompts only; see {out / 'report.md'}. Re-run to ask "
                         "the judge again for the unjudged prompts (answers and verdicts so far are cached).")
    return {"metrics": all_metrics, "suites": suites, "run": run_facts}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from vlsafe.data.schema import SampleError
    from vlsafe.eval.judges import JudgeError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (SampleError, ValueError, OSError, JudgeError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
