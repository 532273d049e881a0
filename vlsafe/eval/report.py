"""Write what `tools/evaluate.py` reports: metrics JSON, tables as CSV + Markdown, predictions JSONL,
PNG bar charts (matplotlib, headless Agg backend) and a Markdown overview linking them all.

Every rate is shown with its denominator: `<rate>_n` (and `<rate>_unjudged`, the prompts a judge gave no
usable verdict for) when the suite wrote one, else the nearest `<prefix>/n` count above it."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

COUNT_SUFFIXES = ("/n", "_n", "/judge_failures", "/unparsed", "/failures", "_unjudged", "_no_reference")


def is_count(name: str) -> bool:
    return name.endswith(COUNT_SUFFIXES)


def denominator(metrics: dict[str, Any], name: str) -> tuple[Any, Any]:
    """(n, unjudged) of the rate `name`: its own `name_n` / `name_unjudged`, else the nearest `<prefix>/n`."""
    if name + "_n" in metrics:
        return metrics[name + "_n"], metrics.get(name + "_unjudged")
    parts = name.split("/")[:-1]
    while parts:
        key = "/".join(parts) + "/n"
        if key in metrics:
            return metrics[key], None
        parts.pop()
    return None, None


def format_metric(metrics: dict[str, Any], name: str) -> str:
    """`12.5 (n=442)`, `n/a (n=0, unjudged 9)`: a rate never appears without what it is a share of."""
    value = metrics[name]
    text = "n/a" if value is None else _cell(value)
    if is_count(name):
        return text
    n, unjudged = denominator(metrics, name)
    if n is None:
        return text
    return f"{text} (n={n}" + (f", unjudged {unjudged})" if unjudged is not None else ")")


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_table(rows: Sequence[dict[str, Any]], stem: str | Path) -> tuple[Path, Path]:
    """`<stem>.csv` (full precision) and `<stem>.md` (a Markdown table); returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    columns = _columns(rows)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    with csv_path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _label(row: dict[str, Any], x: str | Sequence[str]) -> str:
    keys = [x] if isinstance(x, str) else list(x)
    return " / ".join(str(row.get(k)) for k in keys)


def bar_chart(rows: Sequence[dict[str, Any]], path: str | Path, *, y: str, x: str | Sequence[str],
              group: str | None = None, title: str = "", ylabel: str = "") -> Path | None:
    """A (grouped) bar chart of `rows[y]` labelled by `x`; None (nothing written) if no row has a number."""
    rows = [r for r in rows if isinstance(r.get(y), (int, float)) and not math.isnan(r[y])]
    if not rows:
        return None
    plt = _pyplot()
    labels = list(dict.fromkeys(_label(r, x) for r in rows))
    groups = list(dict.fromkeys(r.get(group) for r in rows)) if group else [None]
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(labels) * len(groups) + 1.5), 4.0), dpi=100)
    for k, name in enumerate(groups):
        values = {_label(r, x): r[y] for r in rows if not group or r.get(group) == name}
        positions = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(positions, [values.get(label, 0.0) for label in labels], width,
                      label=None if name is None else str(name))
        if len(groups) * len(labels) <= 40:
            ax.bar_label(bars, fmt="%.3g", fontsize=6)
    tilt = len(labels) > 3 or max(len(label) for label in labels) > 12
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35 if tilt else 0, ha="right" if tilt else "center", fontsize=8)
    ax.set_ylabel(ylabel or y)
    if "%" in ylabel:  # rates on a fixed 0-100 axis, so charts of different runs compare at a glance
        ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    if group:
        ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def chartable_metrics(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """Metrics worth a bar (rates and scores), not counts."""
    return [{"metric": name, "value": value} for name, value in metrics.items()
            if isinstance(value, (int, float)) and not is_count(name)]


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as stream:
        for row in rows:
            stream.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_json(payload: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def markdown_overview(metrics: dict[str, float], sections: list[tuple[str, list[Path], list[Path]]],
                      run: dict[str, Any], out_dir: Path) -> str:
    """The report: run facts, every metric, then each suite's tables (inlined) and charts (linked)."""
    lines = ["# Evaluation report", ""]
    lines += [f"- {key}: `{value}`" for key, value in run.items()]
    lines += ["", "## Metrics", "", "Rates are over `n`, the prompts with a usable verdict; `unjudged` prompts (failed "
              "judge requests, unparsable replies) are in neither count.", "",
              "| metric | value | n | unjudged |", "|---|---|---|---|"]
    for name, value in metrics.items():
        if name.endswith(("_n", "_unjudged")):
            continue  # shown beside their rate
        n, unjudged = (None, None) if is_count(name) else denominator(metrics, name)
        lines.append(f"| {name} | {'n/a' if value is None else _cell(value)} | {_cell(n)} | {_cell(unjudged)} |")
    for suite, tables, charts in sections:
        lines += ["", f"## {suite}", ""]
        for table in tables:
            lines += [f"### {table.stem}", "", table.read_text(encoding="utf-8").rstrip(), ""]
        lines += [f"![{chart.stem}]({chart.relative_to(out_dir)})" for chart in charts]
    return "\n".join(lines) + "\n"
