"""PKU-SafeRLHF pairs and harmful_vs_unharmful-style single labelled responses -> text-only `Sample`s.

These are the harm detector's and the detoxifier's training data (MLLM-Protector). Label semantics:
**1 = safe**.

- **Pairs** (PKU-SafeRLHF rows: `prompt, response_0, response_1, safer_response_id, is_response_0_safe,
  is_response_1_safe`) become `Sample(messages=[user prompt], chosen=<safer response>, rejected=<other>,
  labels={"chosen_safe", "rejected_safe"})` — exactly the shape of the synthetic world's `harm_text`.
  If the row has PKU's `response_{i}_harm_category` dicts, `meta.category` is the first harm category
  flagged for the less safe response (else "none"). Prompt and responses are kept byte for byte (the
  released scripts use them unstripped; `vlsafe.methods.protector.presets` decides whether to strip).
- **Single responses** (`--format single`): a question, a response and a label become
  `Sample(messages=[user question, assistant response], labels={"safe": 0|1})`. The released
  harmful_vs_unharmful file's schema could not be read, so field names are options with common defaults
  (question: `question|prompt|instruction|query`; response: `response|answer|output`; label:
  `is_safe|safe` meaning safe, or `is_harmful|harmful|is_unsafe|unsafe` meaning harmful, flipped to
  1 = safe). A plain `label` field is accepted only with `--label-means safe|harmful`.

Input: a JSON list or JSON Lines file (`.jsonl`). Unusable rows raise `SampleError` naming the file, row and
field, or are counted and skipped with `--on-error skip`.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, MutableMapping

from vlsafe.data.schema import Sample, SampleError, is_blank
from vlsafe.data.sources import skip_or_raise
from vlsafe.data.sources.base import DataSource
from vlsafe.data.sources.llava import load_json_list

SOURCE = "pku_saferlhf"
QUESTION_FIELDS = ("question", "prompt", "instruction", "query")
RESPONSE_FIELDS = ("response", "answer", "output")
SAFE_LABEL_FIELDS = ("is_safe", "safe")
HARMFUL_LABEL_FIELDS = ("is_harmful", "harmful", "is_unsafe", "unsafe")


def _text(record: dict[str, Any], key: str, sample_id: str, strip: bool = True) -> str:
    value = record.get(key)
    if not isinstance(value, str) or is_blank(value):
        raise SampleError(sample_id, key, "is missing" if value is None else
                          f"must be a non-empty string (not only whitespace or zero-width characters), "
                          f"got {value!r:.80}")
    return value.strip() if strip else value


def _flag(value: Any, sample_id: str, key: str) -> float:
    """A boolean label given as true/false, 0/1 or "true"/"false"/"0"/"1"."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "0", "1"):
        return float(value.strip().lower() in ("true", "1"))
    raise SampleError(sample_id, key, "is missing" if value is None else f"must be true/false or 0/1, got {value!r}")


def _row_id(record: dict[str, Any], prefix: str, position: int) -> str:
    raw = record.get("id")
    return f"{prefix}-{raw}" if isinstance(raw, (int, str)) and not isinstance(raw, bool) and str(raw).strip() \
        else f"{prefix}-{position}"


def _harm_category(record: dict[str, Any], index: int) -> str | None:
    categories = record.get(f"response_{index}_harm_category")
    if isinstance(categories, dict):
        flagged = [name for name, on in categories.items() if on is True]
        return flagged[0] if flagged else None
    return None


def pair_record_to_sample(record: Any, position: int, prefix: str = "saferlhf",
                          stats: MutableMapping[str, int] | None = None) -> Sample:
    """One PKU-SafeRLHF row -> a labelled pair (chosen = the safer response)."""
    stats = stats if stats is not None else Counter()
    if not isinstance(record, dict):
        raise SampleError(f"{prefix}-{position}", "row", f"must be a JSON object, got {type(record).__name__}")
    sample_id = _row_id(record, prefix, position)
    # kept exactly as stored: the released scripts concatenate them as they are; the vlsafe preset strips
    prompt = _text(record, "prompt", sample_id, strip=False)
    responses = [_text(record, f"response_{i}", sample_id, strip=False) for i in (0, 1)]
    safe = [_flag(record.get(f"is_response_{i}_safe"), sample_id, f"is_response_{i}_safe") for i in (0, 1)]
    safer = record.get("safer_response_id")
    if isinstance(safer, str) and safer.strip() in ("0", "1"):
        safer = int(safer)
    if isinstance(safer, bool) or safer not in (0, 1):
        raise SampleError(sample_id, "safer_response_id", "is missing" if safer is None else
                          f"must be 0 or 1, got {safer!r}")
    other = 1 - safer
    if safe[safer] < safe[other]:
        stats["safer_marked_unsafe_other_safe"] += 1  # kept as released: the ranking and the labels disagree
    if responses[0] == responses[1]:
        stats["identical_responses"] += 1
    category = _harm_category(record, other) or _harm_category(record, safer) or "none"
    stats["pairs"] += 1
    stats[f"pairs_{'both_safe' if min(safe) else 'both_unsafe' if not max(safe) else 'one_safe'}"] += 1
    return Sample(id=sample_id, messages=[{"role": "user", "content": prompt}], chosen=responses[safer],
                  rejected=responses[other], labels={"chosen_safe": safe[safer], "rejected_safe": safe[other]},
                  meta={"source": SOURCE, "category": category, "safer_response_id": safer})


