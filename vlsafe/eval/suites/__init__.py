"""Evaluation suites run by `tools/evaluate.py`, one module per benchmark.

A module in this package is a suite when it defines (found automatically, so a new benchmark never edits
the tool):

- ``SUITE_NAME``: the name used in eval specs (``suites: [{name: vlguard, ...}]``);
- ``evaluate(model, options, out_dir, *, batch_size, progress) -> SuiteResult``: run the benchmark on a
  loaded vlsafe LightningModule (already in eval mode, on its device). ``options`` is the suite's mapping
  from the eval spec (paths, subsets, judge settings, ``max_samples``...); unknown keys must raise
  ``ValueError`` naming the key (``check_options`` does it). ``out_dir`` is the suite's own folder: write
  resumable caches and any suite-specific PNGs there.

The tool hands suites a stand-in that loads the model on first attribute access, so a suite whose
answers are all cached never loads it; ``vlsafe.eval.generation.generate_answers`` (batched, resumable,
progress bar) is the generation entry point suites share (``suite_answers`` wraps it with the usual
options). Judge options (``judge``, ``*_judge``) arrive as mappings/strings for
``vlsafe.eval.judges.build_judge``; named judges from the spec's ``judges:`` section are already
substituted by the tool.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

#: options every generating suite understands (see `suite_answers`)
GENERATION_OPTIONS = {"max_samples", "max_new_tokens", "template", "on_error", "image_preprocess", "max_length"}
#: a rate `name` comes with `name + DENOMINATOR` (what it is a share of) and, when a judge decides it,
#: `name + UNJUDGED` (prompts without a usable verdict: failed requests, unparsable replies; in neither count)
DENOMINATOR, UNJUDGED = "_n", "_unjudged"


@dataclass
class ChartSpec:
    """A bar chart of one table: bars labelled by `x` (one column or several joined), height `y`,
    one colour per value of `group` when given."""

    table: str
    y: str
    x: str | Sequence[str]
    group: str | None = None
    title: str = ""
    ylabel: str = ""


@dataclass
class SuiteResult:
    """What a suite hands back to the tool, which writes metrics JSON, tables and charts from it.

    - ``metrics``: flat ``{name: number}`` with stable names prefixed by the suite, e.g.
      ``"vlguard/unsafes/asr"``; these go to ``metrics.json`` and the summary charts.
    - ``tables``: ``{table_name: [row dict, ...]}``, e.g. ASR per category; written as CSV and Markdown.
    - ``predictions``: one JSON-safe dict per evaluated sample (id, prompt, answer, verdict...), written as
      ``predictions.jsonl`` so every number can be traced back to the answers behind it.
    - ``info``: JSON-safe facts about the run (judge, data paths, counts of skipped rows), kept in
      ``metrics.json`` next to the numbers.
    - ``charts``: tables to draw as PNG bar charts; without any, the tool draws the metrics.
    """

    metrics: dict[str, float]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    charts: list[ChartSpec] = field(default_factory=list)


def suite_modules() -> dict[str, ModuleType]:
    """Every suite module in this package, by ``SUITE_NAME``."""
    modules = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    return {m.SUITE_NAME: m for m in modules if hasattr(m, "SUITE_NAME")}


def check_options(options: dict[str, Any], allowed: set[str], suite: str, required: Sequence[str] = ()) -> None:
    """Unknown or missing suite options are errors that name the key."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"suite {suite!r}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    missing = [key for key in required if options.get(key) in (None, "")]
    if missing:
        raise ValueError(f"suite {suite!r}: missing required option(s) {missing}")


def existing_path(options: dict[str, Any], key: str, suite: str) -> Path:
    path = Path(str(options[key])).expanduser()
    if not path.exists():
        raise ValueError(f"suite {suite!r}: {key} {path} does not exist")
    return path


SYNTHETIC_SETTINGS = {"n", "seed", "image_size", "root"}


def synthetic_test_set(options: dict[str, Any], suite: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """With `synthetic: true` or `synthetic: {n, seed, image_size, root}` in the suite's options: the options with
    the paths of a held-out synthetic test set in the benchmark's own layout, built on first use (and rebuilt
    when its generator changes; `vlsafe.data.synthetic.benchmarks`), and that set's stamp for the suite's
    `info`. Without it: the options unchanged and None. Lets a demo model be evaluated with commands only."""
    settings = options.get("synthetic")
    if not settings:
        return options, None
    if settings is True:
        settings = {}
    if not isinstance(settings, dict) or set(settings) - SYNTHETIC_SETTINGS:
        raise ValueError(f"suite {suite!r}: `synthetic` is true or a mapping with keys from "
                         f"{sorted(SYNTHETIC_SETTINGS)}, got {settings!r}")
    from vlsafe.data.synthetic.benchmarks import build_benchmark

    built = build_benchmark(suite, **settings)
    stamp = built.pop("stamp")
    clash = sorted(key for key in built if key in options and key != "scenarios")
    if clash:
        raise ValueError(f"suite {suite!r}: `synthetic` provides {clash}; remove them from the spec")
    return {**{k: v for k, v in options.items() if k != "synthetic"}, **built,
            **{k: options[k] for k in ("scenarios",) if k in options}}, stamp


def image_preprocess(options: dict[str, Any], default: str, suite: str) -> str:
    """The suite's `image_preprocess` option (`pad` | `crop` | `resize`), else the suite's default (what the
    benchmark's released script does)."""
    from vlsafe.eval.image_preprocess import check_image_preprocess

    return check_image_preprocess(options.get("image_preprocess", default), suite)


def suite_answers(model, samples, options: dict[str, Any], out_dir: str | Path, *, batch_size: int, progress: bool,
                  desc: str, template: str | None = None, max_new_tokens: int = 256,
                  min_new_tokens: int | None = None, image_preprocess: str = "pad", preset: str = "greedy",
                  seed: int = 0, max_length: int | None = None):
    """`generate_answers` with the suite's cache (`out_dir/answers.jsonl`) and generation options
    (`max_new_tokens`, `template`, `on_error`, `image_preprocess`, `max_length`: the longest prompt accepted),
    falling back to the suite's defaults."""
    from vlsafe.eval.generation import GenerationConfig, generate_answers

    config = GenerationConfig(max_new_tokens=int(options.get("max_new_tokens", max_new_tokens)),
                              min_new_tokens=min_new_tokens, template=options.get("template", template),
                              image_preprocess=options.get("image_preprocess", image_preprocess), preset=preset,
                              seed=seed, max_length=options.get("max_length", max_length))
    return generate_answers(model, samples, config, cache_path=Path(out_dir) / "answers.jsonl",
                            model_id=getattr(model, "eval_identity", None), batch_size=batch_size,
                            progress=progress, on_error=options.get("on_error", "raise"), desc=desc)


def percent(numerator: float, denominator: int) -> float:
    """A percentage rounded to 2 decimals (the released VLGuard script's convention); 0.0 when empty."""
    return round(numerator / denominator * 100, 2) if denominator else 0.0


def add_rate(metrics: dict[str, Any], name: str, hits: int, judged: int, unjudged: int | None = None) -> None:
    """`metrics[name]` = hits / judged in percent (None when nothing was judged: an empty rate is no rate),
    `name_n` = judged and, for a judged rate, `name_unjudged`: prompts left out of both counts because the
    judge gave no usable verdict. A failed judgement is never counted as safe or unsafe."""
    metrics[name] = percent(hits, judged) if judged else None
    metrics[name + DENOMINATOR] = judged
    if unjudged is not None:
        metrics[name + UNJUDGED] = unjudged
