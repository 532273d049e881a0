"""Dashboards: metric naming helpers (`metrics`), throughput/MFU monitoring (`throughput`).

Metric names are documented in docs/metrics.md; `tools/report.py` turns a run's logs into charts.
"""
