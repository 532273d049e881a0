"""The `vlsafe` command: one entry point for every tool (`vlsafe fit recipes/bpo.yaml`, `vlsafe evaluate ...`).

Each command runs the `main(argv)` of the module that implements it, with the arguments after the command name,
so `vlsafe make-shards ARGS` and `python tools/make_shards.py ARGS` are the same run. Modules are imported only
when their command is chosen: `vlsafe --help` answers without loading torch.
"""
from __future__ import annotations

import difflib
import importlib
import sys
from dataclasses import dataclass

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


@dataclass(frozen=True)
class Command:
    module: str
    purpose: str


COMMANDS: dict[str, Command] = {
    "fit": Command("vlsafe.cli", "train from a YAML recipe (`vlsafe fit recipes/demo/sft.yaml`)"),
    "validate": Command("vlsafe.cli", "run a recipe's validation loop on a checkpoint (--ckpt_path)"),
    "test": Command("vlsafe.cli", "run a recipe's test loop on a checkpoint (--ckpt_path)"),
    "predict": Command("vlsafe.cli", "run a recipe's predict loop on a checkpoint (--ckpt_path)"),
    "make-shards": Command("vlsafe.tools.make_shards", "write WebDataset shards + index.json from a public format"),
    "blind-generate": Command("vlsafe.tools.blind_generate", "generate image-free responses for BPO"),
    "precompute-reference": Command("vlsafe.tools.precompute_reference",
                                    "compute reference log-probs once for reference=precomputed"),
    "evaluate": Command("vlsafe.tools.evaluate", "evaluate a checkpoint on the suites an eval spec lists"),
    "seed-spread": Command("vlsafe.tools.seed_spread",
                           "train recipes once per seed, evaluate each model, report mean ± sd over seeds"),
    "guard": Command("vlsafe.tools.guard", "guarded generation: answer, score with a harm detector, fix"),
    "serve": Command("vlsafe.serving.cli", "OpenAI-compatible chat server with every answer guarded"),
    "merge-adapter": Command("vlsafe.export.merge_adapter", "merge a LoRA adapter into its base model"),
    "export": Command("vlsafe.export.cli",
                      "a checkpoint as a transformers LLaVA folder: chat template, generation config, model card"),
    "report": Command("vlsafe.tools.report", "render a run's logged metrics as charts and a summary page"),
    "reliability-report": Command("vlsafe.tools.reliability_report",
                                  "push every catalogued bad input through the pipeline; print the table"),
    "bench": Command("vlsafe.tools.bench", "side-by-side benchmarks against the usual alternatives"),
    "gpu-check": Command("vlsafe.tools.gpu_check", "bf16 SFT/DPO steps of a ~1B LLaVA on one GPU (FSDP2, TRL)"),
    "plan": Command("vlsafe.tools.plan", "will this recipe fit? per-GPU memory per strategy and the cheapest fix"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {command.purpose}" for name, command in COMMANDS.items())
    return (f"usage: vlsafe <command> [args...]\n\n{__doc__.splitlines()[0]}\n\ncommands:\n{rows}\n\n"
            "`vlsafe <command> --help` shows a command's options. Every command is also a script:\n"
            "`vlsafe make-shards ...` = `python tools/make_shards.py ...`,\n"
            "`vlsafe fit ...` = `python tools/fit.py fit ...`.")


def lightning_argv(command: str, args: list[str]) -> list[str]:
    """`fit recipe.yaml ...` -> `fit --config recipe.yaml ...`: tools/fit.py's shorthand, for each subcommand."""
    if args and args[0].endswith((".yaml", ".yml")):
        return [command, "--config", *args]
    return [command, *args]


def main(argv: list[str] | None = None) -> int:
    """Dispatch `vlsafe <command> ARGS`; returns the exit status (2 for a missing or unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from vlsafe import __version__

        print(f"vlsafe {__version__}")
        return 0
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name.replace("_", "-"), COMMANDS, n=1)
        hint = f" (did you mean `vlsafe {close[0]}`?)" if close else ""
        print(f"vlsafe: error: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    entry = importlib.import_module(COMMANDS[name].module).main
    if name in LIGHTNING_COMMANDS:  # sys.argv stays whole: Lightning re-launches it for DDP's other ranks
        result = entry(lightning_argv(name, args))
    else:
        saved, sys.argv = sys.argv, [f"vlsafe {name}", *args]  # argparse names the program after sys.argv[0]
        try:
            result = entry(args)
        finally:
            sys.argv = saved
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
