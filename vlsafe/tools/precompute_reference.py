"""Compute reference log-probs once with a frozen model, for `PreferenceModule(reference="precomputed")`.

    python tools/precompute_reference.py --input shards/mmsafe-po --out shards/mmsafe-po-ref \\
        --model runs/sft/last.ckpt --model-type ckpt
    python tools/precompute_reference.py --input shards/bpo-field --out shards/bpo-field-ref \\
        --model /models/llava-1.5-7b-hf --model-type llava-hf --responses chosen rejected blind

Every output sample is the input sample with labels["ref_logp_chosen"], ["ref_logp_rejected"] (and
["ref_logp_blind"] with --responses chosen rejected blind) set, computed with the same PreferenceEncoder
batches and log-prob code the copy-mode reference uses, plus meta["reference"] naming the model and
whether the log-probs are sums or (--average-logprob) means; that must match the training run's
`average_logprob`. The reference model must be the model preference training starts from.

Resumable like tools/blind_generate.py: output shard k covers input samples [k * --max-samples,
(k + 1) * --max-samples); re-running the same command continues after the finished shards, and stops with an
error if the model behind --model is no longer the one the run started with (content, not path).
"""
from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from vlsafe.methods.preference.blind import (
        add_chunked_run_arguments,
        add_model_arguments,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="preference shard folder (with index.json), tar or pattern")
    parser.add_argument("--out", required=True, help="output folder for shard-*.tar, progress.json and index.json")
    add_model_arguments(parser)
    parser.add_argument("--responses", nargs="+", default=["chosen", "rejected"],
                        help="responses to score: chosen rejected [blind] (default: chosen rejected)")
    parser.add_argument("--average-logprob", action="store_true",
                        help="length-normalised (mean) log-probs instead of sums; match the training run")
    parser.add_argument("--response-format", choices=["released", "template"], default="released",
                        help="which tokens are scored; match the training run's response_format (default released)")
    parser.add_argument("--length-rule", choices=["released", "truncate"], default="released",
                        help="what a too-long pair becomes; match the training run's length_rule (default released)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default 8)")
    add_chunked_run_arguments(parser)
    return parser


def run(args: argparse.Namespace):
    from vlsafe.methods.preference.blind import (
        ChunkResult,
        absolute,
        load_frozen_model,
        print_run_summary,
        run_chunked,
        sample_error_policy,
    )
    from vlsafe.methods.preference.reference import (
        check_responses,
        reference_logps,
        with_reference,
    )

    for flag in ("batch_size", "max_samples"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.stop_after_shards is not None and args.stop_after_shards < 1:
        raise ValueError(f"--stop-after-shards must be >= 1, got {args.stop_after_shards}")
    responses = check_responses(args.responses)
    from vlsafe.data.shards import load_index

    load_index(args.input)  # bad input fails here, before a (large) model is loaded
    vlm, processor = load_frozen_model(args.model, args.model_type, args.template, args.device, args.dtype)
    provenance = {"model": str(args.model), "model_type": args.model_type, "dtype": args.dtype,
                  "average_logprob": bool(args.average_logprob), "responses": list(responses),
                  "response_format": args.response_format, "length_rule": args.length_rule}

    def process(items):
        on_sample_error, skipped = sample_error_policy(args.on_error)
        samples = [sample for _, sample in items]
        logps = reference_logps(vlm, processor, samples, responses, args.batch_size, args.average_logprob,
                                on_sample_error, args.response_format, args.length_rule)
        out = [with_reference(sample, values, provenance) for sample, values in zip(samples, logps)
               if values is not None]
        return ChunkResult(out, skipped)

    settings = {"tool": "precompute_reference", "input": absolute(args.input), "model": absolute(args.model),
                "model_type": args.model_type, "template": args.template, "dtype": args.dtype,
                "responses": list(responses), "average_logprob": bool(args.average_logprob),
                "response_format": args.response_format, "length_rule": args.length_rule,
                "batch_size": args.batch_size}
    summary = run_chunked(args.input, args.out, process, chunk_size=args.max_samples, settings=settings,
                          on_error=args.on_error, stop_after=args.stop_after_shards, progress=not args.no_progress,
                          desc="reference log-probs", model_path=args.model)
    print_run_summary(summary, f" with {', '.join('ref_logp_' + r for r in responses)}")
    return summary


def main(argv: list[str] | None = None):
    from vlsafe.methods.preference.blind import run_tool

    return run_tool(build_parser, run, argv)


if __name__ == "__main__":
    main()
