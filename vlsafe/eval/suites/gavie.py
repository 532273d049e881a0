"""GAVIE (LRV-Instruction): a text-only judge scores answers for relevancy and accuracy (0-10) from the
image's Visual Genome dense captions with boxes, without seeing the image.

The judge prompt is byte for byte the one the released `Evaluation/evaluate.py:16-36` writes: the box header,
`bounding box:`, one `"{caption} X:{x} Y:{y} Width:{w} Height:{h}"` line per dense caption (numbers as
Python's `str`), two blank lines, the instruction, the answers (`Answer1: ...`; one prompt can score several
models' answers), the two criteria and the output format, relevancy block first, ending in a blank line.
Two released bugs are not copied: `evaluate.py` writes the box width as the height (`height_bug: true`
reproduces it, and with it the prompt is the released one exactly), and it reads the instruction from
`instruction` while `evaluation_set.json` stores `question` (both keys are accepted here).

Scores are parsed per block ("Relevancy"/"relevancy", "Accuracy", markdown decorations tolerated) from
`score of (the) answer<k>: <number>`; a missing, non-numeric or out-of-range score is counted as unparsed,
never as 0. GAVIE-Accuracy / GAVIE-Relevancy are the means of the parsed scores, overall and per `task`
(when the evaluation set has one), each with its denominator (`gavie/accuracy_n`) and the number of prompts
without a usable score (`gavie/accuracy_unjudged`), which `tools/evaluate.py` fails the run on.

Answers: `generation: lrv` (default) samples as LRV-Instruction's released inference does
(`utils/inference.py:420-427`: top-k 3, top-p 0.9, temperature 1, no repeated 2-grams, 512 new tokens; seeded
by `seed`, 0); `generation: greedy` decodes greedily. Images: `image_preprocess: crop` (default; LRV's V2
model, mPLUG-Owl, uses a CLIP-style processor: resize + centre crop, UNVERIFIED for its exact settings);
LRV's V1 MiniGPT-4 squashes to a square (`resize`).

Options: `synthetic: {n, seed}` instead of the next three (a held-out synthetic set in this layout, built on first
use, `vlsafe.data.synthetic.benchmarks`), `evaluation_set` (JSON list of `{image_id, question}`), `annotations`
(`vg_annotation.json`, image id -> `[{caption, bbox: [x, y, w, h]}]`), `images` (folder with `{image_id}.jpg`),
`judge` (an endpoint; without one, answers and judge prompts are written and no score is computed), `height_bug`
(false), `judge_max_tokens` (1024), `compare` (`{name: predictions.jsonl}` of other models' runs of this suite:
their answers are scored in the same prompts as Answer2, Answer3, ..., as GAVIE ranks several models at once;
metrics `gavie/compare/<name>/...`), `generation` (lrv | greedy), `seed`, `max_samples`, `max_new_tokens` (512,
LRV's inference setting), `template`, `image_preprocess` (crop), `on_error`.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from vlsafe.eval.judges import chat_judge, describe
from vlsafe.eval.suites import (
    DENOMINATOR,
    GENERATION_OPTIONS,
    UNJUDGED,
    ChartSpec,
    SuiteResult,
    check_options,
    existing_path,
    image_preprocess,
    suite_answers,
    synthetic_test_set,
)

SUITE_NAME = "gavie"
OPTIONS = GENERATION_OPTIONS | {"evaluation_set", "annotations", "images", "judge", "height_bug", "judge_max_tokens",
                                "compare", "generation", "seed", "synthetic"}
GENERATIONS = ("lrv", "greedy")
IMAGE_PREPROCESS = "crop"
CRITERIA = ("relevancy", "accuracy")

HEADER = ("Given an image with following information: bounding box, positions that are the object left-top corner "
          "coordinates(X, Y), object sizes(Width, Height). Highly overlapping bounding boxes may refer to the same "
          "object.\n\n")
TEACHER = ("Suppose you are a smart teacher, after looking at the image information above, please score the above "
           "answers(0-10) according to the following criteria:\n1: whether the response directly follows the "
           "instruction.\n2: whether the response is accurate concerning the image content.\n\n")


def caption_lines(regions: Sequence[dict[str, Any]], height_bug: bool = False) -> str:
    """One `"{caption} X:{x} Y:{y} Width:{w} Height:{h}\\n"` line per dense caption (bbox = [x, y, w, h]),
    numbers written by `str` as the released script does (`12`, `12.0`, `12.5` as they are in the JSON)."""
    lines = []
    for region in regions:
        x, y, w, h = region["bbox"]
        lines.append(f"{region['caption']} X:{x} Y:{y} Width:{w} Height:{w if height_bug else h}\n")
    return "".join(lines)


def gavie_prompt(regions: Sequence[dict[str, Any]], instruction: str, answers: Sequence[str],
                 height_bug: bool = False) -> str:
    """The judge prompt for one instruction and one or more answers (scored as answer1..answerN)."""
    if not answers:
        raise ValueError("GAVIE needs at least one answer to score")
    numbered = "".join(f"Answer{i}: {a}\n" for i, a in enumerate(answers, 1))
    blocks = "".join(f"score of the answer{i}:\nreason:\n" for i in range(1, len(answers) + 1))
    return (HEADER + "bounding box:\n" + caption_lines(regions, height_bug) + "\n\n"
            + f"Here is the instruction for the image:\n{instruction}\n\n" + numbered + "\n" + TEACHER
            + "Output format:\n\nRelevancy:\n" + blocks + "\nAccuracy:\n" + blocks + "\n")


_HEADING = re.compile(r"^[\s#*_>`-]*(relevancy|relevance|accuracy)\b[\s*_`]*:?", re.IGNORECASE | re.MULTILINE)
_SCORE = re.compile(r"score\s+of\s+(?:the\s+)?answer\s*(\d+)\s*[*_`]*\s*[:：=]?\s*[*_`]*\s*(-?\d+(?:\.\d+)?)",
                    re.IGNORECASE)


def parse_gavie_scores(reply: str | None, num_answers: int = 1) -> dict[str, list[float | None]]:
    """`{"relevancy": [...], "accuracy": [...]}`, one entry per answer, None where no valid 0-10 score was found.

    A block starts at a line whose first word is Relevancy/Accuracy (any case; `**Accuracy:**` too) and
    ends at the next such line; inside it, the first `score of the answer<k>: <n>` for each k counts.
    """
    scores: dict[str, list[float | None]] = {c: [None] * num_answers for c in CRITERIA}
    if not reply:
        return scores
    headings = list(_HEADING.finditer(reply))
    for i, heading in enumerate(headings):
        criterion = "relevancy" if heading.group(1).lower().startswith("relevan") else "accuracy"
        block = reply[heading.end():headings[i + 1].start() if i + 1 < len(headings) else len(reply)]
        for match in _SCORE.finditer(block):
            k, value = int(match.group(1)), float(match.group(2))
            if 1 <= k <= num_answers and scores[criterion][k - 1] is None and 0.0 <= value <= 10.0:
                scores[criterion][k - 1] = value
    return scores


def load_annotations(path: Path) -> dict[str, list[dict[str, Any]]]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno} column {err.colno} ({err.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object mapping image ids to [{{caption, bbox}}, ...]")
    return {str(k): v for k, v in data.items()}


def load_compare(compare: dict[str, str], ids: list[str]) -> dict[str, dict[str, str]]:
    """Other models' answers to score in the same prompts (Answer2, Answer3, ...), as GAVIE compares models:
    `{name: predictions.jsonl of an earlier tools/evaluate.py run of this suite}`, matched by sample id."""
    import json

    if not isinstance(compare, dict):
        raise ValueError("suite 'gavie': `compare` maps a name to a predictions.jsonl file")
    out = {}
    for name, path in compare.items():
        if not Path(path).is_file():
            raise ValueError(f"suite 'gavie': compare {name!r}: {path} does not exist")
        answers = {}
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: malformed JSON line") from None
            if isinstance(row, dict) and isinstance(row.get("answer"), str) and row.get("id") in ids:
                answers[row["id"]] = row["answer"]
        missing = [i for i in ids if i not in answers]
        if missing:
            raise ValueError(f"suite 'gavie': compare {name!r}: {path} has no answer for {len(missing)} prompt(s), "
                             f"e.g. {missing[0]!r} (evaluate it on the same evaluation set first)")
        out[str(name)] = answers
    return out


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def evaluate(model, options: dict[str, Any], out_dir: str | Path, *, batch_size: int = 8,
             progress: bool = True) -> SuiteResult:
    from vlsafe.constants import IMAGE_PLACEHOLDER
    from vlsafe.data.schema import Sample, is_blank
    from vlsafe.data.sources.llava import load_json_list

    check_options(options, OPTIONS, SUITE_NAME)
    options, synthetic = synthetic_test_set(options, SUITE_NAME)
    check_options(options, OPTIONS, SUITE_NAME, required=("evaluation_set", "annotations", "images"))
    out_dir = Path(out_dir)
    evaluation_set = existing_path(options, "evaluation_set", SUITE_NAME)
    annotations = load_annotations(existing_path(options, "annotations", SUITE_NAME))
    images = existing_path(options, "images", SUITE_NAME)
    height_bug = bool(options.get("height_bug", False))
    judge = chat_judge(options["judge"], cache_dir=out_dir, what="gavie judge") if options.get("judge") else None
    items = load_json_list(evaluation_set)
    if options.get("max_samples"):
        items = items[:options["max_samples"]]
    samples = []
    for i, item in enumerate(items):
        question = item.get("question", item.get("instruction")) if isinstance(item, dict) else None
        image_id = str(item.get("image_id", "")) if isinstance(item, dict) else ""
        if not isinstance(question, str) or is_blank(question) or not image_id:
            raise ValueError(f"{evaluation_set}: item {i} needs `image_id` and a `question` (or `instruction`) that "
                             f"is not empty or only whitespace/zero-width characters")
        if image_id not in annotations:
            raise ValueError(f"{evaluation_set}: item {i}: image {image_id} has no dense captions in the annotations")
        for j, region in enumerate(annotations[image_id]):
            bbox = region.get("bbox") if isinstance(region, dict) else None
            if not isinstance(region.get("caption") if isinstance(region, dict) else None, str) or \
                    not isinstance(bbox, list) or len(bbox) != 4:
                raise ValueError(f"annotations: image {image_id} region {j} needs a `caption` and `bbox` [x, y, w, h]")
        samples.append(Sample(id=f"gavie-{i}-{image_id}", images=[str(images / f"{image_id}.jpg")],
                              messages=[{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question.strip()}"}],
                              meta={"image_id": image_id, "question": question,  # the judge gets it as written
                                    "task": str(item.get("task", "all"))}))
    generation = options.get("generation", "lrv")
    if generation not in GENERATIONS:
        raise ValueError(f"suite 'gavie': generation must be one of {list(GENERATIONS)}, got {generation!r}")
    preprocess = image_preprocess(options, IMAGE_PREPROCESS, SUITE_NAME)
    generated = suite_answers(model, samples, options, out_dir, batch_size=batch_size, progress=progress,
                              desc="gavie answers", max_new_tokens=512, image_preprocess=preprocess,
                              preset=generation, seed=int(options.get("seed", 0)))
    answered = [(s, a) for s, a in zip(samples, generated.answers) if a is not None]
    others = load_compare(options.get("compare") or {}, [s.id for s, _ in answered])
    models = ["model", *others]
    answer_sets = [[a, *(others[name][s.id] for name in others)] for s, a in answered]
    prompts = [gavie_prompt(annotations[s.meta["image_id"]], s.meta["question"], answers, height_bug)
               for (s, _), answers in zip(answered, answer_sets)]
    info: dict[str, Any] = {"evaluation_set": str(evaluation_set), "height_bug": height_bug, "answers": models,
                            "generation": generation, "image_preprocess": preprocess,
                            "generated": generated.generated, "cached": generated.cached, "skipped": generated.skipped}
    if synthetic:
        info["synthetic"] = synthetic
    replies: list[str | None] = [None] * len(answered)
    if judge is not None:
        replies = judge.complete(prompts, max_tokens=int(options.get("judge_max_tokens", 1024)), progress=progress,
                                 desc="gavie judge")
        info["judge"] = describe(judge)
    predictions = []
    scores_of: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: {c: [] for c in CRITERIA})
    unparsed = {(m, c): 0 for m in models for c in CRITERIA}
    for (sample, answer), answers, prompt, reply in zip(answered, answer_sets, prompts, replies):
        scores = parse_gavie_scores(reply, len(models))
        row = {"id": sample.id, "image_id": sample.meta["image_id"], "task": sample.meta["task"],
               "question": sample.meta["question"], "answer": answer, "judge_prompt": prompt, "judge_reply": reply}
        for k, name in enumerate(models):
            for criterion in CRITERIA:
                value = scores[criterion][k]
                row[criterion if name == "model" else f"{name}/{criterion}"] = value
                if value is None:
                    unparsed[(name, criterion)] += 1
                else:
                    scores_of[(name, sample.meta["task"])][criterion].append(value)
                    scores_of[(name, "(all)")][criterion].append(value)
        predictions.append(row)
    metrics: dict[str, float] = {"gavie/n": len(predictions)}
    table = []
    if judge is not None:
        for name in models:
            prefix = "gavie" if name == "model" else f"gavie/compare/{name}"
            for criterion in CRITERIA:
                scores = scores_of[(name, "(all)")][criterion]
                metrics[f"{prefix}/{criterion}"] = _mean(scores)
                metrics[f"{prefix}/{criterion}{DENOMINATOR}"] = len(scores)
                metrics[f"{prefix}/{criterion}{UNJUDGED}"] = unparsed[(name, criterion)]
        table = [{"answers": name, "task": task, "n_relevancy": len(v["relevancy"]), "relevancy": _mean(v["relevancy"]),
                  "n_accuracy": len(v["accuracy"]), "accuracy": _mean(v["accuracy"])}
                 for (name, task), v in sorted(scores_of.items(), key=lambda kv: (models.index(kv[0][0]), kv[0][1]))]
    charts = [ChartSpec("scores_by_task", y="accuracy", x="task", group="answers" if others else None,
                        title="GAVIE accuracy (0-10) per task", ylabel="accuracy")] if table else []
    return SuiteResult(metrics=metrics, tables={"scores_by_task": table} if table else {}, predictions=predictions,
                       info=info, charts=charts)
