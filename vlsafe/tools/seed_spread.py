"""Train demo recipes once per seed, evaluate every model with an eval spec, and report each rate over the seeds.

    vlsafe seed-spread --recipes recipes/demo/sft.yaml recipes/demo/bpo.yaml --spec recipes/eval/demo.yaml \\
        --seeds 0 1 2 --out runs/demo-seeds
    vlsafe seed-spread --runs eval/sft-s0 eval/sft-s1 eval/sft-s2 --out eval/sft-spread   # aggregate only

One run's number does not reproduce on another machine (thread scheduling, library versions and the data order
move a tiny model's result by several points), so the docs print the spread over seeds instead. For each seed S,
in its own folder `<out>/seed-S` (where a recipe's relative paths, `runs/` and `.cache/`, resolve, so recipes
that chain, like the demo BPO starting from `runs/demo-sft/checkpoints/last.ckpt`, chain within the seed):

1. `vlsafe fit RECIPE --seed_everything S --data.init_args.seed S` plus `--fit-args`, for each recipe in order,
   skipped when its checkpoint (`last.ckpt` in the recipe's ModelCheckpoint `dirpath`) already exists;
2. `vlsafe evaluate --checkpoint that last.ckpt --spec SPEC --out <out>/seed-S/eval/<recipe name>` plus
   `--eval-args`, also inside the seed's folder: a chained model is rebuilt from its start model's relative path.
   Answers are cached there, so a re-run costs seconds (and the spec's synthetic test sets are built there).

Then every rate of the evaluations (a metric with a denominator: `<rate>_n`, or `n` beside it) is written to
`<out>/spread.md` and `<out>/spread.json` and printed: mean ± sample standard deviation over the seeds, the
range, the number of runs and the denominator of each run (`60` when every run had 60 prompts). A run where a
rate has no judged prompt is left out of that rate's mean, and the runs column says so.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import shlex
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DENOMINATOR, UNJUDGED = "_n", "_unjudged"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", help="training recipes, run in this order for every seed")
    parser.add_argument("--spec", help="eval spec YAML every trained model is evaluated with (recipes/eval/demo.yaml)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--runs", nargs="+", help="instead of training: finished `vlsafe evaluate` output folders "
                                                  "(one per seed) to aggregate")
    parser.add_argument("--label", default="model", help="the model's name in the table with --runs")
    parser.add_argument("--out", required=True, help="output folder (seed folders, spread.md, spread.json)")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help="only rates matching these glob patterns (e.g. 'vlguard/*/asr'); default: every rate")
    parser.add_argument("--fit-args", default="", help="extra arguments for every fit, one quoted string "
                                                       "(e.g. \"--trainer.max_steps 100\")")
    parser.add_argument("--eval-args", default="", help="extra arguments for every evaluate, one quoted string "
                                                        "(e.g. \"--max-samples 20 --batch-size 16\")")
    return parser


def last_checkpoint(recipe: Path) -> Path:
    """`<dirpath>/last.ckpt` of the recipe's ModelCheckpoint (relative to the folder the recipe runs in)."""
    import yaml

    config = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            init = callback.get("init_args") or {}
            if init.get("dirpath") and init.get("save_last"):
                return Path(init["dirpath"]) / "last.ckpt"
    raise ValueError(f"{recipe}: no ModelCheckpoint callback with `dirpath` and `save_last: true`; seed-spread "
                     "needs one to find the trained model")


