"""A GPU check that is ready to run: one unattended command, under 8 minutes on one 80 GB GPU.

    python tools/gpu_check.py --out gpu_check.json      # = vlsafe gpu-check; needs CUDA
    python tools/gpu_check.py --tiny --out tiny.json    # the same code paths at tiny size, seconds on a CPU

On a ~1.4B-parameter random LLaVA layout (CLIP-L/14-336-shaped ViT + a 1.2B Llama, SDPA attention, synthetic
batches with LLaVA-like text lengths; no network, no checkpoint) it runs, one after the other:

  sft/vlsafe_fsdp2  vlsafe SFTModule under Lightning + FSDP2 on one device (bf16 compute, fp32 master weights)
  dpo/vlsafe_fsdp2  vlsafe PreferenceModule (DPO, live reference copy) under the same strategy
  dpo/trl           TRL's DPOTrainer (bf16 autocast, fp32 weights) on the same weights and batches

and prints and writes (--out, JSON) per phase: samples/s, tokens/s, MFU against the device's dense bf16 peak
(and against a measured bf16 matmul), peak memory (torch.cuda.max_memory_allocated), each with its n (timed
steps, samples, tokens; warm-up steps excluded), plus the vlsafe/TRL ratios of the DPO step.

A phase that runs out of memory or fails is recorded in the JSON and the next one runs; the exit status is 1
if any phase did not finish. `--time-budget` (seconds, whole check) makes each phase stop early (after at
least warm-up + 2 timed steps) instead of overrunning.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_BUDGET = 420.0  # seconds: model building, export and every phase; < 8 minutes with start-up


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _rate(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def format_report(report: dict[str, Any]) -> str:
    """A table with every figure's n beside it, then the ratios."""
    device = report["device"]
    lines = [f"device: {device['name']} ({device['type']}); peak {_rate(device['peak_flops'])} "
             f"[{device['peak_flops_source']}]; measured bf16 matmul {_rate(device['matmul_peak_flops'])}"]
    head = (f"{'phase':<18} {'status':<7} {'steps':>5} {'samples':>7} {'tokens':>9} {'samples/s':>10} "
            f"{'tokens/s':>10} {'MFU':>6} {'peak GB':>8}")
    lines += [head, "-" * len(head)]
    for name, r in report["phases"].items():
        if r["status"] != "ok":
            lines.append(f"{name:<18} {r['status']:<7} {r.get('error', '')[:200]}")
            continue
        lines.append(f"{name:<18} {'ok':<7} {r['steps']:>5} {r['samples']:>7.0f} {r['tokens']:>9.0f} "
                     f"{r['samples_per_s']:>10.2f} {r['tokens_per_s']:>10.0f} {r['mfu']:>6.1%} "
                     f"{_gb(r['peak_memory_bytes']):>8}" + ("  (stopped by time budget)" if r["stopped_by_budget"]
                                                           else ""))
    ours, theirs = report["phases"].get("dpo/vlsafe_fsdp2", {}), report["phases"].get("dpo/trl", {})
    for key, value in report["ratios"].items():
        if value is None:
            lines.append(f"{key}: not computed (a DPO phase did not finish)")
        else:
            lines.append(f"{key}: {value:.2f}x  (vlsafe n={ours['steps']} steps/{ours['samples']:.0f} pairs, "
                         f"TRL n={theirs['steps']} steps/{theirs['samples']:.0f} pairs)")
    lines.append(f"total {report['total_seconds']:.0f} s of a {report['time_budget_seconds']:.0f} s budget")
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null (and the check is then not ok)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: seconds, runs on a CPU (the suite's test)")
    parser.add_argument("--out", default="gpu_check.json", help="where to write the JSON report")
    parser.add_argument("--time-budget", type=float, default=DEFAULT_BUDGET,
                        help=f"seconds for the whole check (default {DEFAULT_BUDGET:.0f}); phases stop early")
    parser.add_argument("--phases", nargs="+", default=None, help="a subset of the phases, in order")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="the device's peak FLOP/s for MFU, if its data-sheet figure is not known here")
    parser.add_argument("--batch-size", type=int, default=None, help="SFT samples per step (default 8)")
    parser.add_argument("--dpo-batch-size", type=int, default=None, help="DPO pairs per step (default 4)")
    parser.add_argument("--timed-steps", type=int, default=None, help="timed steps per phase (default 20)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary folder)")
    args = parser.parse_args(argv)

    from dataclasses import replace

    from vlsafe.bench.gpu_check import PHASES, GpuCheckConfig, compute_device, run_check

    phases = tuple(args.phases or PHASES)
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {unknown}; choose from {list(PHASES)}")
    try:
        device = compute_device(args.tiny)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = GpuCheckConfig.tiny() if args.tiny else GpuCheckConfig()
    overrides = {"batch_size": args.batch_size, "dpo_batch_size": args.dpo_batch_size,
                 "timed_steps": args.timed_steps}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    with tempfile.TemporaryDirectory(prefix="vlsafe-gpu-check-") as tmp:
        report = run_check(cfg, Path(args.workdir or tmp), device, args.time_budget, phases, args.peak_flops)
    report = _finite(report)
    print(format_report(report))
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    for name, result in report["phases"].items():
        if result["status"] != "ok":
            print(f"gpu_check: phase {name} did not finish: {result.get('error')}", file=sys.stderr)
            if "traceback" in result:
                print(result["traceback"], file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
