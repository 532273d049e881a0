"""Render a run's logs (`vlsafe.monitoring.logs.RunLog`) as PNG charts and a one-page Markdown + HTML summary.

The page shows what a person checks first: the key charts that the run's metrics allow (loss, reward margins
and accuracies, held-out safety before/after, token accuracy, learning rate, throughput/MFU), a table of the
last and best value of every metric, and the recipe's hyperparameters. `summary.json` holds the same table for
scripts. Charts use matplotlib's Agg canvas directly (no display, no global pyplot state).
"""
from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from vlsafe.monitoring.logs import RunLog, Series


@dataclass(frozen=True)
class ChartSpec:
    """A chart drawn when at least one of its metrics was logged at two or more steps."""

    slug: str
    title: str
    metrics: tuple[str, ...]
    prefix: str | None = None      # or: every metric starting with this (learning rates)
    ylabel: str = ""


KEY_CHARTS = (
    ChartSpec("loss", "Loss", ("train/loss", "val/loss")),
    ChartSpec("reward_margins", "Reward margin (chosen − rejected)",
              ("train/rewards/margins", "val/rewards/margins", "train/rewards/blind_margins",
               "val/rewards/blind_margins")),
    ChartSpec("reward_accuracy", "Reward accuracy (chosen ranked above rejected)",
              ("train/rewards/accuracies", "val/rewards/accuracies", "train/rewards/blind_accuracies",
               "val/rewards/blind_accuracies")),
    ChartSpec("rewards", "Implicit rewards", ("train/rewards/chosen", "train/rewards/rejected", "train/rewards/blind")),
    ChartSpec("logps", "Policy log-probabilities", ("train/logps/chosen", "train/logps/rejected", "train/logps/blind")),
    ChartSpec("heldout_safety", "Held-out safety", ("heldout/safety_rate", "heldout/over_refusal")),
    ChartSpec("token_accuracy", "Token accuracy", ("train/token_acc", "val/token_acc")),
    ChartSpec("heldout_accuracy", "Held-out answer accuracy", ("heldout/accuracy", "heldout/exact_match")),
    ChartSpec("learning_rate", "Learning rate", (), prefix="lr-"),
    ChartSpec("tokens_per_sec", "Throughput", ("train/device/items_per_sec",), ylabel="tokens/s per device"),
    ChartSpec("samples_per_sec", "Throughput", ("train/device/samples_per_sec",), ylabel="samples/s per device"),
    ChartSpec("mfu", "Model FLOPs utilisation", ("train/device/mfu",), ylabel="MFU"),
)

_LOWER_IS_BETTER = ("loss", "perplexity", "over_refusal", "nll", "error", "fail", "unsafe", "asr")
_HIGHER_IS_BETTER = ("acc", "accuracy", "accuracies", "margins", "safety_rate", "exact_match", "iou", "mfu",
                     "per_sec", "f1", "auroc", "auc", "precision", "recall")


def direction(name: str) -> str | None:
    """"min"/"max" when a smaller/larger value of metric `name` is better, None when neither is (rewards, counts)."""
    leaf = name.rsplit("/", 1)[-1]
    if any(word in leaf for word in _LOWER_IS_BETTER):
        return "min"
    if any(word in leaf for word in _HIGHER_IS_BETTER):
        return "max"
    return None


