"""Read a run's logs back: metric series (CSVLogger's metrics.csv or TensorBoard event files), the recipe's
hyperparameters (hparams.yaml, config.yaml) and the before/after evaluation JSONs the eval callbacks write.

`load_run(path)` accepts a log folder (`runs/demo-sft/lightning_logs/version_0`), a file in it, or a parent such
as `runs/demo-sft`, where the newest log folder is taken. Everything is read as plain data: YAML through a safe
loader that turns Python-specific tags into lists/strings instead of running code.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EVENTS_GLOB = "events.out.tfevents.*"
SOURCES = ("auto", "csv", "tensorboard")


class RunLogError(ValueError):
    """A run's logs are missing or malformed; the message names the file (and line)."""


@dataclass
class Series:
    """One logged metric: values in logging order, with the trainer step each was logged at."""

    name: str
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def append(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)

    @property
    def last(self) -> float:
        return self.values[-1]

    def best(self, direction: str) -> tuple[float, int]:
        """(best value, its step) for `direction` "min" or "max"; NaNs are ignored (NaN if all are NaN)."""
        finite = [(v, s) for v, s in zip(self.values, self.steps) if not math.isnan(v)]
        if not finite:
            return math.nan, self.steps[-1]
        pick = min if direction == "min" else max
        return pick(finite, key=lambda pair: pair[0])


@dataclass
class RunLog:
    """Everything `tools/report.py` shows about one run."""

    log_dir: Path
    source: Path                                  # the metrics.csv or the folder of event files read
    series: dict[str, Series]
    hparams: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    evaluations: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader that reads Python-specific tags (e.g. `!!python/tuple` from Lightning's hparams.yaml) as plain
    lists, dicts or strings instead of failing; nothing is ever imported or called."""


def _construct_plain(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)


_PlainLoader.add_multi_constructor("", _construct_plain)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=_PlainLoader)
    except yaml.YAMLError as err:
        raise RunLogError(f"{path}: not valid YAML: {err}") from None
    return data if isinstance(data, dict) else {}


def read_metrics_csv(path: Path) -> dict[str, Series]:
    """Series from a Lightning CSVLogger file: a `step` column plus one sparse column per metric."""
    series: dict[str, Series] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise RunLogError(f"{path}: not a Lightning metrics.csv (no 'step' column in the header)")
        for line, row in enumerate(reader, start=2):
            try:
                step = int(float(row["step"]))
            except (TypeError, ValueError):
                raise RunLogError(f"{path}, line {line}: column 'step' is {row['step']!r}, not a number") from None
            for name, text in row.items():
                if name in ("step", "epoch") or name is None or text in ("", None):
                    continue
                try:
                    value = float(text)
                except ValueError:
                    raise RunLogError(f"{path}, line {line}: column {name!r} is {text!r}, not a number") from None
                series.setdefault(name, Series(name)).append(step, value)
    return series


def read_tensorboard(folder: Path) -> dict[str, Series]:
    """Scalar series from the TensorBoard event files in `folder` (all of them, as TensorBoard merges them)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import (
            SCALARS,
            EventAccumulator,
        )
    except ImportError:
        raise RunLogError(f"{folder}: reading TensorBoard event files needs the `tensorboard` package "
                          "(pip install tensorboard), or point the report at the run's metrics.csv") from None
    accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    accumulator.Reload()
    series: dict[str, Series] = {}
    for tag in accumulator.Tags().get("scalars", []):
        if tag == "epoch":
            continue
        target = series[tag] = Series(tag)
        for event in accumulator.Scalars(tag):
            target.append(int(event.step), float(event.value))
    return series


def read_evaluations(log_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Before/after records written by the eval callbacks (`answer_accuracy.json`, `safety_rate.json`, ...):
    `{file stem: {"before training": {...}, "after training": {...}}}`, numeric fields only."""
    evaluations = {}
    for path in sorted(log_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # not ours: only well-formed before/after records are shown
        if not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
            continue
        records = {when: {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                   for when, record in data.items()}
        if any(records.values()):
            evaluations[path.stem] = records
    return evaluations


def _newest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def find_sources(path: Path) -> tuple[Path | None, Path | None]:
    """(metrics.csv, folder of event files) for `path`, either of which may be missing."""
    if not path.exists():
        raise RunLogError(f"{path}: no such file or folder")
    if path.is_file():
        if path.name.endswith(".csv"):
            return path, None
        if path.name.startswith("events.out.tfevents."):
            return None, path.parent
        raise RunLogError(f"{path}: expected a metrics.csv, a TensorBoard event file or a run folder")
    csv_path = path / "metrics.csv" if (path / "metrics.csv").is_file() else _newest(list(path.rglob("metrics.csv")))
    events = list(path.glob(EVENTS_GLOB)) or list(path.rglob(EVENTS_GLOB))
    newest_event = _newest(events)
    return csv_path, newest_event.parent if newest_event else None


def load_run(path: str | Path, source: str = "auto") -> RunLog:
    """Read one run. `source`: `auto` (metrics.csv when there is one, else TensorBoard), `csv` or `tensorboard`."""
    if source not in SOURCES:
        raise RunLogError(f"unknown source {source!r}; choose one of {SOURCES}")
    path = Path(path)
    csv_path, events_dir = find_sources(path)
    use_csv = source == "csv" or (source == "auto" and csv_path is not None)
    if use_csv and csv_path is None:
        raise RunLogError(f"{path}: no metrics.csv found (is a CSVLogger configured?)")
    if not use_csv and events_dir is None:
        raise RunLogError(f"{path}: no metrics.csv and no TensorBoard event files found")
    read_from = csv_path if use_csv else events_dir
    series = read_metrics_csv(csv_path) if use_csv else read_tensorboard(events_dir)
    if not series:
        raise RunLogError(f"{read_from}: holds no logged metrics yet")
    log_dir = read_from.parent if use_csv else read_from
    hparams = read_yaml(log_dir / "hparams.yaml") if (log_dir / "hparams.yaml").is_file() else {}
    config = read_yaml(log_dir / "config.yaml") if (log_dir / "config.yaml").is_file() else {}
    return RunLog(log_dir=log_dir, source=read_from, series=series, hparams=hparams, config=config,
                  evaluations=read_evaluations(log_dir))
