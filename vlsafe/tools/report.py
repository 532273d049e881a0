"""Render a run's logged metrics as PNG charts and a one-page Markdown + HTML summary.

    python tools/report.py runs/demo-bpo                         # newest log folder under runs/demo-bpo
    python tools/report.py runs/demo-sft/lightning_logs/version_0 --out /tmp/sft-report
    python tools/report.py runs/x/tensorboard/version_0 --source tensorboard

Reads CSVLogger's metrics.csv (or TensorBoard event files), hparams.yaml, config.yaml and the eval callbacks'
before/after JSONs; writes report.md, report.html (one self-contained file), summary.json and charts/*.png into
`--out` (default: <log folder>/report). Metric names: docs/metrics.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlsafe.monitoring.logs import SOURCES, RunLogError, load_run
from vlsafe.monitoring.report import write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run's log folder, a file in it (metrics.csv, an event file) or a parent "
                                    "folder such as runs/demo-sft (its newest log folder is used)")
    parser.add_argument("--out", help="output folder (default: <log folder>/report)")
    parser.add_argument("--source", choices=SOURCES, default="auto",
                        help="where to read metrics: metrics.csv, TensorBoard events, or auto (csv if present)")
    parser.add_argument("--title", help="page title (default: the log folder)")
    parser.add_argument("--max-charts", type=int, default=10, help="at most this many metric charts (default 10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run = load_run(args.run, args.source)
    except RunLogError as err:
        print(f"report.py: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else run.log_dir / "report"
    paths = write_report(run, out, title=args.title, max_charts=args.max_charts, progress=not args.no_progress)
    n_charts = sum(k.startswith("chart:") for k in paths)
    print(f"read {len(run.series)} metrics from {run.source}; wrote {paths['html']}, {paths['markdown']} "
          f"and {n_charts} charts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
