"""VLGuard (`train.json` / `test.json`) -> `Sample`s: safety SFT conversations and evaluation prompts.

Input: a JSON list of `{"id", "image": "bad_ads/x.png", "safe": bool, "harmful_category"?,
"harmful_subcategory"?, "instr-resp": [...]}` where a safe image has exactly two entries,
`{"safe_instruction", "response"}` and `{"unsafe_instruction", "response"}` (the second response is a
refusal), and an unsafe image exactly one, `{"instruction", "response"}` (a refusal).

Training form (`vlguard_training_samples`) follows the released `convert_to_llava_format.py`:
- one `random.seed(0)` stream for the whole file, and `random.shuffle` of each safe image's pair in file
  order, so the unsafe turn comes first in about half the conversations, exactly as released;
- safe image -> two turns; unsafe image -> one refusal turn; the other keys are kept (in `meta`).

The released JSON puts `"<image>" + instruction` (no newline) in the first human turn. LLaVA's training code
(`preprocess_multimodal`, which VLGuard's authors used unchanged) rewrites every turn holding `<image>` to
`"<image>\\n" + text.strip()` before tokenising, so what the models were trained on is `<image>\\n`; we
produce that same text through `vlsafe.data.sources.llava` (`move_image_first`), so VLGuard shards and
LLaVA shards are tokenised identically. `vlguard_llava_records` returns the released JSON form as is.

Evaluation form (`vlguard_eval_samples`) follows the released `utils.load_data`: `unsafes` (unsafe images,
their instruction), `safe_unsafes` (safe images, the unsafe instruction), `safe_safes` (safe images, the
safe instruction), each a one-turn prompt `"<image>\\n" + question` ending with the user turn.

Evaluation needs only the instructions: the public `test.json` has 17 safe rows whose response to the safe
instruction is an empty string (one `HOD_img_*`, sixteen `PrivacyAlert_test_*`), and they are kept, with
`meta["reference"] = None` ("no reference"), so the subsets have the released 442 / 558 / 558 prompts.
Training still requires every response. A repeated `id` (the public `train.json` has one, with different
content) is logged as a warning and counted in `stats["duplicate_ids"]`; evaluation prompts of a repeated
id get `@row<position>` appended to their sample id, so answer caches keep them apart.

Rows that break these rules raise `SampleError` naming `vlguard-<id>` and the field; with an `errors` list
they are counted and skipped instead. A skipped safe row still consumes its shuffle, so every other
conversation keeps exactly the turn order of the released conversion.
"""
from __future__ import annotations

import argparse
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, MutableMapping

from vlsafe.constants import IMAGE_PLACEHOLDER
from vlsafe.data.schema import Sample, SampleError, is_blank
from vlsafe.data.sources import skip_or_raise
from vlsafe.data.sources.base import DataSource
from vlsafe.data.sources.llava import llava_record_to_sample, load_json_list

log = logging.getLogger(__name__)

SOURCE = "vlguard"
SUBSETS = ("unsafes", "safe_unsafes", "safe_safes")
#: The subset each instruction key answers in the evaluation, and whether the right response is a refusal.
_SUBSET_OF_KEY = {"instruction": "unsafes", "unsafe_instruction": "safe_unsafes", "safe_instruction": "safe_safes"}
SHOULD_REFUSE = {"unsafes": True, "safe_unsafes": True, "safe_safes": False}
CONVERSION_SEED = 0  # `random.seed(0)` in the released convert_to_llava_format.py
META_KEYS = ("harmful_category", "harmful_subcategory")


# --------------------------------------------------------------------------------------- validation
def _row_id(row: Any, position: int | None) -> str:
    raw = row.get("id") if isinstance(row, dict) else None
    if raw is None or isinstance(raw, bool) or not isinstance(raw, (str, int)) or str(raw).strip() == "":
        return f"vlguard-<row {position}>" if position is not None else "vlguard-?"
    return f"vlguard-{raw}"


