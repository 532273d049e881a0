"""The evaluation demo of docs/evaluation.md runs from its documented command, and its table is that command's output.

`tests/test_docs_commands.py` only asks every documented line for `--help`. Here the documented
`vlsafe seed-spread ... --spec recipes/eval/demo.yaml` line really runs, cheaply: each demo recipe is replaced by
a tiny SFT recipe of the same name (2 steps), seeds 0 and 1, `--eval-args "--max-samples 1"`. The synthetic
VLGuard / MM-SafetyBench / GAVIE test sets are built from scratch in the test's folder, read by the real suites,
and the table the command prints must have the documented header and exactly the documented rows; every
`n per run` in the docs must be the size recipes/eval/demo.yaml asks for. So a renamed metric, suite option or
recipe, or a changed test-set size, fails here instead of leaving a stale table in the docs.
"""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from vlsafe.commands import main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "evaluation.md"

TINY_VLM = "{class_path: vlsafe.builders.TinyVLM, init_args: {hidden_size: 32, intermediate_size: 64, num_layers: 1, " \
           "num_heads: 2, vision_layers: 1}}"
#: a later recipe starts from the previous one's model by a relative path, as the demo BPO starts from the demo SFT
CHAINED_VLM = "{{class_path: vlsafe.builders.FromCheckpoint, init_args: {{path: runs/{previous}/checkpoints/last.ckpt}}}}"
TINY_RECIPE = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: runs/{name}/checkpoints, save_last: true, enable_version_counter: false}}
model:
  class_path: vlsafe.methods.sft.SFTModule
  init_args:
    vlm: {vlm}
data:
  class_path: vlsafe.data.synthetic.module.SyntheticWorld
  init_args: {{root: .cache/vlsafe/tiny-{name}, kinds: [qa], train_samples: 8, val_samples: 0, batch_size: 4,
              num_workers: 0}}
"""


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the fenced shell blocks, backslash continuations joined (as tests/test_docs_commands.py
    reads them; kept separate so that this test depends on docs/evaluation.md alone)."""
    lines = []
    for block in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        if block.group(1) not in ("", "bash", "sh"):
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        pending, start = "", first
        for offset, line in enumerate(block.group(2).splitlines()):
            start = start if pending else first + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            lines.append((start, pending + line))
            pending = ""
    return lines


