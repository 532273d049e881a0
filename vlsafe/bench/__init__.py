"""Side-by-side benchmarks of vlsafe against the tools users would pick instead (run by `tools/bench.py`).

Every contender runs in its own fresh process (so peak memory is its own) on the same model weights and
the same batches; only the thing being compared differs. Timings are medians of steps after warm-up.
"""
