"""The layer contract (`.importlinter`, run by `.ci/run`): holds on the package, and fails on a bad import."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                                     "sys.exit(lint_imports_command())", "--config", str(ROOT / ".importlinter")]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers():
    result = _lint(ROOT, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, bad_import, message", [
    ("data/schema.py", "from vlsafe.methods import sft", "vlsafe.data is not allowed to import vlsafe.methods"),
    ("core/vlm.py", "import vlsafe.data.shards", "vlsafe.core is not allowed to import vlsafe.data"),
])
def test_a_deliberate_upward_import_breaks_the_contract(tmp_path, module, bad_import, message):
    copy = tmp_path / "vlsafe"
    shutil.copytree(ROOT / "vlsafe", copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + f"\n\ndef _deliberately_bad():\n    {bad_import}\n")
    result = _lint(tmp_path, tmp_path)
    assert result.returncode != 0
    assert message in result.stdout, result.stdout
    assert f"vlsafe.{module[:-3].replace('/', '.')} ->" in result.stdout


def _cycles(package: str) -> list[list[str]]:
    """Strongly connected groups of modules (Tarjan) in the import graph grimp builds, function-local imports
    included."""
    import grimp

    graph = grimp.build_graph(package)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in edges[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles_in_the_package():
    assert _cycles("vlsafe") == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from cyclic import b\n")
    (package / "b.py").write_text("from cyclic import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _cycles("cyclic") == [["cyclic.a", "cyclic.b"]]
