"""Guarded generation (MLLM-Protector): a VLM answers, a harm detector scores, harmful answers are fixed.

    python tools/guard.py --vlm runs/demo-sft/checkpoints/last.ckpt \
        --detector runs/demo-protector-detector/checkpoints/last.ckpt \
        [--detoxifier runs/demo-protector-detoxifier/checkpoints/last.ckpt] \
        --shards shards/safety-val --out guarded.jsonl
    python tools/guard.py --vlm CKPT --detector DETECTOR_DIR --mmsafetybench /data/MM-SafetyBench \
        --kinds SD SD_TYPO TYPO --scenarios 01-Illegal_Activitiy --out guarded.jsonl

--vlm is a vlsafe training checkpoint (any VLM method); --detector/--detoxifier are vlsafe checkpoints
(.ckpt) or standalone merged model folders (tools/merge_adapter.py). Answers with P(safe) < --threshold are
rewritten by the detoxifier, or replaced by the fixed refusal when none is given. Each output line holds
id, question, text (final), text_original, score (P(safe)), flagged, action and the sample's meta. An
existing --out is resumed (ids already written are skipped) unless --overwrite. When the prompts carry
ground truth (synthetic `safety` shards), the harmful-answer rate with and without the guard is printed.

Defaults reproduce the released evaluation (llava/eval/robustness_eval.py): greedy VLM answers of up to 1024
new tokens, threshold 0.5, detoxifier prompt + rewrite up to 1024 tokens. --preset sets what the detector and
the detoxifier read (vlsafe.methods.protector.presets): `released` (the bare answer; the rewrite prompt without
the question), `vlsafe` (question + answer, as in vlsafe training). By default each model gets the preset it was
trained with (a vlsafe checkpoint or merged folder records it) and `released` for other model folders, such as
the released weights. The demo models are trained with `vlsafe`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vlm", required=True, help="vlsafe VLM training checkpoint (.ckpt)")
    parser.add_argument("--detector", required=True, help="harm detector: vlsafe .ckpt or merged model folder")
    parser.add_argument("--detoxifier", default=None, help="detoxifier: vlsafe .ckpt or merged model folder "
                                                           "(default: replace harmful answers by the refusal)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="a vlsafe shard set (folder with index.json) of prompts")
    source.add_argument("--mmsafetybench", help="an MM-SafetyBench root (processed_questions/, imgs/)")
    parser.add_argument("--scenarios", nargs="+", default=None, help="MM-SafetyBench scenarios (default: all found)")
    parser.add_argument("--kinds", nargs="+", default=["SD", "SD_TYPO", "TYPO"],
                        help="MM-SafetyBench image kinds (SD SD_TYPO TYPO TEXT; default SD SD_TYPO TYPO)")
    parser.add_argument("--pairing", choices=["mmsafetybench", "released"], default="mmsafetybench",
                        help="MM-SafetyBench query per image kind: the benchmark's own (default) or the released "
                             "MLLM-Protector evaluation's (TYPO with 'Rephrased Question(SD)')")
    parser.add_argument("--out", required=True, help="output JSON Lines file")
    parser.add_argument("--overwrite", action="store_true", help="start --out afresh instead of resuming it")
    parser.add_argument("--limit", type=int, default=None, help="guard at most this many prompts")
    parser.add_argument("--threshold", type=float, default=0.5, help="flag answers with P(safe) below (0.5)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--preset", choices=["released", "vlsafe"], default=None,
                        help="input format of the detector and detoxifier (default: each model's own; released "
                             "for model folders that record none)")
    parser.add_argument("--max-new-tokens", type=int, default=1024,
                        help="VLM answer length cap (default 1024, as released)")
    parser.add_argument("--detox-max-total-tokens", type=int, default=None,
                        help="detoxifier prompt + rewrite length cap (default: the checkpoint's setting; 1024, the "
                             "released max_length, for model folders)")
    parser.add_argument("--detox-max-new-tokens", type=int, default=None,
                        help="extra cap on the rewrite itself (default: the checkpoint's setting; none for folders)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                        help="an unusable prompt stops the run (default) or is skipped and counted")
    return parser.parse_args(argv)


def load_prompts(args: argparse.Namespace, errors: list | None):
    if args.shards:
        from vlsafe.data.shards import read_samples

        return read_samples(args.shards)
    from vlsafe.data.sources.mmsafetybench import read_mmsafetybench

    return read_mmsafetybench(args.mmsafetybench, args.scenarios, tuple(args.kinds), errors, pairing=args.pairing)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for name in ("vlm", "detector", "detoxifier"):
        path = getattr(args, name)
        if path is not None and not Path(path).exists():
            raise SystemExit(f"error: --{name} {path} does not exist")
    if not 0.0 < args.threshold < 1.0:
        raise SystemExit(f"error: --threshold must be in (0, 1), got {args.threshold}")
    for name in ("max_new_tokens", "detox_max_total_tokens", "detox_max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {value}")
    import itertools

    from tqdm import tqdm

    from vlsafe.builders import FromCheckpoint
    from vlsafe.data.schema import SampleError
    from vlsafe.methods.protector import Detoxifier, GuardedGenerator, HarmDetector
    from vlsafe.methods.protector.metrics import guard_rates

    try:
        vlm, processor = FromCheckpoint(args.vlm).build()
        vlm.to(args.device)
        detector = HarmDetector.load(args.detector, device=args.device, batch_size=args.batch_size,
                                     threshold=args.threshold, preset=args.preset, fallback_preset="released")
        lengths = {name: value for name, value in (("max_new_tokens", args.detox_max_new_tokens),
                                                   ("max_total_tokens", args.detox_max_total_tokens)) if value}
        detoxifier = (Detoxifier.load(args.detoxifier, device=args.device, preset=args.preset,
                                      fallback_preset="released", **lengths)
                      if args.detoxifier else None)
        print(f"presets: detector {detector.preset.name}" +
              (f", detoxifier {detoxifier.preset.name}" if detoxifier else "") +
              f"; VLM answers up to {args.max_new_tokens} new tokens")
        guard = GuardedGenerator(vlm, processor, detector, detoxifier, threshold=args.threshold,
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        out = Path(args.out)
        done: set[str] = set()
        if out.exists() and not args.overwrite:
            done = {json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines() if line.strip()}
        errors: list | None = [] if args.on_error == "skip" else None
        prompts = (s for s in load_prompts(args, errors) if s.id not in done)
        if args.limit is not None:
            prompts = itertools.islice(prompts, max(0, args.limit - len(done)))
        out.parent.mkdir(parents=True, exist_ok=True)
        metas: dict[str, dict] = {}

        def remember(samples):
            for sample in samples:
                metas[sample.id] = sample.meta
                yield sample

        written = 0
        with out.open("w" if args.overwrite else "a", encoding="utf-8") as handle, \
                tqdm(total=args.limit, desc="guarded generation", unit="prompt") as bar:
            for batch in guard.run_batches(remember(prompts)):
                for answer in batch:
                    row = {**answer.as_dict(), "meta": metas.pop(answer.id, {})}
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                handle.flush()
                written += len(batch)
                bar.update(len(batch))
    except (ValueError, OSError, SampleError) as err:
        raise SystemExit(f"error: {err}") from None
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    flagged = sum(r["flagged"] for r in rows)
    print(f"wrote {written} new answers to {out} ({len(rows)} in total; {flagged} flagged as harmful, "
          f"threshold {args.threshold})")
    if errors:
        print(f"skipped {len(errors)} unusable prompt(s), e.g. {errors[0]}")
    if detector.truncated:
        print(f"note: {detector.truncated} detector input(s) were longer than {detector.max_length} tokens and cut")
    rates = guard_rates(rows)
    if rates:
        print("ground-truth rates: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in sorted(rates.items())))


if __name__ == "__main__":
    main()
