"""Evaluation suites run by `tools/evaluate.py`, one module per benchmark.

A module in this package is a suite when it defines (found automatically, so a new benchmark never edits
the tool):

- ``SUITE_NAME``: the name used in eval specs (``suites: [{name: vlguard, ...}]``);
- ``evaluate(model, options, out_dir, *, batch_size, progress) -> SuiteResult``: run the benchmark on a
  loaded vlsafe LightningModule (already in eval mode, on its device). ``options`` is the suite's mapping
  from the eval spec (paths, subsets, judge settings, ``max_samples``...); unknown keys must raise
  ``ValueError`` naming the key. ``out_dir`` is the suite's own folder: write resumable caches and any
  suite-specific PNGs there.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any


@dataclass
class SuiteResult:
    """What a suite hands back to the tool, which writes metrics JSON, tables and charts from it.

    - ``metrics``: flat ``{name: number}`` with stable names prefixed by the suite, e.g.
      ``"vlguard/unsafes/asr"``; these go to ``metrics.json`` and the summary charts.
    - ``tables``: ``{table_name: [row dict, ...]}``, e.g. ASR per category; written as CSV and Markdown.
    - ``predictions``: one JSON-safe dict per evaluated sample (id, prompt, answer, verdict...), written as
      ``predictions.jsonl`` so every number can be traced back to the answers behind it.
    """

    metrics: dict[str, float]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)


def suite_modules() -> dict[str, ModuleType]:
    """Every suite module in this package, by ``SUITE_NAME``."""
    modules = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    return {m.SUITE_NAME: m for m in modules if hasattr(m, "SUITE_NAME")}