def documented_spread() -> tuple[list[str], list[str]]:
    """The documented `vlsafe seed-spread` line (its words) and the Markdown table that follows it in the docs."""
    text = DOC.read_text(encoding="utf-8")
    commands = [(number, shlex.split(line, comments=True)) for number, line in shell_lines(text)
                if "seed-spread" in line and "recipes/eval/demo.yaml" in line]
    assert len(commands) == 1, f"{DOC}: expected one `vlsafe seed-spread` line with the demo spec, got {commands}"
    number, words = commands[0]
    lines = text.splitlines()[number:]
    start = next(i for i, line in enumerate(lines) if line.startswith("| model | metric |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return words, table


def table_rows(table: list[str]) -> dict[tuple[str, str], list[str]]:
    return {(cells[0], cells[1]): cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                                      for line in table[2:])}


def option_values(words: list[str], flag: str) -> list[str]:
    values = words[words.index(flag) + 1:]
    return values[:next((i for i, w in enumerate(values) if w.startswith("--")), len(values))]


def expected_n(metric: str, spec: dict) -> int | None:
    """The denominator recipes/eval/demo.yaml implies for a documented rate (None: not fixed by the spec)."""
    from vlsafe.data.synthetic.benchmarks import MMSB_SCENARIOS

    suites = {entry["name"]: entry for entry in spec["suites"]}
    suite, _, rest = metric.partition("/")
    options = suites[suite]
    if suite == "vlguard":
        return options["synthetic"]["n"]
    if suite == "mmsafetybench":
        per_kind = options["synthetic"]["n"] * len(MMSB_SCENARIOS)
        return per_kind * len(options.get("kinds", ["SD", "SD_TYPO", "TYPO"])) if rest == "asr" else per_kind
    if metric.startswith("synthetic/answers/"):
        return options["n_answers"]
    if metric == "synthetic/hallucination/false_premise_acceptance":
        return options["n_false_premise"]
    return None


def test_documented_eval_demo_runs_and_its_table_is_the_commands_output(tmp_path, monkeypatch):
    words, table = documented_spread()
    assert words[:2] == ["vlsafe", "seed-spread"], words
    recipes = option_values(words, "--recipes")
    seeds = option_values(words, "--seeds")
    spec_path = option_values(words, "--spec")[0]
    spec = yaml.safe_load((ROOT / spec_path).read_text(encoding="utf-8"))
    documented = table_rows(table)
    assert documented, f"{DOC}: no table after the seed-spread command"

    # the documented numbers: one row per run set, n per run as the spec says, as many runs as seeds
    checked = 0
    for (model, metric), cells in documented.items():
        assert cells[4] == str(len(seeds)), f"{DOC}: {model} {metric}: runs {cells[4]}, documented seeds {seeds}"
        n = expected_n(metric, spec)
        if n is not None:
            assert cells[5] == str(n), f"{DOC}: {model} {metric}: n per run {cells[5]}, but {spec_path} gives {n}"
            checked += 1
    assert checked >= 5, "the n-per-run check must cover the documented VLGuard, MM-SafetyBench and answer rates"

    # the documented command, tiny: same spec, same metrics, recipes of the same names, 2 seeds, 1 sample a suite
    tiny = []
    for recipe in recipes:
        name = Path(recipe).stem
        vlm = CHAINED_VLM.format(previous=tiny[-1].stem) if tiny else TINY_VLM
        tiny.append(tmp_path / "recipes" / f"{name}.yaml")
        tiny[-1].parent.mkdir(exist_ok=True)
        tiny[-1].write_text(TINY_RECIPE.format(name=name, vlm=vlm), encoding="utf-8")
    argv, skip = [], 0
    for i, word in enumerate(words[2:], 2):
        if skip:
            skip -= 1
        elif word == "--recipes":
            argv += ["--recipes", *map(str, tiny)]
            skip = len(recipes)
        elif word == "--seeds":
            argv += ["--seeds", "0", "1"]
            skip = len(seeds)
        elif word == "--spec":
            argv += ["--spec", str(ROOT / spec_path)]
            skip = 1
        elif word == "--out":
            argv += ["--out", str(tmp_path / "out")]
            skip = 1
        else:
            argv.append(word)
    monkeypatch.chdir(tmp_path)  # recipes' and the spec's relative paths (runs/, .cache/) land in tmp_path
    with mock.patch.object(sys, "argv", ["vlsafe"]):
        status = main(["seed-spread", *argv, "--eval-args", "--max-samples 1 --batch-size 4"])
    assert status in (0, None)

    produced = (tmp_path / "out" / "spread.md").read_text(encoding="utf-8").splitlines()
    assert produced[:2] == table[:2], "the docs' table header is not the one `vlsafe seed-spread` writes"
    assert set(table_rows(produced)) == set(documented), \
        "the docs' table rows (model, metric) differ from what the documented command produces"
    for cells in table_rows(produced).values():
        assert cells[4] == "2"  # both seeds answered every documented rate
    # the suites read test sets that were built here (in each seed's folder), in their benchmark's layout, stamped
    built = sorted(p.parent.name.split("-n")[0] for p in tmp_path.glob("out/seed-0/.cache/vlsafe/eval/*/stamp.json"))
    assert built == ["gavie", "mmsafetybench", "vlguard"]


def _metrics(path: Path, values: dict) -> Path:
    import json

    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"metrics": values}), encoding="utf-8")
    return path


def test_seed_spread_reports_mean_sd_range_runs_and_denominators(tmp_path, capsys):
    runs = [_metrics(tmp_path / "s0", {"vlguard/unsafes/asr": 10.0, "vlguard/unsafes/asr_n": 60,
                                       "synthetic/answers/accuracy": 0.6, "synthetic/answers/n": 200, "gavie/n": 5}),
            _metrics(tmp_path / "s1", {"vlguard/unsafes/asr": 20.0, "vlguard/unsafes/asr_n": 60,
                                       "synthetic/answers/accuracy": 0.7, "synthetic/answers/n": 200}),
            _metrics(tmp_path / "s2", {"vlguard/unsafes/asr": None, "vlguard/unsafes/asr_n": 0,
                                       "synthetic/answers/accuracy": 0.8, "synthetic/answers/n": 199})]
    assert main(["seed-spread", "--runs", *map(str, runs), "--label", "sft", "--out", str(tmp_path / "o")]) in (0, None)
    rows = table_rows((tmp_path / "o" / "spread.md").read_text().splitlines())
    assert set(rows) == {("sft", "vlguard/unsafes/asr"), ("sft", "synthetic/answers/accuracy")}  # counts are no rates
    assert rows[("sft", "vlguard/unsafes/asr")][2:] == ["15 ± 7.07", "10–20", "2 of 3", "0–60"]
    assert rows[("sft", "synthetic/answers/accuracy")][2:] == ["0.7 ± 0.1", "0.6–0.8", "3", "199–200"]
    assert "wrote" in capsys.readouterr().out


def test_seed_spread_names_a_folder_without_metrics(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.json"):
        main(["seed-spread", "--runs", str(tmp_path), "--out", str(tmp_path / "o")])
