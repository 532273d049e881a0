"""The contract every converter in `vlsafe/data/sources/` fulfils, and how `vlsafe make-shards` finds them.

A converter is a `DataSource` subclass defined in a module of this package: the module is found by scanning the
package and the class by its type, so a new file here is a new `make-shards` sub-command and the tool is never
edited. The contract is checked when the class is defined: a source without its name, help or one of the
methods fails at import with a `TypeError` naming the class, not later with an `AttributeError` mid-run.
"""
from __future__ import annotations

import abc
import argparse
import importlib
import pkgutil
import re
from typing import ClassVar, Iterator, MutableMapping

from vlsafe.data.schema import Sample

#: What a sub-command name may look like (`mmsafe-po`, `refcoco`).
COMMAND_NAME = re.compile(r"[a-z][a-z0-9-]*\Z")


class DataSource(abc.ABC):
    """One public dataset format that `vlsafe make-shards <name>` turns into `Sample`s.

    Subclasses set `name` (the sub-command) and `help` (its one-line help), add their own flags in
    `add_arguments` (the writer flags `--out`, `--on-error`, `--presize`, ... are added by the tool) and yield
    the samples in `samples`. The reading itself stays in plain functions (`read_llava_json`, ...) that the
    class calls, so code and tests that read a format never need an argparse namespace.

    A shared intermediate base that is not itself a sub-command is declared with
    `class JsonSource(DataSource, abstract=True)`: it is neither checked nor listed.
    """

    name: ClassVar[str]
    help: ClassVar[str]
    _abstract_source: ClassVar[bool] = True

    def __init_subclass__(cls, abstract: bool = False, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._abstract_source = abstract
        if abstract:
            return
        problems = []
        for attribute in ("name", "help"):
            value = getattr(cls, attribute, None)
            if not isinstance(value, str) or not value.strip():
                problems.append(f"class attribute {attribute!r} (a non-empty string)")
        if isinstance(getattr(cls, "name", None), str) and getattr(cls, "name").strip() \
                and not COMMAND_NAME.match(cls.name):
            problems.append(f"a command-line name: {cls.name!r} must be lower-case letters, digits and '-'")
        # abc only refuses an abstract class when it is instantiated; check now, at import, instead
        abstract_names = set().union(*(getattr(base, "__abstractmethods__", ()) for base in cls.__mro__[1:]))
        problems += [f"method {method}()" for method in sorted(abstract_names)
                     if getattr(getattr(cls, method, None), "__isabstractmethod__", False)]
        if problems:
            raise TypeError(f"{cls.__module__}.{cls.__qualname__} is not a complete DataSource; it needs "
                            f"{'; '.join(problems)} (see vlsafe/data/sources/base.py)")

    @classmethod
    @abc.abstractmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this source's own flags to its sub-command's parser."""

    @abc.abstractmethod
    def samples(self, args: argparse.Namespace, errors: list[dict[str, str]] | None,
                stats: MutableMapping[str, int]) -> Iterator[Sample]:
        """The samples to write, from the parsed flags.

        `errors` is a list when the user chose `--on-error skip` (append `{id, field, error}` rows, e.g. with
        `skip_or_raise`, and go on) and None otherwise (raise `SampleError`); `stats` is a `Counter` printed
        after the run. A `ValueError` or `OSError` (bad flag combination, unreadable file) ends the run with
        its message.
        """


def discover_sources(package: str = "vlsafe.data.sources") -> list[type[DataSource]]:
    """Every concrete `DataSource` defined in a module of `package`, sorted by name.

    A class is counted in the module that defines it (not where it is imported), so helpers may share
    classes; two sources with the same name raise `TypeError` naming both.
    """
    found: dict[str, type[DataSource]] = {}
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        for obj in vars(module).values():
            if not (isinstance(obj, type) and issubclass(obj, DataSource) and obj.__module__ == module.__name__
                    and not obj._abstract_source):
                continue
            if obj.name in found:
                first = found[obj.name]
                raise TypeError(f"{first.__module__}.{first.__qualname__} and {obj.__module__}.{obj.__qualname__} "
                                f"both name their make-shards command {obj.name!r}")
            found[obj.name] = obj
    return [found[name] for name in sorted(found)]