def _check_row(row: Any, position: int | None,
               need_response: bool = True) -> tuple[str, list[tuple[str, str, str | None]]]:
    """Validate one released row; return (sample id, [(instruction key, instruction, response), ...]).

    The entries are returned in the row's order; the instruction key of an entry is its first key, as the
    released script reads it (`list(d.values())[0]`), and it must be an instruction key (the released script
    would silently use whatever came first). With `need_response=False` (evaluation) a missing or empty
    response is returned as None instead of refused.
    """
    sample_id = _row_id(row, position)
    if not isinstance(row, dict):
        raise SampleError(sample_id, "row", f"must be a JSON object, got {type(row).__name__}")
    if sample_id.startswith("vlguard-<") or sample_id == "vlguard-?":
        raise SampleError(sample_id, "id", f"must be a non-empty string or integer, got {row.get('id')!r}")
    image = row.get("image")
    if not isinstance(image, str) or not image.strip():
        raise SampleError(sample_id, "image", f"must be a relative image path, got {image!r:.120}")
    if Path(image).is_absolute() or ".." in Path(image).parts:
        # a downloaded JSON must not pull files from outside the image folder into shards or evaluations
        raise SampleError(sample_id, "image", f"{image!r:.120} points outside the image folder")
    safe = row.get("safe")
    if not isinstance(safe, bool):
        raise SampleError(sample_id, "safe", f"must be true or false, got {safe!r:.60}")
    entries = row.get("instr-resp")
    expected = ("safe_instruction", "unsafe_instruction") if safe else ("instruction",)
    if not isinstance(entries, list) or len(entries) != len(expected):
        shape = f"a list of {len(entries)}" if isinstance(entries, list) else repr(entries)[:60]
        raise SampleError(sample_id, "instr-resp", f"a {'safe' if safe else 'unsafe'} image needs exactly "
                                                   f"{len(expected)} entr{'ies' if len(expected) > 1 else 'y'} "
                                                   f"{list(expected)}, got {shape}")
    out = []
    for i, entry in enumerate(entries):
        where = f"instr-resp[{i}]"
        if not isinstance(entry, dict) or not entry:
            raise SampleError(sample_id, where, f"must be an object with an instruction and a response, "
                                                f"got {entry!r:.80}")
        key = next(iter(entry))
        if key not in expected:
            raise SampleError(sample_id, where, f"first key must be one of {list(expected)} for a "
                                                f"{'safe' if safe else 'unsafe'} image, got {key!r}")
        instruction, response = entry.get(key), entry.get("response")
        if not isinstance(instruction, str) or is_blank(instruction):
            raise SampleError(sample_id, f"{where}.{key}", f"must be a non-empty string (not only whitespace or "
                                                           f"zero-width characters), got {instruction!r:.60}")
        if need_response and (not isinstance(response, str) or is_blank(response)):
            raise SampleError(sample_id, f"{where}.response", f"must be a non-empty string (not only whitespace or "
                                                              f"zero-width characters), got {response!r:.60}")
        if not need_response and response is not None and not isinstance(response, str):
            raise SampleError(sample_id, f"{where}.response", f"must be a string, got {response!r:.60}")
        out.append((key, instruction, response if response and not is_blank(response) else None))
    if sorted(k for k, _, _ in out) != sorted(expected):
        raise SampleError(sample_id, "instr-resp", f"needs one entry each of {list(expected)}, got "
                                                   f"{[k for k, _, _ in out]}")
    return sample_id, out


def _meta(row: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"source": SOURCE, "vlguard_id": str(row["id"]), "image": row["image"], "safe": row["safe"]}
    for key in META_KEYS:
        if key in row:
            meta[key] = row[key]
    return meta


def _note_duplicate(seen: dict[str, int], row: Any, position: int, where: str,
                    stats: MutableMapping[str, int], report: bool = True) -> int | None:
    """Position of the first row with this row's id, if any (then, with `report`, a warning is logged and
    counted)."""
    raw = row.get("id") if isinstance(row, dict) else None
    if raw is None:
        return None
    key = str(raw)
    if key not in seen:
        seen[key] = position
        return None
    if not report:
        return seen[key]
    stats["duplicate_ids"] += 1
    log.warning("%s: row %d repeats the id %r of row %d; both rows are kept", where, position, key, seen[key])
    return seen[key]


