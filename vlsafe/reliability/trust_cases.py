"""Hostile-but-realistic runs that once gave a wrong result without a word, lost work or ran foreign code.

Each case re-creates one situation a user met (a pickled checkpoint served over http, SIGTERM sent to
the whole process group, a judge that answers HTML, ...) and records what vlsafe does now. They share
`bad_inputs.Case`: `build(bench)` returns a detail string when the run ends as documented for a
*loads* case, and raises the named error for a *rejected* case. `tools/reliability_report.py` prints
them as rows beside the data catalogue; the tests that pin each behaviour live next to the code they
cover (named in each case's `expect`).
"""
from __future__ import annotations

import contextlib
import io

from vlsafe.data.images import parse_pixel_count
from vlsafe.reliability.bad_inputs import LOADS, REJECTED, Bench, Case, WrongResult
from vlsafe.reliability.checkpoint_trust_cases import checkpoint_cases, security_cases
from vlsafe.reliability.evaluation_trust import evaluation_trust_cases
from vlsafe.reliability.mixing_cases import mixing_cases
from vlsafe.reliability.preemption_cases import preemption_cases
from vlsafe.reliability.resume_identity_cases import resume_identity_cases
from vlsafe.reliability.text_shard_cases import text_and_shard_cases


def _dash_c_recipe(bench: Bench) -> str:
    """`fit -c recipe.yaml` gets the same key check as `--config` (it used to skip it)."""
    from vlsafe.cli import check_recipes  # the CLI sits above this module's layer

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
    """Every row, grouped by area: one module per area, this module only adds the two configuration rows."""
    return (security_cases() + preemption_cases() + checkpoint_cases() + evaluation_trust_cases()
            + mixing_cases() + text_and_shard_cases() + resume_identity_cases() + _configuration_cases())
