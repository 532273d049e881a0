"""Write WebDataset shards (+ index.json) that every vlsafe recipe reads.

    python tools/make_shards.py llava --json llava_v1_5_mix665k.json --images /data/llava --out shards/mix665k
    python tools/make_shards.py llava ... --presize 336     # images squared + resized once for a 336-px model
    python tools/make_shards.py mmsafe-po --config config_train.json --keywords train --images /data/mmsafe \
        --out shards/mmsafe-po                                  # or: --json train.json [blind.json ...]
    python tools/make_shards.py mmsafetybench --root /data/MM-SafetyBench --out shards/mmsb   # prompts only
    python tools/make_shards.py synthetic --out shards/world --n 10000 --kinds qa safety negative
    python tools/make_shards.py index shards/mix665k        # rebuild index.json from the tars

Every sample is validated and its images are decoded once; unusable samples stop the run with the sample id
and field (default) or, with --on-error skip, are listed in index.json and summarised at the end. Texts over
the processor's max_text_chars (100,000 characters) are written with a warning naming the sample.
Shards are written to a staging folder and moved into --out only when the run succeeds: a failed run leaves
the set already in --out as it was.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def _write(samples, args, pre_errors=None):
    from vlsafe.data.images import presize_from_args
    from vlsafe.data.shards import write_shards

    presize = presize_from_args(args.presize, args.presize_mean, args.presize_squash, args.presize_compress_level,
                                args.presize_format, args.presize_rgb_mode)
    index = write_shards(samples, args.out, max_samples=args.max_samples, max_bytes=int(args.max_mb * 2**20),
                         on_error=args.on_error, progress=True, total=getattr(args, "n", None), presize=presize)
    skipped = (pre_errors or []) + index.skipped
    if pre_errors:
        index.skipped = skipped
        index.save(args.out)
    print(f"wrote {index.total} samples in {len(index.shards)} shard(s) to {args.out}; skipped {len(skipped)}")
    for row in skipped[:10]:
        print(f"  skipped {row['id']}: {row['field']}: {row['error']}")
    if len(skipped) > 10:
        print(f"  ... and {len(skipped) - 10} more (see {args.out}/index.json)")


def _source_command(source):
    """Run a converter from `vlsafe/data/sources/` (a `DataSource`: vlsafe/data/sources/base.py)."""

    def run(args) -> None:
        from collections import Counter

        from vlsafe.data.sources import warn_long_texts

        errors = [] if args.on_error == "skip" else None
        stats: Counter = Counter()
        _write(warn_long_texts(source.samples(args, errors, stats), stats), args, errors)
        if stats:
            print(f"{source.name}: " + ", ".join(f"{key}={value}" for key, value in sorted(stats.items())))

    return run


def cmd_synthetic(args) -> None:
    from vlsafe.data.synthetic.world import WorldConfig, generate

    samples = generate(args.n, seed=args.seed, kinds=args.kinds, cfg=WorldConfig(image_size=args.image_size),
                       split=args.split)
    _write(samples, args)


def cmd_index(args) -> None:
    from vlsafe.data.shards import ShardIndex, ShardInfo, iter_shard
    from vlsafe.methods.preference.blind import PROGRESS_NAME

    folder = Path(args.folder)
    if (folder / PROGRESS_NAME).exists() and not (folder / "index.json").exists():
        # an unfinished blind_generate / precompute_reference run: its tars may sit beside an older set's
        raise SystemExit(f"error: {folder} holds an unfinished resumable run ({PROGRESS_NAME}, no index.json); "
                         f"re-run that tool with the same settings to finish it rather than indexing partial output")
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise SystemExit(f"error: no .tar files in {folder}")
    shards = [ShardInfo(t.name, sum(1 for _ in iter_shard(str(t)))) for t in tars]
    path = ShardIndex(shards).save(folder)
    print(f"indexed {sum(s.count for s in shards)} samples in {len(shards)} shard(s): {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def writer_args(p):
        p.add_argument("--out", required=True, help="output directory for shard-*.tar and index.json")
        p.add_argument("--max-samples", type=int, default=1000, help="samples per shard (default 1000)")
        p.add_argument("--max-mb", type=float, default=512, help="approximate shard size cap in MiB (default 512)")
        p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                       help="stop at the first unusable sample (default) or skip and report it")
        p.add_argument("--presize", type=int, default=None, metavar="SIDE",
                       help="pad every image to a square and resize it to the model's input side now, stored "
                            "losslessly (raw PPM by default), so training skips decoding the full image and "
                            "resizing it (same pixels, "
                            "~3x less loading CPU: docs/data_performance.md). Only for models whose processor uses "
                            "this side; not for grounding data with boxes/masks")
        p.add_argument("--presize-mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                       help="with --presize: the model's normalisation mean, whose colour pads to square "
                            "(default OpenAI CLIP's, as LLaVA)")
        p.add_argument("--presize-squash", action="store_true",
                       help="with --presize: resize without padding (processors with pad_to_square: false)")
        p.add_argument("--presize-format", choices=["ppm", "png"], default=None,
                       help="with --presize: how the pixels are stored. ppm (default): raw RGB bytes, read without "
                            "an image decoder, fastest to load; png: lossless PNG (see --presize-compress-level). "
                            "Same pixels either way")
        p.add_argument("--presize-compress-level", type=int, default=None, choices=range(10), metavar="0-9",
                       help="with --presize: PNG deflate level (implies --presize-format png). 0 stores pixels "
                            "uncompressed; 1 stores roughly half the bytes for ~1.3-1.4x the loading CPU")
        p.add_argument("--presize-rgb-mode", choices=["composite", "pil"], default=None,
                       help="with --presize: how transparent images become RGB; must match the recipe's "
                            "`rgb_mode` (composite, default: alpha on white; pil: LLaVA's convert('RGB'))")

    from vlsafe.data.sources import discover_sources

    for source_class in discover_sources():
        source = source_class()
        parser_of_source = sub.add_parser(source.name, help=source.help)
        source.add_arguments(parser_of_source)
        writer_args(parser_of_source)
        parser_of_source.set_defaults(func=_source_command(source))

    synthetic = sub.add_parser("synthetic", help="the synthetic shapes world")
    synthetic.add_argument("--n", type=int, default=1000)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--split", default="train")
    synthetic.add_argument("--image-size", type=int, default=64)
    synthetic.add_argument("--kinds", nargs="+", default=["qa"])
    writer_args(synthetic)
    synthetic.set_defaults(func=cmd_synthetic)

    index = sub.add_parser("index", help="(re)build index.json for a folder of vlsafe shards")
    index.add_argument("folder")
    index.set_defaults(func=cmd_index)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