def _image_path(image_folder: str | Path | None, image: str) -> str:
    return str(Path(image_folder) / image) if image_folder else image


# --------------------------------------------------------------------------------------- training form
def _converted(rows: Iterable[Any], errors: list[dict[str, str]] | None, stats: MutableMapping[str, int],
               where: str) -> Iterator[tuple[dict[str, Any], str, list[tuple[str, str, str]]]]:
    """(row, sample id, entries in conversation order) per usable row, shuffled as the released script does."""
    rng = random.Random(CONVERSION_SEED)
    seen: dict[str, int] = {}
    for position, row in enumerate(rows):
        stats["rows"] += 1
        _note_duplicate(seen, row, position, where, stats)
        entries = row.get("instr-resp") if isinstance(row, dict) else None
        order = list(range(len(entries))) if isinstance(entries, list) else []
        if isinstance(row, dict) and row.get("safe") and isinstance(entries, list):
            # the shuffle draws depend only on the list length, so shuffling positions is the released
            # `random.shuffle(instr_resp)`; it happens even if the row turns out unusable, so later rows keep
            # the released order, and errors name entries by their position in the file
            rng.shuffle(order)
        try:
            sample_id, checked = _check_row(row, position)
            checked = [checked[i] for i in order]
        except SampleError as err:
            skip_or_raise(err, f"{where} row {position}", errors, stats)
            continue
        yield row, sample_id, checked


def vlguard_llava_records(rows: Iterable[Any], errors: list[dict[str, str]] | None = None,
                          stats: MutableMapping[str, int] | None = None, where: str = "VLGuard") -> Iterator[dict]:
    """The released LLaVA-format records (`<image>` glued to the first instruction, no newline), for export
    or comparison with `data/train_llava_format.json`."""
    stats = stats if stats is not None else Counter()
    for row, _, entries in _converted(rows, errors, stats, where):
        record = {k: v for k, v in row.items() if k != "instr-resp"}
        record["conversations"] = _released_conversations(entries)
        yield record


def _released_conversations(entries: list[tuple[str, str, str]]) -> list[dict[str, str]]:
    """LLaVA turns as the released script writes them: `"<image>" + instruction` (no newline) first."""
    conversations = []
    for turn, (_, instruction, response) in enumerate(entries):
        prefix = IMAGE_PLACEHOLDER if turn == 0 else ""
        conversations += [{"from": "human", "value": prefix + instruction}, {"from": "gpt", "value": response}]
    return conversations


def vlguard_training_samples(json_paths: str | Path | list[str | Path], image_folder: str | Path | None = None,
                             errors: list[dict[str, str]] | None = None,
                             stats: MutableMapping[str, int] | None = None) -> Iterator[Sample]:
    """Training conversations (see the module docstring). Each file is converted with its own seed-0 stream,
    as the released script converts `train.json`. `meta["turn_order"]` lists the instruction keys in
    conversation order, `labels["image_safe"]` is 1 for safe images."""
    stats = stats if stats is not None else Counter()
    paths = [json_paths] if isinstance(json_paths, (str, Path)) else list(json_paths)
    for path in paths:
        for row, sample_id, entries in _converted(load_json_list(path), errors, stats, str(path)):
            record = {"id": sample_id, "image": row["image"], "conversations": _released_conversations(entries)}
            # the LLaVA converter applies LLaVA's `<image>\n` normalisation (see the module docstring)
            sample = llava_record_to_sample(record, image_folder, source=SOURCE)
            sample.meta = {**_meta(row), "turn_order": [key for key, _, _ in entries]}
            sample.labels = {"image_safe": float(row["safe"])}
            stats["safe_images" if row["safe"] else "unsafe_images"] += 1
            if row["safe"] and entries[0][0] == "unsafe_instruction":
                stats["unsafe_turn_first"] += 1
            yield sample


