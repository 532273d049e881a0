"""MMSafe-PO (Blind Preference Optimization) JSON -> preference `Sample`s.

Input: a JSON list (or JSON Lines) of `{"id": int, "question", "image", "chosen", "rejected", "type",
"entity", "entity_type", "replacement", "text_prompt", "mid_prompt"}` as released with the BPO code, and
optionally the keyword index (`{"train": "path/to/train.json", ...}`) the trainer's `--config_train_path`
points at.

The released strings are already rendered with the Vicuna template (`"USER: <image>\\nQ ASSISTANT:"`,
responses prefixed with `"ASSISTANT: "`), and a question that went through a chat template a second
time carries two `<image>` placeholders and doubled role tags. This module turns them back into plain
messages with exactly one `<image>` for the one image, so the chat template is applied once, by us.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, MutableMapping

from vlsafe.constants import IMAGE_PLACEHOLDER
from vlsafe.data.encoding.templates import LLAVA_SYSTEM, VICUNA_SYSTEM
from vlsafe.data.schema import Sample, SampleError, is_blank
from vlsafe.data.sources import skip_or_raise
from vlsafe.data.sources.base import DataSource
from vlsafe.data.sources.llava import load_json_list

log = logging.getLogger(__name__)

SOURCE = "mmsafe_po"
META_FIELDS = ("type", "entity", "entity_type", "replacement", "text_prompt", "mid_prompt")
# System prompts the rendered strings may start with; the chat template adds its own, so these are dropped.
DEFAULT_SYSTEM_PROMPTS = (VICUNA_SYSTEM, LLAVA_SYSTEM)
TURN_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# A role tag: USER:/ASSISTANT: in any case, at the start of the text or after whitespace or a '>' (as in
# "...</s>USER:"). Which of the candidates count as tags is decided in `_role_tags`.
_TAG = re.compile(r"(?<![^\s>])(user|assistant)[ \t]*:", re.IGNORECASE)
_SPECIAL = re.compile(r"</s>|<s>")
_PLACEHOLDER_RUN = re.compile(re.escape(IMAGE_PLACEHOLDER) + r"(?:\s*" + re.escape(IMAGE_PLACEHOLDER) + ")+")
_RESPONSE_PREFIX = re.compile(r"^(?:\s*assistant[ \t]*:)+", re.IGNORECASE)


# --------------------------------------------------------------------------------------- questions
def _case_style(word: str) -> str:
    return "upper" if word.isupper() else "lower" if word.islower() else "title" if word.istitle() else "mixed"


def _role_tags(text: str) -> list[re.Match]:
    """Role tags in `text`: upper-case ones always, others only in the case style of the first tag.

    With the released (upper-case) data this keeps a lower-case "assistant:" inside a sentence from
    splitting the turn, while still reading texts written with "user:"/"User:" tags throughout.
    """
    candidates = list(_TAG.finditer(text))
    if not candidates:
        return []
    style = _case_style(candidates[0].group(1))
    return [m for m in candidates if _case_style(m.group(1)) in (style, "upper")]


def _without_placeholders(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


def _parse(text: str) -> tuple[list[dict[str, str]], Counter]:
    """`parse_templated_question` plus counts of what was normalised (for the converter's stats)."""
    notes: Counter = Counter()
    if not isinstance(text, str):
        raise ValueError(f"must be a string, got {type(text).__name__}")
    if is_blank(text):
        raise ValueError("is empty")
    tags = _role_tags(text)
    prefix = text[:tags[0].start()].strip() if tags else text.strip()
    ends_with_prompt = (bool(tags) and tags[-1].group(1).lower() == "assistant"
                        and not _SPECIAL.sub("", text[tags[-1].end():]).strip())
    templated = bool(tags) and (not prefix or ends_with_prompt or prefix in DEFAULT_SYSTEM_PROMPTS)
    if not templated:  # plain text: one user turn, whatever it contains
        return [{"role": "user", "content": text.strip()}], notes

    segments: list[list[str]] = []
    for i, tag in enumerate(tags):
        end = tags[i + 1].start() if i + 1 < len(tags) else len(text)
        role = tag.group(1).lower()
        segments.append([role, _SPECIAL.sub("", text[tag.end():end]).strip()])
    messages: list[dict[str, str]] = []
    if prefix:
        if not any(role == "user" for role, _ in segments):
            # "Q ASSISTANT:": a bare question followed by the generation prompt
            segments.insert(0, ["user", _SPECIAL.sub("", prefix).strip()])
        elif prefix in DEFAULT_SYSTEM_PROMPTS:
            notes["system_prompt_dropped"] += 1
        else:
            messages.append({"role": "system", "content": prefix})
            notes["system_prompt_kept"] += 1

    # Doubled template, end: "... ASSISTANT: ASSISTANT:" -> the generation prompt (and its echo) go.
    trailing = 0
    while segments and segments[-1][0] == "assistant" and not segments[-1][1]:
        segments.pop()
        trailing += 1
    # Doubled template, start (or anywhere): "USER: <image>\nUSER: <image>\nQ" -> one user turn. A user
    # segment holding nothing but placeholders, directly followed by another user segment, is the outer
    # wrapper: its placeholder is dropped when the inner conversation has its own, else moved inward.
    doubled = trailing > 1
    i = 0
    while i + 1 < len(segments):
        role, content = segments[i]
        if role == "user" and segments[i + 1][0] == "user" and not _without_placeholders(content):
            doubled = True
            later_has_image = any(IMAGE_PLACEHOLDER in c for _, c in segments[i + 1:])
            if IMAGE_PLACEHOLDER in content and not later_has_image:
                segments[i + 1][1] = f"{IMAGE_PLACEHOLDER}\n{segments[i + 1][1]}".rstrip()
            del segments[i]
            continue
        i += 1
    if doubled:
        notes["doubled_template"] += 1

    for n, (role, content) in enumerate(segments):
        if not content:
            raise ValueError(f"turn {n} ({role}) is empty")
        if n and segments[n - 1][0] == role:
            raise ValueError(f"turns {n - 1} and {n} are both {role} turns; expected alternating USER:/ASSISTANT:")
        messages.append({"role": role, "content": content})
    turns = [m for m in messages if m["role"] != "system"]
    if not turns:
        raise ValueError("has role tags but no turns")
    if turns[0]["role"] != "user":
        raise ValueError("starts with an ASSISTANT: turn; expected the conversation to start with USER:")
    if turns[-1]["role"] != "user":
        raise ValueError("ends with an assistant reply; a preference prompt must end with the user's turn "
                         "(optionally followed by an empty 'ASSISTANT:')")
    return messages, notes


def parse_templated_question(text: str) -> list[dict[str, str]]:
    """Parse a released MMSafe-PO `question` string into `[{"role", "content"}, ...]` ending with a user turn.

    Accepted forms (role tags `USER:`/`ASSISTANT:` in upper, lower or title case):
    - single turn: `"USER: <image>\\nCan you ...? ASSISTANT:"` -> `[user "<image>\\nCan you ...?"]`;
    - multi-turn: `"USER: a ASSISTANT: b USER: <image>\\nc ASSISTANT:"` -> `[user a, assistant b,
      user "<image>\\nc"]` (Vicuna `</s>` separators, as in `"b</s>USER: c"`, are tolerated and removed);
    - a system prefix before the first `USER:`: the Vicuna/LLaVA default system sentence is dropped (the
      chat template adds its own); any other text is kept as a leading `system` message;
    - the trailing generation prompt `ASSISTANT:` is optional: `"USER: Q"` works too;
    - doubled template (a question wrapped a second time): `"USER: <image>\\nUSER: <image>\\nQ ASSISTANT:
      ASSISTANT:"` -> `[user "<image>\\nQ"]`; the outer wrapper's placeholder is dropped when the inner
      conversation has one (else it moves into the next user turn);
    - a bare question followed by the generation prompt: `"<image>\\nQ ASSISTANT:"` -> `[user "<image>\\nQ"]`;
    - plain text without role tags, with or without `<image>`: one user turn holding the stripped text.

    Placeholders are otherwise left where they are (number and position); `place_single_image` makes
    it exactly one. A text with role tags is treated as templated only if it starts with a tag (after
    an optional default system sentence) or ends with `ASSISTANT:`; otherwise, e.g. `"Tell the user: hi"`,
    it is plain text. Raises `ValueError` for empty texts, empty or repeated turns in the middle, a
    conversation starting with `ASSISTANT:`, or one ending with a non-empty assistant reply.
    """
    return _parse(text)[0]


def parse_turn_list(turns: Any) -> list[dict[str, str]]:
    """The list-of-turns form `[{"from": "Human"|"Assistant", "value": ...}, ...]` -> messages.

    A trailing assistant turn with an empty (or null) value is the generation prompt and is dropped.
    """
    if not isinstance(turns, list) or not turns:
        raise ValueError("must be a non-empty string or list of {from, value} turns")
    messages = []
    for i, turn in enumerate(turns):
        role = TURN_ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not (value is None or isinstance(value, str)):
            raise ValueError(f"turn {i} needs 'from' in {sorted(TURN_ROLES)} and a string 'value', got {turn!r:.120}")
        messages.append({"role": role, "content": (value or "").strip()})
    while messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    for i, message in enumerate(messages):
        if not message["content"]:
            raise ValueError(f"turn {i} ({message['role']}) is empty")
    turns_only = [m["role"] for m in messages if m["role"] != "system"]
    if not turns_only or turns_only[-1] != "user":
        raise ValueError("must end with a user turn (optionally followed by an empty assistant turn)")
    if any(a == b for a, b in zip(turns_only, turns_only[1:])) or turns_only[0] != "user":
        raise ValueError(f"turns must alternate user/assistant starting with the user, got {turns_only}")
    return messages


def _remove_placeholder(content: str) -> str:
    """Drop every `<image>` in `content` together with the whitespace that follows it."""
    return re.sub(re.escape(IMAGE_PLACEHOLDER) + r"\s*", "", content).strip()


def place_single_image(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    """Make the conversation hold exactly one `<image>`; returns `(messages, change)`.

    - one placeholder in a user turn: unchanged, wherever it is (`change == 0`);
    - several: the first one in a user turn is kept and all others are removed with the whitespace after
      them (`change` = number removed, > 0), e.g. `"<image>\\n<image>\\nQ"` -> `"<image>\\nQ"`;
    - none in a user turn: any placeholder elsewhere is removed and `"<image>\\n"` is put at the start of
      the last user turn, LLaVA style (`change == -1`).
    """
    out = [dict(m) for m in messages]
    keep = next((i for i, m in enumerate(out) if m["role"] == "user" and IMAGE_PLACEHOLDER in m["content"]), None)
    total = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in out)
    if keep is not None and total == 1:
        return out, 0
    for i, message in enumerate(out):
        content = message["content"]
        if i == keep:
            # a run like "<image>\n<image>\n" becomes one placeholder followed by the run's last whitespace
            content = _PLACEHOLDER_RUN.sub(IMAGE_PLACEHOLDER, content, count=1)
            head, _, tail = content.partition(IMAGE_PLACEHOLDER)
            tail = re.sub(re.escape(IMAGE_PLACEHOLDER) + r"\s*", "", tail)
            content = (head + IMAGE_PLACEHOLDER + tail).strip()
        elif IMAGE_PLACEHOLDER in content:
            content = _remove_placeholder(content)
        if not content:
            raise ValueError(f"turn {i} ({message['role']}) is empty once the extra {IMAGE_PLACEHOLDER} is removed")
        message["content"] = content
    if keep is not None:
        return out, total - 1
    last_user = max(i for i, m in enumerate(out) if m["role"] == "user")
    out[last_user]["content"] = f"{IMAGE_PLACEHOLDER}\n{out[last_user]['content']}"
    return out, -1


def normalise_response(text: Any) -> str:
    """Strip leading `ASSISTANT:` tags (any case, repeated), Vicuna `</s>` markers and outer whitespace."""
    if not isinstance(text, str):
        raise ValueError(f"must be a string, got {type(text).__name__}")
    text = _RESPONSE_PREFIX.sub("", text, count=1)
    return _SPECIAL.sub("", text).strip()


def blind_prompt_messages(text_prompt: str) -> list[dict[str, str]]:
    """The text-only conversation of a `text_prompt` (entity named, no image): role tags and `<image>` removed."""
    messages = parse_templated_question(text_prompt)
    out = []
    for i, m in enumerate(messages):
        content = _remove_placeholder(m["content"])
        if not content:
            raise ValueError(f"turn {i} ({m['role']}) is empty without {IMAGE_PLACEHOLDER}")
        out.append({"role": m["role"], "content": content})
    return out


# --------------------------------------------------------------------------------------- records
def mmsafe_po_record_to_sample(record: Any, image_folder: str | Path | None, stats: MutableMapping[str, int]
                               | None = None, position: int | None = None) -> Sample:
    """One released row -> a preference `Sample` (prompt ending with the user turn, chosen, rejected).

    Raises `SampleError` naming `mmsafe-po-<id>` and the field (`question`, `image`, `chosen`, `rejected`,
    `id`) for unusable rows. `stats` (e.g. a `Counter`) receives counts of what was normalised.
    """
    stats = stats if stats is not None else Counter()
    fallback_id = f"<row {position}>" if position is not None else "?"
    if not isinstance(record, dict):
        raise SampleError(fallback_id, "row", f"must be a JSON object, got {type(record).__name__}")
    raw_id = record.get("id")
    if raw_id is None or isinstance(raw_id, bool) or not isinstance(raw_id, (int, str)) or str(raw_id).strip() == "":
        raise SampleError(fallback_id, "id", f"must be an integer (or a non-empty string), got {raw_id!r}")
    sample_id = f"mmsafe-po-{raw_id}"

    if "question" not in record:
        raise SampleError(sample_id, "question", "is missing")
    question = record["question"]
    try:
        if isinstance(question, list):
            messages, notes = parse_turn_list(question), Counter()
        else:
            messages, notes = _parse(question)
        messages, change = place_single_image(messages)
    except ValueError as err:
        raise SampleError(sample_id, "question", str(err)) from None

    image = record.get("image")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if not isinstance(image, str) or not image.strip():
        raise SampleError(sample_id, "image", f"must be one image file name, got {image!r:.120}")
    path = Path(image_folder) / image if image_folder is not None else Path(image)
    if not path.is_file():
        raise SampleError(sample_id, "image", f"file not found: {path}")

    responses = {}
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise SampleError(sample_id, name, "is missing")
        try:
            responses[name] = normalise_response(record[name])
        except ValueError as err:
            raise SampleError(sample_id, name, str(err)) from None
        if not responses[name]:
            raise SampleError(sample_id, name, "is empty (after removing the 'ASSISTANT:' prefix)")
        if responses[name] != record[name].strip():
            stats[f"{name}_prefix_stripped"] += 1
    if responses["chosen"] == responses["rejected"]:
        raise SampleError(sample_id, "rejected", "is identical to 'chosen' after normalisation; the pair carries "
                                                 "no preference")

    meta: dict[str, Any] = {"source": SOURCE}
    meta.update({key: record[key] for key in META_FIELDS if key in record})
    text_prompt = record.get("text_prompt")
    if isinstance(text_prompt, str) and not is_blank(text_prompt):
        try:
            blind = blind_prompt_messages(text_prompt)
        except ValueError as err:
            stats["blind_prompt_unparsed"] += 1
            log.debug("%s: text_prompt not usable for blind_prompt: %s", sample_id, err)
        else:
            meta["blind_prompt"] = blind[-1]["content"]
            if len(blind) > 1:
                meta["blind_messages"] = blind
    else:
        stats["blind_prompt_missing"] += 1

    stats.update(notes)
    if change > 0:
        stats["extra_placeholders_removed"] += 1
        log.debug("%s: kept the first of %d %s placeholders", sample_id, change + 1, IMAGE_PLACEHOLDER)
    elif change < 0:
        stats["placeholder_inserted"] += 1
    return Sample(id=sample_id, messages=messages, images=[str(path)], chosen=responses["chosen"],
                  rejected=responses["rejected"], meta=meta)


def _pair_key(sample: Sample) -> tuple[str, str | None, str | None]:
    return json.dumps(sample.messages, sort_keys=True), sample.chosen, sample.rejected


def _is_blind_row(sample: Sample, original: tuple[str, str | None, str | None]) -> bool:
    """A BPO blind row: a copy of an earlier row (same id, prompt and chosen) whose rejected answer was replaced by
    the model's image-free one (README step 3: the blind rows are concatenated to the original data)."""
    messages, chosen, rejected = _pair_key(sample)
    return messages == original[0] and chosen == original[1] and rejected != original[2]


def read_mmsafe_po(json_paths: str | Path | Iterable[str | Path], image_folder: str | Path | None,
                   errors: list[dict[str, str]] | None = None,
                   stats: MutableMapping[str, int] | None = None) -> Iterator[Sample]:
    """Yield the samples of every file in order (the released trainer `extend`s the keyword files).

    With `errors` given, unusable rows are appended there as `{id, field, error}` and skipped; otherwise
    the first one raises `SampleError` with the file and row. `stats` (e.g. a `Counter`) counts rows,
    samples, skipped rows, duplicate ids (expected in BPO data: blind rows copy their original's id) and
    every normalisation applied; a warning summarises the normalisations at the end.
    """
    if isinstance(json_paths, (str, Path)):
        json_paths = [json_paths]
    stats = stats if stats is not None else Counter()
    seen: dict[str, tuple[str, str | None, str | None]] = {}  # id -> its first row's prompt, chosen, rejected
    for json_path in json_paths:
        for position, record in enumerate(load_json_list(json_path)):
            stats["rows"] += 1
            try:
                sample = mmsafe_po_record_to_sample(record, image_folder, stats, position)
            except SampleError as err:
                skip_or_raise(err, f"{json_path} row {position}", errors, stats)
                continue
            original = seen.get(sample.id)
            if original is not None:
                stats["duplicate_ids"] += 1
                if _is_blind_row(sample, original):
                    sample.meta = {**sample.meta, "pair": "blind"}
                    stats["blind_rows"] += 1
            else:
                seen[sample.id] = _pair_key(sample)
            stats["samples"] += 1
            yield sample
    fixes = {k: v for k, v in stats.items() if k in ("doubled_template", "extra_placeholders_removed",
                                                      "placeholder_inserted") and v}
    if fixes:
        log.warning("MMSafe-PO: normalised <image> placeholders / templates: %s", fixes)


# --------------------------------------------------------------------------------------- keyword index
def load_keyword_index(config_path: str | Path, keywords: str | Iterable[str]) -> list[Path]:
    """The released `--config_train_path` file (`{"train": "path/to/train.json", ...}`) -> JSON paths.

    Keywords are selected in the order given; relative paths resolve against the config file's folder.
    Unlike the released `load_data`, which only printed an unknown keyword, this raises `ValueError`
    listing the known ones; a repeated keyword and a listed file that does not exist raise too.
    """
    config_path = Path(config_path)
    try:
        index = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: malformed JSON at line {err.lineno} column {err.colno} ({err.msg})") \
            from None
    if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
        raise ValueError(f"{config_path}: expected a JSON object mapping keywords to JSON file paths")
    keywords = [keywords] if isinstance(keywords, str) else list(keywords)
    if not keywords:
        raise ValueError(f"{config_path}: no keywords given; known keywords: {sorted(index)}")
    paths = []
    for keyword in keywords:
        if keyword not in index:
            raise ValueError(f"{config_path}: unknown keyword {keyword!r}; known keywords: {sorted(index)}")
        if keywords.count(keyword) > 1:
            raise ValueError(f"{config_path}: keyword {keyword!r} is listed more than once")
        path = Path(index[keyword]).expanduser()
        path = path if path.is_absolute() else config_path.parent / path
        if not path.is_file():
            raise ValueError(f"{config_path}: keyword {keyword!r} points at {path}, which does not exist")
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------ vlsafe make-shards mmsafe-po
class MMSafePOSource(DataSource):
    name = "mmsafe-po"
    help = "MMSafe-PO (BPO) preference JSON + image folder"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        inputs = parser.add_mutually_exclusive_group(required=True)
        inputs.add_argument("--json", nargs="+", help="released JSON list/JSONL file(s), concatenated in order")
        inputs.add_argument("--config", default=None,
                            help="keyword index {keyword: json path} (the released config_train.json)")
        parser.add_argument("--keywords", nargs="+", default=None,
                            help="keywords of --config to concatenate, in order")
        parser.add_argument("--images", required=True, help="folder the 'image' file names are relative to")

    def samples(self, args: argparse.Namespace, errors: list[dict[str, str]] | None,
                stats: MutableMapping[str, int]) -> Iterator[Sample]:
        if args.config is None and args.keywords:
            raise ValueError("--keywords selects entries of --config; give --config too")
        if args.config is not None and not args.keywords:
            raise ValueError("--config needs --keywords (e.g. --keywords train)")
        paths = load_keyword_index(args.config, args.keywords) if args.config is not None else args.json
        return read_mmsafe_po(paths, args.images, errors, stats)
