"""The converters' contract (vlsafe/data/sources/base.py): every source is a checked `DataSource`, found by file."""
from __future__ import annotations

import argparse
import re
import textwrap

import pytest

import vlsafe.data.sources
from vlsafe.data.shards import load_index, read_samples
from vlsafe.data.sources import DataSource, discover_sources
from vlsafe.tools import make_shards

SHIPPED = ["llava", "lrv", "mmsafe-po", "mmsafetybench", "refcoco", "saferlhf", "vlguard"]


def test_every_shipped_converter_is_a_data_source_and_a_make_shards_command(capsys):
    sources = discover_sources()
    assert [source.name for source in sources] == SHIPPED
    assert all(issubclass(source, DataSource) and source.help for source in sources)
    with pytest.raises(SystemExit) as exit_:
        make_shards.main(["--help"])
    assert exit_.value.code == 0
    assert "{" + ",".join(SHIPPED + ["synthetic", "index"]) + "}" in capsys.readouterr().out


class _Complete:
    """The members a complete source defines (mixed into the broken ones below, minus one member each)."""

    name = "broken"
    help = "a source for this test"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json")

    def samples(self, args, errors, stats):
        return iter(())


@pytest.mark.parametrize("drop, named", [("samples", "method samples()"), ("add_arguments", "method add_arguments()"),
                                         ("name", "class attribute 'name'"), ("help", "class attribute 'help'")])
def test_a_source_missing_a_member_fails_at_definition_naming_the_class(drop, named):
    members = {key: value for key, value in vars(_Complete).items() if key != drop and not key.startswith("__")}
    expected = rf"test_sources\.Broken is not a complete DataSource; it needs .*{re.escape(named)}"
    with pytest.raises(TypeError, match=expected):
        type("Broken", (DataSource,), {**members, "__module__": __name__, "__qualname__": "Broken"})


def test_a_name_that_is_no_command_and_a_blank_help_are_refused():
    with pytest.raises(TypeError, match=r"'Mm Safety' must be lower-case letters, digits and '-'"):
        class Spaced(_Complete, DataSource):
            name = "Mm Safety"
    with pytest.raises(TypeError, match=r"Blank is not a complete DataSource; it needs class attribute 'help'"):
        class Blank(_Complete, DataSource):
            help = "  "


def _write_package(root, name: str, files: dict[str, str]) -> None:
    """A package of sources beside vlsafe's (a fresh name per test: Python caches an imported package)."""
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, code in files.items():
        (package / name).write_text(textwrap.dedent(code))


ECHO = """
    from vlsafe.data.schema import Sample
    from vlsafe.data.sources import DataSource


    class TextSource(DataSource, abstract=True):  # a shared base: neither checked nor a command
        @classmethod
        def add_arguments(cls, parser):
            parser.add_argument("--text", nargs="+", required=True)


    class EchoSource(TextSource):
        name = "echo"
        help = "one text-only sample per --text"

        def samples(self, args, errors, stats):
            for i, text in enumerate(args.text):
                stats["echoed"] += 1
                yield Sample(id=f"echo-{i}", messages=[{"role": "user", "content": text},
                                                      {"role": "assistant", "content": "ok"}])
"""


def test_a_new_file_is_a_new_command_without_editing_the_tool(tmp_path, monkeypatch, capsys):
    # `helper.py` imports EchoSource: a class counts only in the module that defines it
    _write_package(tmp_path, "new_sources", {"echo.py": ECHO, "helper.py": "from new_sources.echo import EchoSource\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    found = discover_sources("new_sources")
    assert [(source.__module__, source.__name__) for source in found] == [("new_sources.echo", "EchoSource")]

    monkeypatch.setattr(vlsafe.data.sources, "discover_sources", lambda: discover_sources("new_sources"))
    make_shards.main(["echo", "--text", "hello", "world", "--out", str(tmp_path / "out")])
    assert "echo: echoed=2" in capsys.readouterr().out
    assert [s.messages[0]["content"] for s in read_samples(tmp_path / "out")] == ["hello", "world"]
    assert load_index(tmp_path / "out").total == 2


def test_two_sources_with_one_name_are_refused_naming_both(tmp_path, monkeypatch):
    _write_package(tmp_path, "clashing_sources", {"echo.py": ECHO, "echo_again.py": ECHO})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match=r"clashing_sources\.echo\.EchoSource and clashing_sources\.echo_again\."
                                        r"EchoSource both name their make-shards command 'echo'"):
        discover_sources("clashing_sources")