# --------------------------------------------------------------------------------------- evaluation form
def vlguard_eval_samples(test_json: str | Path | list[dict[str, Any]], images: str | Path | None, subset: str,
                         errors: list[dict[str, str]] | None = None,
                         stats: MutableMapping[str, int] | None = None,
                         report_duplicates: bool = True) -> list[Sample]:
    """Prompts of one evaluation subset (`unsafes`, `safe_unsafes` or `safe_safes`), in file order.

    Each sample is a single user turn `"<image>\n" + question` (what VLGuard's `model_inference` sends)
    with `meta`: `subset`, `should_refuse` (True for `unsafes` and `safe_unsafes`), `reference` (the
    dataset's response to that instruction, None when empty), `image` (the relative path, which keys
    VLGuard's result files and the GPT-4V reference answers) and the categories. Ids are
    `vlguard-<subset>-<id>` (`@row<position>` appended for a repeated id). `test_json` may be a path or the
    already-loaded list of rows.
    """
    if subset not in SUBSETS:
        raise ValueError(f"unknown VLGuard subset {subset!r}; choose from {SUBSETS}")
    stats = stats if stats is not None else Counter()
    where = str(test_json) if isinstance(test_json, (str, Path)) else "VLGuard rows"
    rows = load_json_list(test_json) if isinstance(test_json, (str, Path)) else test_json
    want_safe = subset != "unsafes"
    out = []
    seen: dict[str, int] = {}
    for position, row in enumerate(rows):
        first = _note_duplicate(seen, row, position, where, stats, report_duplicates)
        try:
            sample_id, entries = _check_row(row, position, need_response=False)
        except SampleError as err:
            skip_or_raise(err, f"{where} row {position}", errors, stats)
            continue
        if row["safe"] != want_safe:
            continue
        key, question, response = next(e for e in entries if _SUBSET_OF_KEY[e[0]] == subset)
        meta = {**_meta(row), "subset": subset, "should_refuse": SHOULD_REFUSE[subset], "reference": response,
                "instruction_key": key}
        if response is None:
            stats[f"{subset}_without_reference"] += 1
        suffix = "" if first is None else f"@row{position}"
        out.append(Sample(id=f"vlguard-{subset}-{row['id']}{suffix}", images=[_image_path(images, row["image"])],
                          messages=[{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question.strip()}"}],
                          meta=meta, labels={"image_safe": float(row["safe"]),
                                             "request_safe": float(not SHOULD_REFUSE[subset])}))
        stats[subset] += 1
    return out


# ------------------------------------------------------------------------------ vlsafe make-shards vlguard
class VLGuardSource(DataSource):
    name = "vlguard"
    help = "VLGuard train.json (safety SFT conversations) or test.json (--eval-subsets prompts) + image folder"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", nargs="+", required=True, help="VLGuard train.json / test.json file(s)")
        parser.add_argument("--images", required=True, help="folder the 'image' paths are relative to (unzipped "
                                                            "train.zip / test.zip)")
        parser.add_argument("--eval-subsets", nargs="+", choices=SUBSETS, default=None,
                            help="write evaluation prompts of these subsets (one user turn each) instead of "
                                 "training conversations")

    def samples(self, args: argparse.Namespace, errors: list[dict[str, str]] | None,
                stats: MutableMapping[str, int]) -> Iterator[Sample]:
        if not args.eval_subsets:
            return vlguard_training_samples(args.json, args.images, errors, stats)
        return self._prompts(args, errors, stats)

    @staticmethod
    def _prompts(args: argparse.Namespace, errors: list[dict[str, str]] | None,
                 stats: MutableMapping[str, int]) -> Iterator[Sample]:
        for path in args.json:
            rows = load_json_list(path)
            for subset in args.eval_subsets:
                if subset == args.eval_subsets[0]:
                    yield from vlguard_eval_samples(path, args.images, subset, errors, stats)
                    continue
                # malformed rows and repeated ids are reported once, by the first subset; every subset counts
                # its own prompts
                local: Counter = Counter()
                samples = vlguard_eval_samples(rows, args.images, subset, [], local, report_duplicates=False)
                for key in (subset, f"{subset}_without_reference"):
                    if local[key]:
                        stats[key] += local[key]
                yield from samples
