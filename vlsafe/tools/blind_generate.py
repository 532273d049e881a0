"""Generate blind (image-free) responses with a base model over preference shards, for BPO.

    python tools/blind_generate.py --input shards/mmsafe-po --out shards/mmsafe-po-blind \\
        --model runs/sft/last.ckpt --model-type ckpt --form rows
    python tools/blind_generate.py --input shards/mmsafe-po --out shards/mmsafe-po-blind-field \\
        --model /models/llava-1.5-7b-hf --model-type llava-hf --prompt-source blind_prompt --form field

The blind prompt is the sample's prompt with every <image> removed (default), or with --prompt-source
blind_prompt MMSafe-PO's text-only prompt naming the entity (meta["blind_messages"] / meta["blind_prompt"]).
Generation is greedy and batched. --form field sets each sample's `blind`; --form rows writes BPO's extra
rows (rejected = blind response, id + "-blind", meta["pair"] = "blind"), skipping a row whose blind
response equals `chosen`. Mix rows-form output with the original shards as a second source.

Resumable: output shard k covers input samples [k * --max-samples, (k + 1) * --max-samples); finished
shards are recorded in progress.json and a re-run of the same command continues after them. The resume is
keyed on the model's content (sha256 per weight/config file, re-checked only when a file's stat changed),
not its path: a model replaced behind the same --model path stops the run with an error.
index.json is written when every input sample is done.
"""
from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from vlsafe.methods.preference.blind import (
        BLIND_FORMS,
        PROMPT_SOURCES,
        add_chunked_run_arguments,
        add_model_arguments,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="preference shard folder (with index.json), tar or pattern")
    parser.add_argument("--out", required=True, help="output folder for shard-*.tar, progress.json and index.json")
    add_model_arguments(parser)
    parser.add_argument("--prompt-source", choices=PROMPT_SOURCES, default="prompt",
                        help="prompt: the sample's prompt without <image> (default); blind_prompt: "
                             "meta.blind_messages / meta.blind_prompt (MMSafe-PO text_prompt)")
    parser.add_argument("--form", choices=BLIND_FORMS, default="field",
                        help="field: set `blind` (default); rows: BPO extra rows with rejected = blind response")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="default 256")
    add_chunked_run_arguments(parser)
    return parser


def run(args: argparse.Namespace):
    from vlsafe.methods.preference.blind import (
        IDENTICAL,
        absolute,
        blind_shards,
        load_frozen_model,
        print_run_summary,
    )

    for flag in ("batch_size", "max_new_tokens", "max_samples"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.stop_after_shards is not None and args.stop_after_shards < 1:
        raise ValueError(f"--stop-after-shards must be >= 1, got {args.stop_after_shards}")
    from vlsafe.data.shards import load_index

    load_index(args.input)  # bad input fails here, before a (large) model is loaded
    vlm, processor = load_frozen_model(args.model, args.model_type, args.template, args.device, args.dtype)
    settings = {"tool": "blind_generate", "input": absolute(args.input), "model": absolute(args.model),
                "model_type": args.model_type, "template": args.template, "dtype": args.dtype}
    summary = blind_shards(args.input, args.out, vlm, processor, model_path=args.model, settings=settings,
                           form=args.form, prompt_source=args.prompt_source, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, chunk_size=args.max_samples, on_error=args.on_error,
                           stop_after=args.stop_after_shards, progress=not args.no_progress)
    identical = sum(row["error"] == IDENTICAL for row in summary.skipped)
    print_run_summary(summary, "", f" ({identical} because the blind response equals chosen)" if identical else "")
    return summary


def main(argv: list[str] | None = None):
    from vlsafe.methods.preference.blind import run_tool

    return run_tool(build_parser, run, argv)


if __name__ == "__main__":
    main()
