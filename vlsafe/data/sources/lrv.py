"""LRV-Instruction JSON -> single-turn instruction `Sample`s, with task and polarity kept for the sampler.

Input: a JSON list (or JSON Lines) of `{"image_id": "2392588", "question", "answer", "task"}`; `image_id` is a
Visual Genome id whose image is `{image_id}.jpg` in the image folder (as LRV's MiniGPT-4 loader reads it).
Each row becomes `[user "<image>\\n" + question, assistant answer]` (LRV trains every pair as one
instruction); `meta` keeps `task`, `polarity` ("negative" for the negative instructions, else "positive")
and `image_id`.

Positive/negative ratio and per-task balance are *sampler* settings, not converter settings: write one shard
set per polarity (and/or task) -- `--polarity` / `--tasks` on the command line, or `write_lrv_shard_sets` --
and give each set a weight in the recipe's list of `vlsafe.data.datamodule.Source`s (see recipes/lrv.yaml).
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, MutableMapping, Sequence

from vlsafe.constants import IMAGE_PLACEHOLDER
from vlsafe.data.schema import Sample, SampleError, is_blank
from vlsafe.data.shards import write_shards
from vlsafe.data.sources import skip_or_raise
from vlsafe.data.sources.base import DataSource
from vlsafe.data.sources.llava import load_json_list

SOURCE = "lrv"
POLARITIES = ("positive", "negative")


def default_is_negative(task: str) -> bool:
    """LRV labels its negative instructions with task "negative" (Nonexistent / Existent Element
    Manipulation); names such as "negative1" or "Negative (knowledge)" count too."""
    return task.strip().lower().startswith("negative")


def task_slug(task: str) -> str:
    """A folder-safe name for a task label ("Object Attribute Detection" -> "object_attribute_detection")."""
    return re.sub(r"[^a-z0-9]+", "_", task.strip().lower()).strip("_") or "unnamed"


def lrv_record_to_sample(row: Any, image_folder: str | Path | None, position: int,
                         is_negative: Callable[[str], bool] = default_is_negative) -> Sample:
    """One released row -> a `Sample` with id `lrv-<position>-<image_id>` (rows carry no id of their own; the
    position in the file makes it unique). Raises `SampleError` naming the row and the field."""
    fallback = f"lrv-{position}"
    if not isinstance(row, dict):
        raise SampleError(fallback, "row", f"must be a JSON object, got {type(row).__name__}")
    image_id = row.get("image_id")
    if isinstance(image_id, bool) or not isinstance(image_id, (str, int)) or not str(image_id).strip():
        raise SampleError(fallback, "image_id", f"must be a Visual Genome image id, got {image_id!r:.60}")
    image_id = str(image_id).strip()
    if "/" in image_id or "\\" in image_id or image_id.startswith("."):
        raise SampleError(fallback, "image_id", f"must be a bare id, not a path: {image_id!r:.60}")
    sample_id = f"lrv-{position}-{image_id}"
    values = {}
    for field_name in ("question", "answer", "task"):
        value = row.get(field_name)
        if not isinstance(value, str) or is_blank(value):
            raise SampleError(sample_id, field_name, f"must be a non-empty string (not only whitespace or "
                                                     f"zero-width characters), got {value!r:.60}")
        values[field_name] = value.strip()
    if IMAGE_PLACEHOLDER in values["question"] or IMAGE_PLACEHOLDER in values["answer"]:
        raise SampleError(sample_id, "question", f"contains {IMAGE_PLACEHOLDER}; LRV questions are plain text")
    file_name = f"{image_id}.jpg"
    image = str(Path(image_folder) / file_name) if image_folder else file_name
    polarity = "negative" if is_negative(values["task"]) else "positive"
    return Sample(id=sample_id, images=[image],
                  messages=[{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{values['question']}"},
                            {"role": "assistant", "content": values["answer"]}],
                  meta={"source": SOURCE, "task": values["task"], "polarity": polarity, "image_id": image_id,
                        "answer": values["answer"]})


def read_lrv(json_paths: str | Path | Sequence[str | Path], image_folder: str | Path | None = None,
             errors: list[dict[str, str]] | None = None, stats: MutableMapping[str, int] | None = None, *,
             polarity: str | None = None, tasks: Iterable[str] | None = None, exclude_tasks: Iterable[str] = (),
             is_negative: Callable[[str], bool] = default_is_negative) -> Iterator[Sample]:
    """Yield the samples of one or more files (positions count across files), optionally only one polarity
    and/or only some tasks (matched exactly or by `task_slug`). `stats` gets `rows`, `samples`, `skipped`,
    `filtered` and per-polarity / per-task counts of what was kept."""
    if polarity is not None and polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {POLARITIES}, got {polarity!r}")
    stats = stats if stats is not None else Counter()
    keep_tasks = None if tasks is None else {task_slug(t) for t in tasks}
    drop_tasks = {task_slug(t) for t in exclude_tasks}
    paths = [json_paths] if isinstance(json_paths, (str, Path)) else list(json_paths)
    position = 0
    for path in paths:
        for row in load_json_list(path):
            stats["rows"] += 1
            try:
                sample = lrv_record_to_sample(row, image_folder, position, is_negative)
            except SampleError as err:
                skip_or_raise(err, f"{path} row {position}", errors, stats)
                continue
            finally:
                position += 1
            slug = task_slug(sample.meta["task"])
            if ((polarity is not None and sample.meta["polarity"] != polarity)
                    or (keep_tasks is not None and slug not in keep_tasks) or slug in drop_tasks):
                stats["filtered"] += 1
                continue
            stats["samples"] += 1
            stats[f"polarity={sample.meta['polarity']}"] += 1
            stats[f"task={sample.meta['task']}"] += 1
            yield sample


def write_lrv_shard_sets(json_paths: str | Path | Sequence[str | Path], image_folder: str | Path, out_root: str | Path,
                         by: Sequence[str] = ("polarity",), on_error: str = "raise", max_samples: int = 1000,
                         progress: bool = True) -> dict[str, Path]:
    """Write one shard set per group under `out_root` and return `{group: folder}`.

    `by=("polarity",)` gives `positive/` and `negative/`; `("polarity", "task")` gives
    `negative/<task>/`, `positive/<task>/`, ...; `("task",)` gives `<task>/`. Each set is then one weighted
    `Source` in a recipe, which is how the positive/negative ratio and the per-task balance are set.
    Reads the JSON once per group (simple and streaming; the JSON is small next to the images).
    """

    unknown = [key for key in by if key not in ("polarity", "task")]
    if unknown or not by:
        raise ValueError(f"`by` takes 'polarity' and/or 'task', got {list(by)}")
    groups: Counter = Counter()
    for sample in read_lrv(json_paths, image_folder, errors=[]):
        key_of = {"polarity": sample.meta["polarity"], "task": task_slug(sample.meta["task"])}
        groups[tuple(key_of[key] for key in by)] += 1
    out: dict[str, Path] = {}
    for group in sorted(groups):
        folder = Path(out_root).joinpath(*group)
        values = dict(zip(by, group))
        errors: list[dict[str, str]] | None = [] if on_error == "skip" else None
        samples = (s for s in read_lrv(json_paths, image_folder, errors, polarity=values.get("polarity"))
                   if "task" not in values or task_slug(s.meta["task"]) == values["task"])
        write_shards(samples, folder, max_samples=max_samples, on_error=on_error, progress=progress,
                     total=groups[group])
        out["/".join(group)] = folder
    return out


# ------------------------------------------------------------------------------ vlsafe make-shards lrv
class LrvSource(DataSource):
    name = "lrv"
    help = "LRV-Instruction JSON + Visual Genome image folder ({image_id}.jpg)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", nargs="+", required=True, help="LRV-Instruction JSON list/JSONL file(s)")
        parser.add_argument("--images", required=True, help="Visual Genome image folder holding {image_id}.jpg")
        parser.add_argument("--polarity", choices=POLARITIES, default=None,
                            help="keep only positive or only negative instructions (write one shard set per "
                                 "polarity and weight them in the recipe to set the ratio)")
        parser.add_argument("--tasks", nargs="+", default=None, help="keep only these task labels")
        parser.add_argument("--exclude-tasks", nargs="+", default=(), help="drop these task labels")
        parser.add_argument("--negative-tasks", nargs="+", default=None,
                            help="task labels that are negatives (default: labels starting with 'negative')")

    def samples(self, args: argparse.Namespace, errors: list[dict[str, str]] | None,
                stats: MutableMapping[str, int]) -> Iterator[Sample]:
        is_negative = default_is_negative
        if args.negative_tasks:
            negatives = {task_slug(t) for t in args.negative_tasks}
            is_negative = lambda task: task_slug(task) in negatives  # noqa: E731
        return read_lrv(args.json, args.images, errors, stats, polarity=args.polarity, tasks=args.tasks,
                        exclude_tasks=args.exclude_tasks, is_negative=is_negative)
