"""Hostile-but-realistic runs that once gave a wrong result without a word, lost work or ran foreign code.

Each case re-creates one situation a user met (a pickled checkpoint served over http, SIGTERM sent to
the whole process group, a judge that answers HTML, ...) and records what vlsafe does now. They share
`bad_inputs.Case`: `build(bench)` returns a detail string when the run ends as documented for a
*loads* case, and raises the named error for a *rejected* case. `tools/reliability_report.py` prints
them as rows beside the data catalogue; the tests that pin each behaviour live next to the code they
cover (named in each case's `expect`).
"""
from __future__ import annotations

from vlsafe.reliability.bad_inputs import LOADS, REJECTED, Bench, Case, WrongResult


def security_cases() -> list[Case]:
    """Checkpoint loading: remote and local checkpoints never unpickle code."""
    from vlsafe.reliability.checkpoint_trust_cases import security_cases as cases
    return cases()


def preemption_cases() -> list[Case]:
    """Process-group signals, SLURM requeue, which checkpoint a resumed job starts from, a hung worker."""
    from vlsafe.reliability.preemption_cases import preemption_cases as cases
    return cases()


def checkpoint_cases() -> list[Case]:
    """Checkpoints of another method, overrides ignored on resume, full or read-only disks."""
    from vlsafe.reliability.checkpoint_trust_cases import checkpoint_cases as cases
    return cases()


def evaluation_cases() -> list[Case]:
    """Judge failures, verdict parsing, request deadlines: no rate without its denominator."""
    from vlsafe.reliability.evaluation_trust import evaluation_trust_cases

    return evaluation_trust_cases()


def data_cases() -> list[Case]:
    """Interrupted shard writes, special-token text, huge fields, resumable tools keyed on content."""
    return _mixing_cases() + _text_and_shard_cases() + _resume_identity_cases()


def _mixing_cases() -> list[Case]:
    """Epoch planner: weights that cannot size an epoch, heavy padding, resume with skipped samples."""
    from vlsafe.reliability.mixing_cases import mixing_cases
    return mixing_cases()


def _text_and_shard_cases() -> list[Case]:
    """A failed shard rewrite, special-token text in a conversation, a 24 MB field, a zero-width answer."""
    from vlsafe.reliability.text_shard_cases import text_and_shard_cases
    return text_and_shard_cases()


def _resume_identity_cases() -> list[Case]:
    """A resumable tool continued after the model behind the same path was replaced."""
    from vlsafe.reliability.resume_identity_cases import resume_identity_cases
    return resume_identity_cases()


def _dash_c_recipe(bench: Bench) -> str:
    """`fit -c recipe.yaml` gets the same key check as `--config` (it used to skip it)."""
    import contextlib
    import io

    from vlsafe.cli import check_recipes

    path = bench.folder("recipe") / "recipe.yaml"
    path.write_text("model:\n  class_path: vlsafe.methods.sft.SFTModule\n  init_args:\n    train_visoin: true\n")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            check_recipes(["fit", "-c", str(path)])
        except SystemExit as exit_:
            raise ValueError(f"exit {exit_.code}: {stderr.getvalue().strip()}") from None
    return "accepted"


def _pixel_limit_variable(bench: Bench) -> str:
    """`VLSAFE_MAX_IMAGE_PIXELS=50M` is understood; a malformed value names the variable (was a bare int() error)."""
    from vlsafe.data.shards import parse_pixel_count

    pixels = parse_pixel_count("50M")
    try:
        parse_pixel_count("lots")
    except ValueError as err:
        return f"50M -> {pixels:,} pixels; 'lots' -> {err}"
    raise WrongResult("a malformed VLSAFE_MAX_IMAGE_PIXELS was accepted")


def _configuration_cases() -> list[Case]:
    return [
        Case("configuration", "typo in a recipe given with `fit -c`", REJECTED,
             ("exit 2", "train_visoin", "did you mean 'train_vision'"), _dash_c_recipe),
        Case("configuration", "VLSAFE_MAX_IMAGE_PIXELS=50M, and a malformed value", LOADS,
             ("50,000,000 pixels", "VLSAFE_MAX_IMAGE_PIXELS='lots'"), _pixel_limit_variable),
    ]


def all_trust_cases() -> list[Case]:
    return (security_cases() + preemption_cases() + checkpoint_cases() + evaluation_cases() + data_cases()
            + _configuration_cases())