def _pick(record: dict[str, Any], wanted: str | None, candidates: tuple[str, ...], sample_id: str, what: str) -> str:
    if wanted:
        return wanted
    for key in candidates:
        if key in record:
            return key
    raise SampleError(sample_id, what, f"not found; expected one of {list(candidates)} (or name it with "
                                       f"--{what}-field)")


def single_record_to_sample(record: Any, position: int, prefix: str = "harmqa", question_field: str | None = None,
                            response_field: str | None = None, label_field: str | None = None,
                            label_means: str | None = None, stats: MutableMapping[str, int] | None = None) -> Sample:
    """One labelled (question, response) row -> `Sample(messages=[user, assistant], labels={"safe"})`."""
    stats = stats if stats is not None else Counter()
    if not isinstance(record, dict):
        raise SampleError(f"{prefix}-{position}", "row", f"must be a JSON object, got {type(record).__name__}")
    sample_id = _row_id(record, prefix, position)
    question = _text(record, _pick(record, question_field, QUESTION_FIELDS, sample_id, "question"), sample_id)
    response = _text(record, _pick(record, response_field, RESPONSE_FIELDS, sample_id, "response"), sample_id)
    if label_field:
        key, means = label_field, label_means
        if means not in ("safe", "harmful"):
            means = "safe" if key in SAFE_LABEL_FIELDS else "harmful" if key in HARMFUL_LABEL_FIELDS else None
        if means is None:
            raise SampleError(sample_id, key, "its meaning is unknown: pass --label-means safe|harmful")
    else:
        key = next((k for k in SAFE_LABEL_FIELDS + HARMFUL_LABEL_FIELDS if k in record), None)
        if key is None:
            if "label" in record and label_means in ("safe", "harmful"):
                key = "label"
            else:
                raise SampleError(sample_id, "label", f"not found; expected one of "
                                                      f"{list(SAFE_LABEL_FIELDS + HARMFUL_LABEL_FIELDS)} (or "
                                                      f"--label-field with --label-means)")
        means = label_means if key == "label" else ("safe" if key in SAFE_LABEL_FIELDS else "harmful")
    value = _flag(record.get(key), sample_id, key)
    safe = value if means == "safe" else 1.0 - value
    stats["singles_safe" if safe else "singles_unsafe"] += 1
    category = record.get("category")
    return Sample(id=sample_id, messages=[{"role": "user", "content": question},
                                          {"role": "assistant", "content": response}],
                  labels={"safe": safe}, meta={"source": "harmful_vs_unharmful",
                                               "category": category if isinstance(category, str) else "none"})


def read_saferlhf(paths: str | Path | Iterable[str | Path], form: str = "auto", prefix: str | None = None,
                  errors: list[dict[str, str]] | None = None, stats: MutableMapping[str, int] | None = None,
                  **single_options: Any) -> Iterator[Sample]:
    """Yield samples from JSON/JSONL files. `form`: "pairs", "single" or "auto" (a row with `response_0` is a
    pair). With `errors` given, unusable rows are appended as `{id, field, error}` and skipped."""
    if form not in ("auto", "pairs", "single"):
        raise ValueError(f"form must be auto, pairs or single, got {form!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    stats = stats if stats is not None else Counter()
    for path in paths:
        for position, record in enumerate(load_json_list(path)):
            stats["rows"] += 1
            is_pair = form == "pairs" or (form == "auto" and isinstance(record, dict) and "response_0" in record)
            try:
                if is_pair:
                    sample = pair_record_to_sample(record, position, prefix or "saferlhf", stats)
                else:
                    sample = single_record_to_sample(record, position, prefix or "harmqa", stats=stats,
                                                     **single_options)
            except SampleError as err:
                skip_or_raise(err, f"{path} row {position}", errors, stats)
                continue
            yield sample


# ------------------------------------------------------------------------------ vlsafe make-shards saferlhf
class SafeRLHFSource(DataSource):
    name = "saferlhf"
    help = "PKU-SafeRLHF pairs / harmful_vs_unharmful single responses (JSON or JSONL), text only"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", nargs="+", required=True, help="JSON list or JSON Lines file(s), in order")
        parser.add_argument("--format", dest="form", choices=["auto", "pairs", "single"], default="auto",
                            help="pairs (PKU-SafeRLHF), single (labelled responses) or auto per row (default)")
        parser.add_argument("--id-prefix", default=None, help="sample id prefix (default saferlhf / harmqa)")
        parser.add_argument("--question-field", default=None, help="single form: the question's field name")
        parser.add_argument("--response-field", default=None, help="single form: the response's field name")
        parser.add_argument("--label-field", default=None, help="single form: the label's field name")
        parser.add_argument("--label-means", choices=["safe", "harmful"], default=None,
                            help="single form: whether label 1/true means safe or harmful")

    def samples(self, args: argparse.Namespace, errors: list[dict[str, str]] | None,
                stats: MutableMapping[str, int]) -> Iterator[Sample]:
        return read_saferlhf(args.json, args.form, args.id_prefix, errors, stats,
                             question_field=args.question_field, response_field=args.response_field,
                             label_field=args.label_field, label_means=args.label_means)
