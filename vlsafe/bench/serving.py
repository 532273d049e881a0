"""The `serve` benchmark scenario: what the MLLM-Protector guard costs a served model.

Each contender starts `vlsafe serve`'s app (uvicorn, loopback, batching as configured) on the benchmark's VLM and
drives it with `batch_size` closed-loop clients (each sends its next request when its last one is answered),
every request an image + question of the synthetic world as a data URL asking for `new_tokens` tokens; the
server may wait up to 1 s to fill a batch, so every batch is full and the contenders run the same batches.
Reported: requests/s over the timed requests, per-request latency (p50, p95) as the clients see it, and the mean
batch size (a check: it should equal the number of clients).

- `serve/unguarded`: answers as the VLM gives them (`--no-guard`);
- `serve/guarded`: harm detector + fixed refusal, threshold 0.5 (the models are random-init: the flag rate is
  whatever the detector says, and reported; a refusal costs nothing, so this is the detector's overhead);
- `serve/guarded_detox`: harm detector + detoxifier with every answer flagged (threshold 0.999999): the worst
  case, a rewrite of `new_tokens` tokens after every answer.

The detector and the detoxifier are Llamas of the VLM's language-model size (MLLM-Protector pairs a 7B VLM with
LLM-sized guard models).
"""
from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import statistics
import time
import urllib.parse
from pathlib import Path
from typing import Any

import torch

from vlsafe.bench.setup import BenchConfig, synthetic_samples

Result = dict[str, Any]


def _guard_models(cfg: BenchConfig, detox: bool):
    from vlsafe.methods.protector import Detoxifier, HarmDetector
    from vlsafe.methods.protector.builders import TinyTextLM
    from vlsafe.methods.protector.detector_module import HarmDetectorModule
    from vlsafe.methods.protector.detoxifier_module import DetoxifierModule

    size = {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
            "intermediate_size": cfg.intermediate_size, "seed": cfg.seed}
    detector = HarmDetector.from_module(HarmDetectorModule(model=TinyTextLM(**size), preset="vlsafe").eval())
    detoxifier = None
    if detox:
        module = DetoxifierModule(model=TinyTextLM(**size), max_new_tokens=cfg.new_tokens, preset="vlsafe").eval()
        detoxifier = Detoxifier.from_module(module)
    return detector, detoxifier


def _requests(cfg: BenchConfig, n: int) -> list[bytes]:
    out = []
    for sample in synthetic_samples("qa", min(n, 64), cfg.seed, cfg.image_size):
        question = sample.messages[0]["content"].replace("<image>\n", "")
        url = "data:image/png;base64," + base64.b64encode(sample.images[0]).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
        out.append(json.dumps({"model": "bench", "max_tokens": cfg.new_tokens,
                               "messages": [{"role": "user", "content": content}]}).encode())
    return [out[i % len(out)] for i in range(n)]


def _client_loop(url: str, bodies: list[bytes]) -> list[tuple[float, bool]]:
    """One closed-loop client on one keep-alive connection: (latency, flagged) per request."""
    parsed = urllib.parse.urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600)
    out = []
    try:
        for body in bodies:
            start = time.perf_counter()
            connection.request("POST", "/v1/chat/completions", body=body,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            data = json.loads(response.read())
            if response.status != 200:
                raise RuntimeError(f"the server answered {response.status}: {data}")
            guard = data["choices"][0]["guard"]
            out.append((time.perf_counter() - start, bool(guard and guard["flagged"])))
    finally:
        connection.close()
    return out


def _serve(cfg: BenchConfig, guard: str) -> Result:
    from vlsafe.serving.app import ServeSettings, create_app
    from vlsafe.serving.backends import LocalBackend
    from vlsafe.serving.batcher import BatchSettings
    from vlsafe.serving.guard import AnswerGuard
    from vlsafe.serving.runner import running_server

    torch.manual_seed(cfg.seed)
    vlm, processor = cfg.builder().build()
    answer_guard = None
    if guard != "none":
        detector, detoxifier = _guard_models(cfg, detox=guard == "detox")
        answer_guard = AnswerGuard(detector, detoxifier, threshold=0.999999 if guard == "detox" else 0.5)
    clients, timed = cfg.batch_size, 4 * cfg.generate_prompts
    # as many clients as a batch holds, and time enough to gather them: every batch is full, so the contenders
    # differ by the guard only, not by how the batches happened to form on a busy machine
    settings = ServeSettings(model_name="bench", batching=BatchSettings(max_batch_size=cfg.batch_size,
                                                                        max_wait_ms=1000, max_queue=4 * clients))
    bodies = _requests(cfg, clients * (1 + -(-timed // clients)))
    per_client = [bodies[i::clients] for i in range(clients)]
    with running_server(create_app(LocalBackend(vlm, processor), answer_guard, settings)) as server, \
            concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(_client_loop, [server.url] * clients, [b[:1] for b in per_client]))  # warm-up
        start = time.perf_counter()
        results = list(pool.map(_client_loop, [server.url] * clients, [b[1:] for b in per_client]))
        wall = time.perf_counter() - start
        batch_sizes = server.app.state.batcher.stats.batch_sizes
    latencies = sorted(lat for client in results for lat, _ in client)
    flagged = sum(f for client in results for _, f in client)
    return {"step_seconds": [wall], "work_per_step": {"requests": float(len(latencies))}, "first_loss": None,
            "latency_p50_ms": 1000 * statistics.median(latencies),
            "latency_p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "flagged_fraction": flagged / len(latencies), "clients": clients,
            "mean_batch": sum(k * v for k, v in batch_sizes.items()) / max(1, sum(batch_sizes.values()))}


def serve_unguarded(cfg: BenchConfig, workdir: Path) -> Result:
    """`vlsafe serve --no-guard`: the VLM's answers as they are."""
    return _serve(cfg, "none")


def serve_guarded(cfg: BenchConfig, workdir: Path) -> Result:
    """`vlsafe serve --detector ...`: harm detector + fixed refusal."""
    return _serve(cfg, "refuse")


def serve_guarded_detox(cfg: BenchConfig, workdir: Path) -> Result:
    """`vlsafe serve --detector ... --detoxifier ...` with every answer flagged and rewritten (worst case)."""
    return _serve(cfg, "detox")


SERVING_CONTENDERS = {"serve/unguarded": serve_unguarded, "serve/guarded": serve_guarded,
                      "serve/guarded_detox": serve_guarded_detox}


def serving_table(results: dict[str, dict]) -> str:
    """requests/s and p50/p95 latency of each serving contender beside the unguarded one, with the ratios."""
    base = results.get("serve/unguarded")
    head = (f"{'serving (closed-loop clients)':<32} {'req/s':>8} {'p50 ms':>9} {'p95 ms':>9} {'flagged':>8} "
            f"{'batch':>6} {'req/s ratio':>11} {'p50 ratio':>9}")
    rows = [head]
    rows.append("-" * len(rows[0]))
    for name in SERVING_CONTENDERS:
        if name not in results:
            continue
        r = results[name]
        rps = r["throughput"]["requests_per_s"]
        ratio = f"{rps / base['throughput']['requests_per_s']:.2f}x" if base else "-"
        p50_ratio = f"{r['latency_p50_ms'] / base['latency_p50_ms']:.2f}x" if base else "-"
        rows.append(f"{name:<32} {rps:>8.2f} {r['latency_p50_ms']:>9.1f} {r['latency_p95_ms']:>9.1f} "
                    f"{r['flagged_fraction']:>8.2f} {r['mean_batch']:>6.1f} {ratio:>11} {p50_ratio:>9}")
    return "\n".join(rows)