def fmt(value: float) -> str:
    """Numbers as shown in the tables: 5 significant digits."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.5g}"


# ---------------------------------------------------------------------------------------------------- summary
def summarise(run: RunLog) -> list[dict[str, Any]]:
    """One row per metric: last value and step, best value and step (when a direction is known), point count."""
    rows = []
    for name in ordered_metric_names(run.series):
        s = run.series[name]
        way = direction(name)
        best, best_step = s.best(way) if way else (None, None)
        rows.append({"metric": name, "last": s.last, "last_step": s.steps[-1], "best": best, "best_step": best_step,
                     "direction": way, "points": len(s.values)})
    return rows


def ordered_metric_names(series: dict[str, Series]) -> list[str]:
    """Key-chart metrics first (in chart order), then the rest alphabetically."""
    first = [m for spec in KEY_CHARTS for m in _chart_metrics(spec, series)]
    return first + sorted(set(series) - set(first))


def _chart_metrics(spec: ChartSpec, series: dict[str, Series]) -> list[str]:
    if spec.prefix:
        return sorted(name for name in series if name.startswith(spec.prefix))
    return [name for name in spec.metrics if name in series]


def chosen_charts(series: dict[str, Series], max_charts: int = 10) -> list[tuple[ChartSpec, list[str]]]:
    """Key charts whose metrics exist (with >= 2 points), then one chart per other `train/`+`val/` metric pair."""
    charts = []
    for spec in KEY_CHARTS:
        names = [n for n in _chart_metrics(spec, series) if len(series[n].values) >= 2]
        if names:
            charts.append((spec, names))
    charted = {n for _, names in charts for n in names}
    for name in sorted(series):  # methods' own metrics (protector, perception, ...): train/x with its val/x
        if not name.startswith("train/") or name in charted or name.startswith("train/device/"):
            continue
        leaf = name[len("train/"):]
        if leaf in ("time", "batches", "samples", "lengths") or leaf.endswith("tokens"):  # counts, not curves
            continue
        names = [n for n in (name, f"val/{leaf}") if n in series and len(series[n].values) >= 2]
        if names:
            charts.append((ChartSpec(leaf.replace("/", "_"), leaf, tuple(names)), names))
    return charts[:max_charts]


# ---------------------------------------------------------------------------------------------------- charts
def _smoothed(values: list[float]) -> list[float]:
    """Trailing moving average over ~1/15 of the points, for noisy per-step training curves."""
    window = max(2, len(values) // 15)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100)


def line_chart(spec: ChartSpec, series: list[Series], path: Path) -> None:
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = figure.add_subplot()
    for s in series:
        steps, values = zip(*sorted(zip(s.steps, s.values)))
        if len(values) > 30 and not s.name.startswith(("val/", "heldout/")):
            line, = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smoothed(list(values)), color=line.get_color(), label=f"{s.name} (smoothed)")
        else:
            ax.plot(steps, values, marker="o", markersize=3, label=s.name)
    ax.set_title(spec.title)
    ax.set_xlabel("step")
    if spec.ylabel:
        ax.set_ylabel(spec.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(figure, path)


def evaluation_chart(name: str, records: dict[str, dict[str, Any]], path: Path) -> bool:
    """Grouped bars of the rates (float values in [0, 1]; integer counts are left to the table) of one
    before/after evaluation; False if there are none."""
    def is_rate(value: Any) -> bool:
        return isinstance(value, float) and 0.0 <= value <= 1.0

    fields = sorted({k for r in records.values() for k, v in r.items() if is_rate(v)})
    fields = [f for f in fields if all(is_rate(r[f]) for r in records.values() if f in r)]
    if not fields:
        return False
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = figure.add_subplot()
    width = 0.8 / len(records)
    for i, (when, record) in enumerate(records.items()):
        xs = [j + i * width for j in range(len(fields))]
        bars = ax.bar(xs, [float(record.get(f, math.nan)) for f in fields], width, label=when)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks([j + width * (len(records) - 1) / 2 for j in range(len(fields))], fields)
    ax.set_ylim(0, 1.1)
    ax.set_title(f"Held-out evaluation: {name}")
    ax.legend(fontsize=8)
    _save(figure, path)
    return True


# ---------------------------------------------------------------------------------------------------- page
def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (`optim.lr`); lists and scalars are leaves."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


RECIPE_KEYS = ("seed_everything", "trainer.strategy", "trainer.devices", "trainer.num_nodes", "trainer.precision",
               "trainer.max_steps", "trainer.max_epochs", "trainer.accumulate_grad_batches",
               "trainer.gradient_clip_val", "model.class_path", "data.class_path", "data.init_args.batch_size",
               "data.init_args.train")


def _leaf_text(value: Any, limit: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _sections(run: RunLog, rows: list[dict[str, Any]], charts: list[tuple[str, Path]],
              eval_charts: list[tuple[str, Path]]) -> list[tuple[str, Any]]:
    """The page as (kind, payload) blocks, rendered to Markdown and HTML by the same order."""
    blocks: list[tuple[str, Any]] = []
    last_step = max(s.steps[-1] for s in run.series.values())
    facts = [("log folder", str(run.log_dir)), ("metrics read from", str(run.source)), ("last step", str(last_step))]
    if "train/time" in run.series:
        facts.append(("training time (s)", fmt(run.series["train/time"].last)))
    blocks.append(("table", (["", ""], facts)))
    if run.evaluations:
        blocks.append(("h2", "Held-out evaluation"))
        for name, records in run.evaluations.items():
            fields = sorted({k for r in records.values() for k in r})
            table = [[f] + [fmt(float(r[f])) if f in r else "" for r in records.values()] for f in fields]
            blocks.append(("h3", name))
            blocks.append(("table", (["", *records], table)))
        for title, path in eval_charts:
            blocks.append(("image", (title, path)))
    if charts:
        blocks.append(("h2", "Charts"))
        for title, path in charts:
            blocks.append(("image", (title, path)))
    blocks.append(("h2", "Metrics"))
    table = [[r["metric"], fmt(r["last"]), str(r["last_step"]),
              "" if r["best"] is None else fmt(r["best"]), "" if r["best_step"] is None else str(r["best_step"]),
              str(r["points"])] for r in rows]
    blocks.append(("table", (["metric", "last", "at step", "best", "at step", "points"], table)))
    recipe = flatten(run.config)
    picked = [(k, _leaf_text(recipe[k])) for k in RECIPE_KEYS if k in recipe]
    if picked:
        blocks.append(("h2", "Recipe (config.yaml)"))
        blocks.append(("table", (["setting", "value"], picked)))
    if run.hparams:
        blocks.append(("h2", "Hyperparameters (hparams.yaml)"))
        blocks.append(("table", (["hyperparameter", "value"],
                                 [(k, _leaf_text(v)) for k, v in flatten(run.hparams).items()])))
    return blocks


def _markdown(title: str, blocks: list[tuple[str, Any]], out_dir: Path) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title}", ""]
    for kind, payload in blocks:
        if kind == "h2":
            lines += [f"## {payload}", ""]
        elif kind == "h3":
            lines += [f"### {payload}", ""]
        elif kind == "image":
            caption, path = payload
            lines += [f"![{caption}]({path.relative_to(out_dir).as_posix()})", ""]
        else:
            header, body = payload
            lines.append("| " + " | ".join(cell(h) for h in header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in body]
            lines.append("")
    return "\n".join(lines)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:left;font-size:13px}td:nth-child(n+2){font-variant-numeric:tabular-nums}"
        "img{max-width:48%;margin:4px;border:1px solid #eee}h2{border-bottom:1px solid #ddd}")


def _html(title: str, blocks: list[tuple[str, Any]]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>"]
    for kind, payload in blocks:
        if kind in ("h2", "h3"):
            parts.append(f"<{kind}>{e(payload)}</{kind}>")
        elif kind == "image":  # embedded, so the page is one file to share
            caption, path = payload
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(f"<img alt='{e(caption)}' title='{e(caption)}' src='data:image/png;base64,{data}'>")
        else:
            header, body = payload
            head = "".join(f"<th>{e(str(h))}</th>" for h in header)
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in body)
            parts.append(f"<table><tr>{head}</tr>{rows}</table>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(run: RunLog, out_dir: str | Path, *, title: str | None = None, max_charts: int = 10,
                 progress: bool = True) -> dict[str, Path]:
    """Write charts/*.png, report.md, report.html and summary.json into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    chart_dir = out_dir / "charts"
    chart_dir.mkdir(parents=True, exist_ok=True)
    title = title or f"Run report: {run.log_dir}"
    work: list[tuple[str, Any]] = [("line", c) for c in chosen_charts(run.series, max_charts)]
    work += [("eval", item) for item in run.evaluations.items()]
    charts, eval_charts = [], []
    for kind, item in tqdm(work, desc="charts", unit="chart", disable=not progress):
        if kind == "line":
            spec, names = item
            path = chart_dir / f"{spec.slug}.png"
            line_chart(spec, [run.series[n] for n in names], path)
            charts.append((spec.title if not spec.ylabel else f"{spec.title} ({spec.ylabel})", path))
        else:
            name, records = item
            path = chart_dir / f"eval_{name}.png"
            if evaluation_chart(name, records, path):
                eval_charts.append((f"Held-out evaluation: {name}", path))
    rows = summarise(run)
    blocks = _sections(run, rows, charts, eval_charts)
    paths = {"markdown": out_dir / "report.md", "html": out_dir / "report.html", "summary": out_dir / "summary.json"}
    paths["markdown"].write_text(_markdown(title, blocks, out_dir))
    paths["html"].write_text(_html(title, blocks))
    summary = {"log_dir": str(run.log_dir), "source": str(run.source),
               "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "metrics": rows, "evaluations": run.evaluations, "charts": [str(p) for _, p in charts + eval_charts]}
    paths["summary"].write_text(json.dumps(summary, indent=1, default=str))
    return {**paths, **{f"chart:{p.stem}": p for _, p in charts + eval_charts}}
