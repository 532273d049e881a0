"""Every command the README and docs/ show still exists: its tool, subcommand and each `--flag` it uses.

Each shell line of a fenced block that runs `python tools/X.py`, `vlsafe CMD` or `python -m vlsafe CMD` is mapped
to its `vlsafe` command and asked for `--help` in this process (through `vlsafe.commands.main`, the console
entry point), so a renamed tool, subcommand or flag fails here instead of in a user's shell.
"""
from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from vlsafe.commands import COMMANDS, LIGHTNING_COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line, for the test id and the failure message
    command: str  # the vlsafe command it runs
    args: tuple[str, ...]  # the documented arguments after the command


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, logical line) of every fenced shell block, backslash continuations joined."""
    lines = []
    for block in FENCE.finditer(text):
        if block.group(1) not in SHELL_LANGUAGES:
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        pending, start = "", first
        for offset, line in enumerate(block.group(2).splitlines()):
            if not pending:
                start = first + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            lines.append((start, pending + line))
            pending = ""
    return lines


def parse_command(words: list[str]) -> tuple[str, list[str]] | None:
    """(vlsafe command, its arguments) for a tool invocation; None for any other program."""
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if words[:1] == ["vlsafe"] and len(words) > 1:
        return words[1], words[2:]
    if words[:3] == ["python", "-m", "vlsafe"] and len(words) > 3:
        return words[3], words[4:]
    if words[:1] == ["python"] and len(words) > 1 and words[1].startswith("tools/") and words[1].endswith(".py"):
        tool, args = Path(words[1]).stem, words[2:]
        assert (ROOT / words[1]).is_file(), f"{words[1]} does not exist"
        if tool != "fit":
            return tool.replace("_", "-"), args
        if args and args[0] in LIGHTNING_COMMANDS:
            return args[0], args[1:]
        return "fit", args  # tools/fit.py recipe.yaml ... = fit --config recipe.yaml ...
    return None


def documented_commands() -> list[DocCommand]:
    found = []
    for path in DOC_FILES:
        for number, line in shell_lines(path.read_text(encoding="utf-8")):
            words = shlex.split(line, comments=True)
            segments, current = [], []
            for word in words:
                if word in SEPARATORS:
                    segments.append(current)
                    current = []
                else:
                    current.append(word)
            for segment in [*segments, current]:
                parsed = parse_command(segment) if segment else None
                if parsed:
                    found.append(DocCommand(f"{path.relative_to(ROOT)}:{number}", parsed[0], tuple(parsed[1])))
    return found


@functools.lru_cache(maxsize=None)
def help_text(argv: tuple[str, ...]) -> str:
    """`vlsafe ARGV` (ending in --help) in this process: its output, after checking that it exits 0."""
    out = io.StringIO()  # sys.argv as the console script sees it (Lightning warns about pytest's own arguments)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), mock.patch.object(sys, "argv", ["vlsafe"]):
        try:
            status = main(list(argv))
        except SystemExit as exit_:
            status = exit_.code
    assert status in (0, None), f"`vlsafe {' '.join(argv)}` exited {status}:\n{out.getvalue()[-2000:]}"
    return out.getvalue()


def flags(args: tuple[str, ...]) -> list[str]:
    return [arg.split("=", 1)[0].rstrip("+") for arg in args if arg.startswith("--") and len(arg) > 2]


def listed(flag: str, help_output: str) -> bool:
    """The whole flag appears in the help (`--batch` does not match `--batch-size`)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_output) is not None


def check(doc: DocCommand) -> None:
    if doc.command in ("-h", "--help", "--version"):  # `vlsafe --help` itself
        help_text((doc.command,))
        return
    assert doc.command in COMMANDS, f"{doc.where}: `vlsafe {doc.command}` is not a command"
    for arg in doc.args:
        if re.fullmatch(r"recipes/\S+\.ya?ml", arg):
            assert (ROOT / arg).is_file(), f"{doc.where}: no recipe {arg}"
    if doc.command in LIGHTNING_COMMANDS:
        text = help_text((doc.command, "--help"))
        for flag in flags(doc.args):
            # nested keys (--data.init_args.x, --trainer.strategy.x) belong to classes the recipe picks: check the
            # group; Trainer's own arguments (--trainer.max_steps) are listed one by one
            name = flag if flag.startswith("--trainer.") and flag.count(".") == 1 else flag.split(".")[0]
            assert listed(name, text), f"{doc.where}: {doc.command} has no {name}"
        return
    positionals = []
    for arg in doc.args:  # leading positionals: make-shards' source (llava, mmsafe-po, ...), report's run folder
        if arg.startswith("-"):
            break
        positionals.append(arg)
    text = help_text((doc.command, *positionals, "--help"))
    for flag in flags(doc.args):
        assert listed(flag, text), f"{doc.where}: {doc.command} has no {flag}"


DOCUMENTED = documented_commands()


def test_docs_show_the_tools():
    """The extraction itself works: a parsing slip would otherwise make the test below check nothing."""
    commands = {doc.command for doc in DOCUMENTED}
    assert len(DOCUMENTED) >= 40, DOCUMENTED
    assert {"fit", "validate", "predict", "make-shards", "evaluate", "export", "report", "guard"} <= commands


@pytest.mark.parametrize("doc", DOCUMENTED, ids=[doc.where for doc in DOCUMENTED])
def test_documented_command_exists(doc):
    check(doc)


def test_a_wrong_documented_command_fails(tmp_path):
    for line in ("python tools/make_shards.py llava --jsonn x.json --out o",
                 "python tools/make_shards.py lava --json x.json --out o",
                 "vlsafe fit recipes/demo/sft.yaml --trainerr.max_steps 1",
                 "python tools/evaluate.py --checkpoint c --spec s --out o --batch 4",
                 "vlsafe fit recipes/demo/no_such_recipe.yaml"):
        doc = DocCommand("scratch", *parse_command(shlex.split(line)))
        with pytest.raises(AssertionError):
            check(doc)
    with pytest.raises(AssertionError, match="tools/trainer.py does not exist"):
        parse_command(["python", "tools/trainer.py", "recipes/demo/sft.yaml"])


def test_vlsafe_help_lists_every_command_and_every_tool_script():
    exe = shutil.which("vlsafe")
    assert exe, "no `vlsafe` on PATH: install with pip install -e . (setup.cfg declares the console script)"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    shown = {line.split()[0] for line in proc.stdout.split("commands:\n")[1].split("\n\n")[0].splitlines()}
    assert shown == set(COMMANDS)
    scripts = {path.stem.replace("_", "-") for path in (ROOT / "tools").glob("*.py")}
    assert scripts - {"fit"} <= set(COMMANDS), scripts - set(COMMANDS)


def test_unknown_command_is_a_clear_error(capsys):
    assert main(["evalute", "--spec", "x"]) == 2
    assert "unknown command 'evalute' (did you mean `vlsafe evaluate`?)" in capsys.readouterr().err
    assert main([]) == 2


def test_fit_takes_the_recipe_shorthand(capsys):
    """`vlsafe fit recipe.yaml` resolves the recipe as `python tools/fit.py recipe.yaml` does."""
    with pytest.raises(SystemExit) as exit_, mock.patch.object(sys, "argv", ["vlsafe"]):
        main(["fit", "recipes/demo/sft.yaml", "--print_config"])
    assert exit_.value.code in (0, None)
    config = capsys.readouterr().out
    recipe = (ROOT / "recipes/demo/sft.yaml").read_text()
    model_class = re.search(r"class_path:\s*(\S+)", recipe).group(1)
    assert f"class_path: {model_class}" in config
