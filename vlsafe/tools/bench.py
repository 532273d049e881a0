"""Side-by-side benchmarks: vlsafe vs what users would pick instead, on the same model, weights and batches.

    python tools/bench.py --quick                       # every scenario, small sizes (< 5 min on 2 CPU cores)
    python tools/bench.py                               # default sizes (ViT 224/16 + Llama 512x8, batch 8)
    python tools/bench.py --scenarios sft dpo --out bench.json

Scenarios (each contender runs in a fresh process, so its peak RSS is its own):
  sft       SFTModule under Lightning vs a plain PyTorch loop over transformers' LlavaForConditionalGeneration
  dpo       PreferenceModule (DPO, BPO, and its switches) vs TRL's DPOTrainer with a live reference copy
  data      LLaVA-style JSON + one original JPEG per sample (640x480) vs ShardDataModule over shards written by
            `make_shards --presize` (headline), over shards of the same JPEGs, and both with a cold page cache
  generate  batched vs one-by-one greedy generation
  peak      dense matmul FLOP/s of this machine, for model FLOP utilisation of the SFT step
  serve     `vlsafe serve` under concurrent clients: requests/s and p50/p95 latency with and without the guard
  packing   SFT on LLaVA-665k-like lengths: samples packed into rows vs one padded row each (one process,
            steps interleaved; the padded side is the packed contender's companion)

Prints a table of ratios (vlsafe / baseline; > 1 means vlsafe is faster or uses less memory) with the absolute
figures beside them, and writes everything as JSON (--out). Timings are medians after warm-up steps.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


SCENARIOS = {
    "sft": ["sft/vlsafe", "sft/plain_torch"],
    "dpo": ["dpo/vlsafe", "dpo/trl", "bpo/vlsafe", "dpo/vlsafe_full_sequences", "dpo/vlsafe_per_sequence_images",
            "dpo/vlsafe_precomputed_reference", "dpo/vlsafe_lora_copy_reference", "dpo/vlsafe_lora_adapter_reference"],
    "data": ["data/webdataset", "data/per_file", "data/webdataset_original", "data/webdataset_cold",
             "data/per_file_cold"],
    "generate": ["generate/batched", "generate/one_by_one"],
    "peak": ["peak/matmul"],
    "serve": ["serve/unguarded", "serve/guarded", "serve/guarded_detox"],
    "packing": ["sft/packed"],
}

# (title, contender, baseline, throughput unit). Ratio = contender throughput / baseline throughput.
COMPARISONS = [
    ("SFT step: vlsafe vs plain PyTorch + HF Llava", "sft/vlsafe", "sft/plain_torch", "samples"),
    ("DPO step: vlsafe vs TRL DPOTrainer", "dpo/vlsafe", "dpo/trl", "pairs"),
    ("BPO step (2 pairs/sample): vlsafe vs TRL DPO rows", "bpo/vlsafe", "dpo/trl", "pairs"),
    ("DPO: prompt run once (KV cache) vs once per response", "dpo/vlsafe", "dpo/vlsafe_full_sequences", "pairs"),
    ("DPO: image encoded once vs per sequence", "dpo/vlsafe", "dpo/vlsafe_per_sequence_images", "pairs"),
    ("DPO: precomputed reference vs live copy", "dpo/vlsafe_precomputed_reference", "dpo/vlsafe", "pairs"),
    ("DPO+LoRA: adapter-off reference vs model copy", "dpo/vlsafe_lora_adapter_reference",
     "dpo/vlsafe_lora_copy_reference", "pairs"),
    ("Data: --presize shards vs LLaVA per-file JPEGs", "data/webdataset", "data/per_file", "images"),
    ("Data: same JPEGs in shards vs per-file (warm)", "data/webdataset_original", "data/per_file", "images"),
    ("Data: cold cache, --presize shards vs per-file", "data/webdataset_cold", "data/per_file_cold", "images"),
    ("Generation: batched vs one-by-one", "generate/batched", "generate/one_by_one", "tokens"),
    ("SFT packing: packed rows vs padded (LLaVA lengths)", "sft/packed", "sft/padded", "samples"),
    ("SFT packing: real tokens/s, packed vs padded", "sft/packed", "sft/padded", "tokens"),
    ("SFT packing: rows <= longest sample vs padded", "sft/packed_longest", "sft/padded", "samples"),
    ("Serving: guarded (detector + refusal) vs unguarded", "serve/guarded", "serve/unguarded", "requests"),
    ("Serving: guard + detoxifier (all rewritten) vs none", "serve/guarded_detox", "serve/unguarded", "requests"),
]


def run_worker(name: str, config: dict, workdir: str) -> None:
    """Child process: run one contender and print its result as the last stdout line."""
    import torch

    from vlsafe.bench.contenders import CONTENDERS
    from vlsafe.bench.setup import BenchConfig

    torch.set_num_threads(int(os.environ.get("VLSAFE_BENCH_THREADS", torch.get_num_threads())))
    result = CONTENDERS[name](BenchConfig(**config), Path(workdir))
    if "peak_rss_mb" not in result:  # None: both sides of a comparison shared the process
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["threads"] = torch.get_num_threads()
    print("BENCH-RESULT " + json.dumps(result))


def run_contender(name: str, config: dict, root: Path, timeout: float) -> dict:
    workdir = root / name.replace("/", "__")
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "vlsafe.tools.bench", "--worker", name, "--config-json", json.dumps(config),
           "--workdir", str(workdir)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH-RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        raise RuntimeError(f"contender {name} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1][len("BENCH-RESULT "):])
    result["wall_seconds"] = time.perf_counter() - start
    # a contender may time its baseline in its own process (`companions`, e.g. sft/packed's sft/padded)
    result["companions"] = {n: summarise(r) for n, r in result.get("companions", {}).items()}
    return summarise(result)


def summarise(result: dict) -> dict:
    """Median step time and throughput per unit of work (samples/s, tokens/s, pairs/s, images/s, flops/s)."""
    median = statistics.median(result["step_seconds"])
    result["median_step_seconds"] = median
    result["throughput"] = {f"{unit}_per_s": amount / median for unit, amount in result["work_per_step"].items()}
    return result


def comparison_rows(results: dict[str, dict]) -> list[dict]:
    rows = []
    for title, ours, base, unit in COMPARISONS:
        if ours not in results or base not in results:
            continue
        a, b = results[ours], results[base]
        key = f"{unit}_per_s"
        if not b["throughput"][key]:
            raise RuntimeError(f"{base} did no measurable work ({unit}); increase the sizes")
        shared = a["peak_rss_mb"] is None or b["peak_rss_mb"] is None  # one process: no memory comparison
        rows.append({"comparison": title, "unit": f"{unit}/s", "vlsafe": a["throughput"][key],
                     "baseline": b["throughput"][key], "speed_ratio": a["throughput"][key] / b["throughput"][key],
                     "vlsafe_peak_mb": a["peak_rss_mb"], "baseline_peak_mb": b["peak_rss_mb"],
                     "memory_ratio": None if shared else b["peak_rss_mb"] / a["peak_rss_mb"]})
    if "sft/vlsafe" in results and "peak/matmul" in results:
        achieved = results["sft/vlsafe"]["throughput"]["flops_per_s"]
        peak = results["peak/matmul"]["throughput"]["flops_per_s"]
        rows.append({"comparison": "Utilisation: SFT step FLOP/s vs dense matmul peak", "unit": "GFLOP/s",
                     "vlsafe": achieved / 1e9, "baseline": peak / 1e9, "speed_ratio": achieved / peak,
                     "vlsafe_peak_mb": None, "baseline_peak_mb": None, "memory_ratio": None})
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'comparison':<52} {'ratio':>6} {'vlsafe':>10} {'baseline':>10} {'unit':<10} {'mem ratio':>9} {'MB (v/b)':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] else "-"
        mb = f"{r['vlsafe_peak_mb']:.0f}/{r['baseline_peak_mb']:.0f}" if r["vlsafe_peak_mb"] else "-"
        lines.append(f"{r['comparison']:<52} {r['speed_ratio']:>5.2f}x {r['vlsafe']:>10.2f} {r['baseline']:>10.2f} "
                     f"{r['unit']:<10} {mem:>9} {mb:>13}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole run in a few minutes on 2 cores")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: seconds per contender
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS),
                        help="which scenarios to run (default: all)")
    parser.add_argument("--out", default="bench.json", help="where to write the results as JSON (default bench.json)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per contender before giving up")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        run_worker(args.worker, json.loads(args.config_json), args.workdir)
        return 0

    from tqdm import tqdm

    from vlsafe.bench.setup import BenchConfig

    cfg = BenchConfig.tiny() if args.tiny else BenchConfig.quick() if args.quick else BenchConfig()
    names = [n for s in args.scenarios for n in SCENARIOS[s]]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vlsafe-bench-") as tmp:
        root = Path(args.workdir or tmp)
        for name in (bar := tqdm(names, desc="bench", unit="contender")):
            bar.set_postfix_str(name)
            results[name] = run_contender(name, cfg.as_dict(), root, args.timeout)
            results.update(results[name].pop("companions"))
    rows = comparison_rows(results)
    print(format_table(rows))
    if any(name.startswith("serve/") for name in results):
        from vlsafe.bench.serving import serving_table

        print(serving_table(results))
    import torch

    report = {"config": cfg.as_dict(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
              "comparisons": rows, "contenders": results}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