@contextlib.contextmanager
def working_directory(folder: Path) -> Iterator[None]:
    """`contextlib.chdir` (Python 3.11+) for 3.10: a recipe's relative paths resolve in `folder`."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def train_and_evaluate(recipes: list[Path], spec: Path, seed: int, out: Path, fit_args: list[str],
                       eval_args: list[str]) -> dict[str, Path]:
    """Fit each recipe with `seed` inside `out/seed-<seed>` and evaluate its last checkpoint; the eval folders."""
    from vlsafe.cli import main as fit
    from vlsafe.tools.evaluate import main as evaluate

    folder = (out / f"seed-{seed}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    evaluations = {}
    for recipe in recipes:
        checkpoint = folder / last_checkpoint(recipe)
        if checkpoint.exists():
            print(f"[seed {seed}] {recipe.stem}: {checkpoint} exists, not trained again", flush=True)
        else:
            print(f"[seed {seed}] training {recipe}", flush=True)
            with working_directory(folder):
                fit(["fit", "--config", str(recipe), "--seed_everything", str(seed), "--data.init_args.seed",
                     str(seed), *fit_args])
            if not checkpoint.exists():
                raise ValueError(f"training {recipe} with seed {seed} wrote no {checkpoint}")
        evaluations[recipe.stem] = folder / "eval" / recipe.stem
        print(f"[seed {seed}] evaluating {checkpoint}", flush=True)
        with working_directory(folder):  # a chained model's hparams name its start model relatively (runs/demo-sft)
            evaluate(["--checkpoint", str(checkpoint), "--spec", str(spec), "--out", str(evaluations[recipe.stem]),
                      "--no-progress", *eval_args])
    return evaluations


def denominator(metrics: dict[str, Any], key: str) -> Any:
    """The count a rate is over: `<key>_n`, else the `n` beside it (`synthetic/answers/n`), else None."""
    if key + DENOMINATOR in metrics:
        return metrics[key + DENOMINATOR]
    sibling = key.rsplit("/", 1)[0] + "/n"
    return metrics.get(sibling) if "/" in key and sibling != key else None


def rates(metrics: dict[str, Any]) -> list[str]:
    """The metrics that are rates: a number (or None: nothing judged) with a denominator; counts excluded."""
    return [key for key, value in metrics.items()
            if not key.endswith((DENOMINATOR, UNJUDGED, "/n", "_no_reference"))
            and denominator(metrics, key) is not None
            and (value is None or isinstance(value, (int, float)))]


def spread_rows(label: str, runs: list[dict[str, Any]], patterns: list[str] | None) -> list[dict[str, Any]]:
    """One row per rate over the runs (each a metrics.json `metrics` mapping): mean, sd, range, runs, n per run."""
    keys = list(dict.fromkeys(key for metrics in runs for key in rates(metrics)))
    if patterns:
        keys = [key for key in keys if any(fnmatch.fnmatchcase(key, p) for p in patterns)]
    rows = []
    for key in keys:
        values = [m[key] for m in runs if m.get(key) is not None]
        counts = [denominator(m, key) for m in runs if key in m]
        unjudged = sum(int(m.get(key + UNJUDGED) or 0) for m in runs)
        rows.append({"model": label, "metric": key, "runs": len(values), "of_runs": len(runs),
                     "mean": statistics.fmean(values) if values else None,
                     "sd": statistics.stdev(values) if len(values) > 1 else None,
                     "min": min(values) if values else None, "max": max(values) if values else None,
                     "values": values, "n": counts, "unjudged": unjudged})
    return rows


def number(value: float | None) -> str:
    """Three significant digits: `0.705`, `16.7`, `100` (rates are fractions or percentages, as their suite writes)."""
    return "—" if value is None else f"{value:.3g}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The spread table: `mean ± sd` over seeds, the range, runs (of how many) and each run's denominator."""
    lines = ["| model | metric | mean ± sd over seeds | range | runs | n per run |", "|---|---|---|---|---|---|"]
    for row in rows:
        counts = sorted(set(row["n"]))
        n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        if row["unjudged"]:
            n += f" ({row['unjudged']} unjudged in all)"
        runs = f"{row['runs']}" if row["runs"] == row["of_runs"] else f"{row['runs']} of {row['of_runs']}"
        mean = number(row["mean"]) + ("" if row["sd"] is None else f" ± {number(row['sd'])}")
        lines.append(f"| {row['model']} | {row['metric']} | {mean} | {number(row['min'])}–{number(row['max'])} | "
                     f"{runs} | {n} |")
    return "\n".join(lines) + "\n"


def read_metrics(folder: Path) -> dict[str, Any]:
    path = folder / "metrics.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no metrics.json (not a finished `vlsafe evaluate --out` folder)")
    return json.loads(path.read_text(encoding="utf-8"))["metrics"]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = Path(args.out)
    if args.runs:
        if args.recipes or args.spec:
            raise ValueError("give either --runs (aggregate) or --recipes and --spec (train and evaluate), not both")
        groups = {args.label: [Path(folder) for folder in args.runs]}
    else:
        if not args.recipes or not args.spec:
            raise ValueError("give --recipes and --spec (or --runs to aggregate finished evaluations)")
        recipes = [Path(r).resolve() for r in args.recipes]
        spec = Path(args.spec).resolve()
        for path in (*recipes, spec):
            if not path.is_file():
                raise ValueError(f"{path} does not exist")
        fit_args, eval_args = shlex.split(args.fit_args), shlex.split(args.eval_args)
        groups = {recipe.stem: [] for recipe in recipes}
        for seed in args.seeds:
            for name, folder in train_and_evaluate(recipes, spec, seed, out, fit_args, eval_args).items():
                groups[name].append(folder)
    rows = [row for label, folders in groups.items()
            for row in spread_rows(label, [read_metrics(f) for f in folders], args.metrics)]
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (out / "spread.md").write_text(table, encoding="utf-8")
    (out / "spread.json").write_text(json.dumps({"seeds": None if args.runs else args.seeds,
                                                 "runs": {k: [str(f) for f in v] for k, v in groups.items()},
                                                 "rows": rows}, indent=1), encoding="utf-8")
    print(table + f"wrote {out / 'spread.md'} and {out / 'spread.json'}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
