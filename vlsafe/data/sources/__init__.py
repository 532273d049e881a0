"""Converters from released dataset formats to `Sample` records, one module per source.

A module becomes a `tools/make_shards.py` sub-command by defining three names (found automatically, so a new
source never edits the tool):

- ``CLI_NAME`` / ``CLI_HELP``: the sub-command and its one-line help;
- ``add_cli_arguments(parser)``: the source's own flags (the writer flags ``--out`` etc. are added for it);
- ``cli_samples(args, errors, stats) -> Iterable[Sample]``: the samples to write. ``errors`` is a list when
  the user chose ``--on-error skip`` (append ``{id, field, error}`` rows and go on) and ``None`` otherwise
  (raise ``SampleError``); ``stats`` is a ``Counter`` printed after the run.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import MutableMapping

from vlsafe.data.schema import SampleError


def skip_or_raise(err: SampleError, where: str, errors: list[dict[str, str]] | None,
                  stats: MutableMapping[str, int] | None = None) -> None:
    """The one bad-record policy of every converter: raise `err` located at `where` (file and row), or, when the
    user chose `--on-error skip` (`errors` is a list), record it there and count it in `stats["skipped"]`."""
    if stats is not None:
        stats["skipped"] += 1
    if errors is None:
        raise SampleError(err.sample_id, err.field_name, err.problem, where) from None
    errors.append({"id": err.sample_id, "field": err.field_name, "error": err.problem})


def cli_sources() -> list[ModuleType]:
    """Every source module that defines a make_shards sub-command, sorted by command name."""
    modules = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    return sorted((m for m in modules if hasattr(m, "CLI_NAME")), key=lambda m: m.CLI_NAME)
