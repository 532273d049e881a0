r"""Serve a model behind the MLLM-Protector guard as an OpenAI-compatible chat-completions endpoint.

    vlsafe serve --model runs/demo-sft/checkpoints/last.ckpt \
        --detector runs/demo-protector-detector/checkpoints/last.ckpt [--detoxifier DETOX] --port 8000
    vlsafe serve --model export/llava-hf --template vicuna_v1 --detector DETECTOR_DIR
    vlsafe serve --upstream http://127.0.0.1:8001/v1 --upstream-model llava-1.5-7b --detector DETECTOR_DIR

--model is a vlsafe training checkpoint (.ckpt) or an exported llava-hf folder (tools/export.py); --upstream
forwards every request to another OpenAI-compatible server (vLLM, TGI, ...) instead. Every answer is scored by
the harm detector; answers with P(safe) < --threshold are rewritten by the detoxifier, or replaced by the fixed
refusal when none is given, and the choice says so (`guard: {flagged, score, rewritten, action, threshold}`,
finish_reason "content_filter"). --no-guard serves unguarded answers (for comparisons only).

Requests: POST /v1/chat/completions with images as data URLs (http(s) URLs only with --allow-image-urls: the
server then fetches any URL a client names, internal addresses included). Concurrent requests are batched (up
to --max-batch-size, waiting at most --batch-wait-ms); a full queue answers 429, a closing server 503, a request
over --timeout 504, an oversized body, image or text 413, other bad requests 400. Local models decode greedily.
See docs/serving.md.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="vlsafe VLM checkpoint (.ckpt) or exported llava-hf folder")
    source.add_argument("--upstream", help="base URL of an OpenAI-compatible server to forward to (.../v1)")
    parser.add_argument("--upstream-model", help="model name to ask the upstream server for (required with "
                                                 "--upstream)")
    parser.add_argument("--upstream-api-key-env", default=None,
                        help="environment variable holding the upstream server's API key")
    parser.add_argument("--template", default=None, choices=["vicuna_v1", "llava_v1", "llama2", "plain"],
                        help="conversation template of a llava-hf folder (default vicuna_v1; checkpoints bring "
                             "their own)")
    parser.add_argument("--model-name", default=None,
                        help="the name clients ask for (default: the checkpoint/folder name or --upstream-model)")
    guard = parser.add_mutually_exclusive_group(required=True)
    guard.add_argument("--detector", help="harm detector: vlsafe .ckpt or merged model folder")
    guard.add_argument("--no-guard", action="store_true", help="serve unguarded answers (comparisons only)")
    parser.add_argument("--detoxifier", default=None, help="detoxifier: vlsafe .ckpt or merged model folder "
                                                           "(default: replace harmful answers by the refusal)")
    parser.add_argument("--threshold", type=float, default=0.5, help="flag answers with P(safe) below (0.5)")
    parser.add_argument("--preset", choices=["released", "vlsafe"], default=None,
                        help="input format of the detector and detoxifier (default: each model's own; released "
                             "for model folders that record none)")
    parser.add_argument("--detox-max-new-tokens", type=int, default=None, help="cap on each rewrite's length")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="weights dtype of a llava-hf folder (bf16, fp16, fp32)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-env", default=None,
                        help="environment variable holding the key clients must send (Authorization: Bearer)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests per batched model call (8)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="how long the oldest request waits for its batch to fill (10 ms)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429 (64)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request before 504 (120)")
    parser.add_argument("--max-tokens", type=int, default=1024,
                        help="largest (and default) max_tokens a request may ask for (1024, the released guard's)")
    parser.add_argument("--max-text-chars", type=int, default=32_000, help="characters of text per request")
    parser.add_argument("--max-images", type=int, default=4, help="images per request")
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="width x height per image")
    parser.add_argument("--max-image-bytes", type=int, default=8 * 2**20, help="bytes per image (8 MiB)")
    parser.add_argument("--max-body-bytes", type=int, default=32 * 2**20, help="bytes per request body (32 MiB)")
    parser.add_argument("--allow-image-urls", action="store_true",
                        help="fetch http(s) image URLs (off: only data URLs are accepted)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse contradictory or impossible settings before anything loads."""
    if args.upstream and not args.upstream_model:
        raise SystemExit("error: --upstream needs --upstream-model (the model name the upstream serves)")
    if args.upstream and args.template:
        raise SystemExit("error: --template applies to --model folders, not to --upstream")
    if args.no_guard and args.detoxifier:
        raise SystemExit("error: --detoxifier needs a --detector (it rewrites what the detector flags)")
    for name in ("model", "detector", "detoxifier"):
        path = getattr(args, name)
        if path is not None and not Path(path).exists():
            raise SystemExit(f"error: --{name} {path} does not exist")
    if not 0.0 < args.threshold < 1.0:
        raise SystemExit(f"error: --threshold must be in (0, 1), got {args.threshold}")
    for name in ("max_batch_size", "max_queue", "max_tokens", "max_text_chars", "max_images", "max_image_pixels",
                 "max_image_bytes", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("api_key_env", "upstream_api_key_env"):
        var = getattr(args, name)
        if var and not os.environ.get(var):
            raise SystemExit(f"error: --{name.replace('_', '-')} names {var}, which is not set")


def build_app(args: argparse.Namespace):
    """The app `args` describe: backend, guard and settings loaded, nothing served yet."""
    from vlsafe.serving.app import ServeSettings, create_app
    from vlsafe.serving.backends import LocalBackend, UpstreamBackend
    from vlsafe.serving.batcher import BatchSettings
    from vlsafe.serving.guard import AnswerGuard
    from vlsafe.serving.inputs import Limits

    check_args(args)
    if args.upstream:
        backend = UpstreamBackend(args.upstream, args.upstream_model,
                                  os.environ.get(args.upstream_api_key_env) if args.upstream_api_key_env else None,
                                  timeout_s=args.timeout)
        name = args.model_name or args.upstream_model
    else:
        backend = LocalBackend.load(args.model, template=args.template, device=args.device, torch_dtype=args.dtype)
        path = Path(args.model)
        name = args.model_name or (path.parent.parent.name if path.suffix == ".ckpt" and
                                   path.parent.name == "checkpoints" else path.stem)
    guard = None
    if not args.no_guard:
        lengths = {"max_new_tokens": args.detox_max_new_tokens} if args.detox_max_new_tokens else {}
        guard = AnswerGuard.load(args.detector, args.detoxifier, threshold=args.threshold, preset=args.preset,
                                 device=args.device, **lengths)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes,
                    max_image_pixels=args.max_image_pixels, max_images=args.max_images,
                    max_text_chars=args.max_text_chars, max_tokens=args.max_tokens)
    batching = BatchSettings(max_batch_size=args.max_batch_size, max_wait_ms=args.batch_wait_ms,
                             max_queue=args.max_queue, timeout_s=args.timeout)
    settings = ServeSettings(model_name=name, limits=limits, batching=batching,
                             allow_image_urls=args.allow_image_urls,
                             api_key=os.environ.get(args.api_key_env) if args.api_key_env else None)
    return create_app(backend, guard, settings)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        app = build_app(args)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    from vlsafe.serving.runner import serve

    guard = app.state.guard
    print(f"serving {app.state.settings.model_name!r} on http://{args.host}:{args.port}/v1 "
          f"({'guard: ' + guard.mode if guard else 'UNGUARDED'})", flush=True)
    serve(app, args.host, args.port, args.log_level)


if __name__ == "__main__":
    main()
