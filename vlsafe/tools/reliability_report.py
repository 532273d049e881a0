"""Feed every catalogued bad input (and N hypothesis-generated malformed samples) through the data pipeline
and print the README's reliability table.

    python tools/reliability_report.py                       # catalogue + 200 fuzzed inputs per entry point
    python tools/reliability_report.py --examples 1000 --training --out reliability.md

Each catalogue row is one malformed input pushed through converter -> shard writer -> reader -> processor
(see vlsafe/reliability/bad_inputs.py); the fuzz rows count random inputs that loaded unchanged vs were
rejected with SampleError (any other outcome fails the run). `--training` adds the NaN/Inf guard run.
Exits non-zero if any input ends differently than documented.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def _cell(text: str, width: int = 110) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def catalogue_rows(root: Path, trust: bool = True) -> tuple[list[str], int]:
    from tqdm.auto import tqdm

    from vlsafe.reliability.bad_inputs import Bench, all_cases
    from vlsafe.reliability.trust_cases import all_trust_cases

    bench, rows, failures = Bench(root), [], 0
    cases = all_cases() + (all_trust_cases() if trust else [])
    for case in tqdm(cases, desc="bad inputs", unit="case"):
        outcome = case.run(bench)
        ok = case.passed(outcome)
        failures += not ok
        shown = outcome.detail.split(": ", 1)[-1] if outcome.kind == "rejected" else outcome.detail
        shown = shown.replace(str(root), "…")
        rows.append(f"| {case.area} | {case.name} | {case.expect} | {'✅' if ok else '❌ ' + outcome.kind} | "
                    f"{_cell(shown)} |")
    return rows, failures


def fuzz_rows(examples: int, root: Path) -> tuple[list[str], int]:
    from hypothesis import HealthCheck, given, settings

    from vlsafe.reliability import fuzz
    from vlsafe.reliability.bad_inputs import Bench

    processor = Bench(root).processor
    doors = [("random `Sample` objects -> writer -> reader -> encoder", fuzz.samples,
              lambda x: fuzz.check_sample(x, processor), "loaded unchanged"),
             ("random shard records (foreign tar) -> reader -> encoder", fuzz.raw_records(),
              lambda x: fuzz.check_raw_record(x, processor), "loaded and encoded consistently"),
             ("random LLaVA JSON records -> converter -> validation", fuzz.llava_records(), fuzz.check_llava_record,
              "converted to a valid Sample")]
    rows, failures = [], 0
    for name, strategy, check, loaded in doors:
        counts: Counter = Counter()

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def run(value):
            counts[check(value)] += 1

        start = time.time()
        try:
            run()
            verdict = "✅"
        except Exception as err:  # hypothesis re-raises the minimal failing example
            failures += 1
            verdict = f"❌ {type(err).__name__}: {_cell(str(err), 60)}"
        rows.append(f"| fuzz | {name} | loads or SampleError | {verdict} | {sum(counts.values())} generated: "
                    f"{counts['loaded']} {loaded}, {counts['rejected']} rejected with SampleError, 0 other "
                    f"({time.time() - start:.0f} s) |")
    return rows, failures


def training_rows(root: Path) -> tuple[list[str], int]:
    """A tiny SFT run with NaN pixels injected at steps 1 and 3, then a run that stays NaN."""
    import warnings

    import lightning as L
    import torch

    from vlsafe.builders import TinyVLM
    from vlsafe.data.synthetic.module import SyntheticWorld
    from vlsafe.methods.sft import SFTModule
    from vlsafe.ops.nonfinite import NonFiniteGuard, NonFiniteTrainingError

    class Poison(L.Callback):
        def __init__(self, steps):
            self.steps = steps

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step in self.steps:
                batch["pixel_values"].fill_(float("nan"))

    def fit(steps, max_steps, name):
        L.seed_everything(0)
        module = SFTModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64, vision_layers=1, num_layers=1),
                           optim={"lr": 1e-3, "warmup_steps": 0})
        guard = NonFiniteGuard(max_consecutive=3)
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=str(root / name), callbacks=[Poison(steps), guard])
        data = SyntheticWorld(root=str(root / "world"), train_samples=64, val_samples=0, batch_size=4, num_workers=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                trainer.fit(module, data)
                error = None
            except NonFiniteTrainingError as err:
                error = err
        finite = all(bool(torch.isfinite(p).all()) for p in module.parameters())
        return guard, trainer, error, finite

    guard, trainer, error, finite = fit({1, 3}, 8, "a")
    ok_a = error is None and len(guard.skipped_steps) == 2 and trainer.global_step == 8 and finite
    guard_b, trainer_b, error_b, finite_b = fit(set(range(2, 100)), 20, "b")
    saved = list((root / "b").glob("nonfinite-stop-*.ckpt"))
    ok_b = error_b is not None and bool(saved) and finite_b
    rows = [f"| training | NaN loss at 2 of 8 steps | steps skipped, run continues | {'✅' if ok_a else '❌'} | "
            f"skipped steps {[r['step'] for r in guard.skipped_steps]}; finished {trainer.global_step} steps; "
            f"weights finite: {finite} |",
            f"| training | NaN loss at every step from step 2 | stop with a checkpoint after 3 in a row | "
            f"{'✅' if ok_b else '❌'} | {_cell(str(error_b).replace(str(root), '…'), 140)} |"]
    return rows, (not ok_a) + (not ok_b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200, help="hypothesis examples per entry point (default 200)")
    parser.add_argument("--training", action="store_true", help="also run the NaN/Inf guard on a tiny model (~20 s)")
    parser.add_argument("--no-trust", action="store_true",
                        help="skip the trust cases (checkpoints, signals, judges, ...; they start real runs, ~1 min)")
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    if args.examples < 0:
        parser.error("--examples must be >= 0")
    logging.disable(logging.ERROR)  # the skips the catalogue provokes on purpose are reported in the table
    header = ["| area | bad input | documented outcome | result | error message / detail |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows, failures = catalogue_rows(root / "catalogue", trust=not args.no_trust)
        if args.examples:
            more, bad = fuzz_rows(args.examples, root / "fuzz")
            rows, failures = rows + more, failures + bad
        if args.training:
            more, bad = training_rows(root / "training")
            rows, failures = rows + more, failures + bad
    table = "\n".join(header + rows)
    print(table)
    print(f"\n{len(rows) - failures} of {len(rows)} rows as documented")
    if args.out:
        Path(args.out).write_text(table + "\n")
    if failures:
        print(f"error: {failures} input(s) did not end as documented", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
