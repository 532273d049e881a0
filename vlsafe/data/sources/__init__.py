"""Converters from released dataset formats to `Sample` records, one file per source.

Each converter is a `DataSource` subclass (`base.py`: class attributes `name` and `help`, methods
`add_arguments(parser)` and `samples(args, errors, stats)`); `vlsafe make-shards` finds every one defined in this
package (`discover_sources`), so a new file here is a new sub-command and the tool is never edited. The format's
reader stays a plain function (`read_llava_json`, `read_lrv`, ...) for code and tests that need no command line.

This module holds what every converter shares: `skip_or_raise`, the one bad-record policy, and `warn_long_texts`,
through which the tool passes every converter's samples, so a text field over the processor's `max_text_chars`
is reported at conversion time with its sample id, not first by a training run.
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, MutableMapping

from vlsafe.data.schema import Sample, SampleError, default_max_text_chars
from vlsafe.data.sources.base import DataSource, discover_sources

__all__ = ["DataSource", "discover_sources", "skip_or_raise", "warn_long_texts"]

log = logging.getLogger(__name__)
#: Long-text warnings logged one by one before only the count goes on (in `stats["long_text"]`).
MAX_LONG_TEXT_WARNINGS = 10


def skip_or_raise(err: SampleError, where: str, errors: list[dict[str, str]] | None,
                  stats: MutableMapping[str, int] | None = None) -> None:
    """The one bad-record policy of every converter: raise `err` located at `where` (file and row), or, when the
    user chose `--on-error skip` (`errors` is a list), record it there and count it in `stats["skipped"]`."""
    if stats is not None:
        stats["skipped"] += 1
    if errors is None:
        raise SampleError(err.sample_id, err.field_name, err.problem, where) from None
    errors.append({"id": err.sample_id, "field": err.field_name, "error": err.problem})


def warn_long_texts(samples: Iterable[Sample], stats: MutableMapping[str, int] | None = None,
                    limit: int | None = None) -> Iterator[Sample]:
    """Pass `samples` through, warning about each one with a text longer than `limit` characters (default: the
    processor's `max_text_chars`, env `VLSAFE_MAX_TEXT_CHARS`): it converts, but training and evaluation will
    refuse it as a `SampleError`, so the user hears of it now, with the sample id, field and length."""
    limit = default_max_text_chars() if limit is None else limit
    for sample in samples:
        long_fields = [(name, len(text)) for name, text in sample.text_fields() if len(text) > limit]
        if long_fields:
            count = stats["long_text"] + 1 if stats is not None else 1
            if stats is not None:
                stats["long_text"] = count
            if count <= MAX_LONG_TEXT_WARNINGS:
                fields = ", ".join(f"{name!r} ({length:,} characters)" for name, length in long_fields)
                log.warning("sample %r: %s over max_text_chars=%s; it is written, but training and evaluation "
                            "will refuse it unless the cap is raised (VLSAFE_MAX_TEXT_CHARS)%s", sample.id, fields,
                            f"{limit:,}", "; further long samples are only counted (long_text)"
                            if count == MAX_LONG_TEXT_WARNINGS else "")
        yield sample

