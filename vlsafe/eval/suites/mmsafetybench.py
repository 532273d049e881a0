"""MM-SafetyBench: attack success rate per scenario x image kind, with scenario-specific judge templates.

Data layout (as released): `processed_questions/{scenario}.json` is a dict keyed by "0", "1", ... with
`Question`, `Rephrased Question` and `Rephrased Question(SD)`; images are
`imgs/{scenario}/{SD|SD_TYPO|TYPO}/{id}.jpg`. The query that goes with each kind:
SD -> `Rephrased Question(SD)`, SD_TYPO and TYPO -> `Rephrased Question`, and the optional text-only
baseline TEXT -> `Question` (no image). Scenario names are the released directory names, typo included
("01-Illegal_Activitiy").

ASR = #unsafe / #judged, in percent, per scenario x kind (and per kind, overall), each with its denominator
(`..._n`). A prompt without a usable verdict (failed request, or a reply that is not exactly "safe" /
"unsafe", the released answer format: `parse_safety_verdict(..., "word")`) is *unjudged*: in neither count,
reported as `..._unjudged`, and `tools/evaluate.py` fails the run when there are any (upstream counted them
as not unsafe, over all items; with no unjudged prompt both definitions agree). With an endpoint judge
each scenario uses its template
(`data/mmsafetybench_judge_templates.json`: the general one for 01-07 and 09, political lobbying for 08,
legal / financial / health disclaimers for 10-12, government decisions for 13); with `string_match`
(the offline default) or a `detector` the templates do not apply and an answer is unsafe when it is not a
refusal / judged harmful — a proxy, recorded in `metrics.json` under the suite's `info.judge`.

Images are preprocessed with the CLIP processor's resize + centre crop by default (`image_preprocess: crop`),
as MLLM-Protector's MM-SafetyBench inference does (`robustness_eval.py:90`, `image_processor.preprocess`);
MM-SafetyBench itself ships no inference script for LLaVA.

Options: `root` (required; or `questions` and `images` folders; or `synthetic: {n, seed}`: a held-out synthetic
set in this layout, built on first use, `vlsafe.data.synthetic.benchmarks`), `scenarios` (default all 13), `kinds`
(default SD, SD_TYPO, TYPO), `judge` (default string_match), `judge_templates` (a JSON file of the same layout
as vlsafe's, e.g. with the released scenario templates), `max_samples` (per scenario), `max_new_tokens`
(256), `template` (the model's own by default), `image_preprocess` (crop), `on_error`.
"""
from __future__ import annotations

import json
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

from vlsafe.eval.judges import describe, safety_judge
from vlsafe.eval.suites import (
    GENERATION_OPTIONS,
    ChartSpec,
    SuiteResult,
    add_rate,
    check_options,
    existing_path,
    image_preprocess,
    percent,
    suite_answers,
    synthetic_test_set,
)

SUITE_NAME = "mmsafetybench"
SCENARIOS = ("01-Illegal_Activitiy", "02-HateSpeech", "03-Malware_Generation", "04-Physical_Harm", "05-EconomicHarm",
             "06-Fraud", "07-Sex", "08-Political_Lobbying", "09-Privacy_Violence", "10-Legal_Opinion",
             "11-Financial_Advice", "12-Health_Consultation", "13-Gov_Decision")
QUESTION_FIELD = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question",
                  "TEXT": "Question"}
DEFAULT_KINDS = ("SD", "SD_TYPO", "TYPO")
IMAGE_PREPROCESS = "crop"  # MLLM-Protector's robustness_eval.py:90: the CLIP processor's resize + centre crop
OPTIONS = GENERATION_OPTIONS | {"root", "questions", "images", "scenarios", "kinds", "judge", "judge_templates",
                                "synthetic"}


def judge_templates(path: str | Path | None = None) -> dict[str, Any]:
    """The judge templates: vlsafe's file, or a user's file of the same layout (`judge_templates` option), e.g.
    the released scenario templates, which vlsafe does not ship (docs/fidelity.md)."""
    if path is None:
        return json.loads(resources.files("vlsafe.eval").joinpath("data/mmsafetybench_judge_templates.json")
                          .read_text("utf-8"))
    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"suite 'mmsafetybench': judge_templates {path}: {err}") from err
    missing = [s for s in SCENARIOS if s not in data.get("scenarios", {})
               or data["scenarios"][s] not in data.get("templates", {})]
    if missing:
        raise ValueError(f"suite 'mmsafetybench': judge_templates {path} has no template for scenario(s) "
                         f"{missing}; give {{'templates': {{name: text}}, 'scenarios': {{scenario: name}}}}")
    return data


def template_for(scenario: str, templates: dict[str, Any] | None = None) -> str:
    data = templates or judge_templates()
    return data["templates"][data["scenarios"][scenario]]


def load_questions(path: str | Path, scenario: str) -> list[tuple[str, dict[str, Any]]]:
    """`(id, item)` pairs of `processed_questions/{scenario}.json`, in numeric id order."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno} column {err.colno} ({err.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by question id ('0', '1', ...)")
    return sorted(data.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0, kv[0]))


def build_samples(questions_dir: Path, images_dir: Path, scenarios: list[str], kinds: list[str],
                  max_samples: int | None = None):
    """Prompts for every scenario x kind: `<image>\\n` + the kind's question field, image `{id}.jpg`."""
    from vlsafe.constants import IMAGE_PLACEHOLDER
    from vlsafe.data.schema import Sample, is_blank

    samples = []
    for scenario in scenarios:
        path = questions_dir / f"{scenario}.json"
        if not path.is_file():
            raise ValueError(f"suite 'mmsafetybench': {path} does not exist (scenario {scenario})")
        items = load_questions(path, scenario)
        items = items[:max_samples] if max_samples else items
        for kind in kinds:
            for qid, item in items:
                question = item.get(QUESTION_FIELD[kind]) if isinstance(item, dict) else None
                if not isinstance(question, str) or is_blank(question):
                    raise ValueError(f"{path}: question {qid!r} has no usable {QUESTION_FIELD[kind]!r} (needed for "
                                     f"{kind}; empty or only whitespace/zero-width characters)")
                meta = {"source": SUITE_NAME, "scenario": scenario, "kind": kind, "question_id": qid,
                        "key_phrase": item.get("Key Phrase")}
                if kind == "TEXT":
                    samples.append(Sample(id=f"mmsb-{scenario}-{kind}-{qid}",
                                          messages=[{"role": "user", "content": question.strip()}], meta=meta))
                else:
                    image = images_dir / scenario / kind / f"{qid}.jpg"
                    samples.append(Sample(id=f"mmsb-{scenario}-{kind}-{qid}", images=[str(image)], meta=meta,
                                          messages=[{"role": "user",
                                                     "content": f"{IMAGE_PLACEHOLDER}\n{question.strip()}"}]))
    return samples


def asr_table(predictions: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in predictions:
        groups[tuple(row[k] for k in keys)].append(row)
    out = []
    for group, rows in groups.items():
        unsafe = sum(r["verdict"] == "unsafe" for r in rows)
        judged = sum(r["verdict"] is not None for r in rows)
        out.append({**dict(zip(keys, group)), "n": judged, "unjudged": len(rows) - judged, "unsafe": unsafe,
                    "asr": percent(unsafe, judged) if judged else None})
    return out


def evaluate(model, options: dict[str, Any], out_dir: str | Path, *, batch_size: int = 8,
             progress: bool = True) -> SuiteResult:
    check_options(options, OPTIONS, SUITE_NAME)
    options, synthetic = synthetic_test_set(options, SUITE_NAME)
    if not options.get("root") and not (options.get("questions") and options.get("images")):
        raise ValueError("suite 'mmsafetybench': give `root` (with processed_questions/ and imgs/) or both "
                         "`questions` and `images`")
    root = existing_path(options, "root", SUITE_NAME) if options.get("root") else None
    questions_dir = existing_path(options, "questions", SUITE_NAME) if options.get("questions") else \
        root / "processed_questions"
    images_dir = existing_path(options, "images", SUITE_NAME) if options.get("images") else root / "imgs"
    scenarios = list(options.get("scenarios", SCENARIOS))
    kinds = list(options.get("kinds", DEFAULT_KINDS))
    bad = [s for s in scenarios if s not in SCENARIOS] + [k for k in kinds if k not in QUESTION_FIELD]
    if bad:
        raise ValueError(f"suite 'mmsafetybench': unknown scenario(s)/kind(s) {bad}; scenarios are "
                         f"{list(SCENARIOS)}, kinds {list(QUESTION_FIELD)}")
    out_dir = Path(out_dir)
    templates = judge_templates(options.get("judge_templates"))
    judge = safety_judge(options.get("judge", "string_match"), template_for("01-Illegal_Activitiy", templates),
                         cache_dir=out_dir, what="mmsafetybench judge")
    samples = build_samples(questions_dir, images_dir, scenarios, kinds, options.get("max_samples"))
    preprocess = image_preprocess(options, IMAGE_PREPROCESS, SUITE_NAME)
    generated = suite_answers(model, samples, options, out_dir, batch_size=batch_size, progress=progress,
                              desc="mmsafetybench answers", max_new_tokens=256, image_preprocess=preprocess)
    answered = [(s, a) for s, a in zip(samples, generated.answers) if a is not None]
    questions = [s.messages[-1]["content"].replace("<image>\n", "", 1) for s, _ in answered]
    verdicts = judge.judge(questions, [a for _, a in answered],
                           templates=[template_for(s.meta["scenario"], templates) for s, _ in answered],
                           progress=progress)
    predictions = []
    for (sample, answer), question, verdict in zip(answered, questions, verdicts):
        predictions.append({"id": sample.id, "scenario": sample.meta["scenario"], "kind": sample.meta["kind"],
                            "question_id": sample.meta["question_id"], "question": question, "answer": answer,
                            "verdict": None if verdict.safe is None else ("safe" if verdict.safe else "unsafe"),
                            "judge_output": verdict.raw})
    metrics: dict[str, float] = {}
    by_cell = asr_table(predictions, ("scenario", "kind"))
    for row in by_cell:
        add_rate(metrics, f"mmsafetybench/{row['scenario']}/{row['kind']}/asr", row["unsafe"], row["n"],
                 row["unjudged"])
    by_kind = asr_table(predictions, ("kind",))
    for row in by_kind:
        add_rate(metrics, f"mmsafetybench/{row['kind']}/asr", row["unsafe"], row["n"], row["unjudged"])
    judged = [p for p in predictions if p["verdict"] is not None]
    add_rate(metrics, "mmsafetybench/asr", sum(p["verdict"] == "unsafe" for p in judged), len(judged),
             len(predictions) - len(judged))
    metrics["mmsafetybench/n"] = len(predictions)
    info = {"questions": str(questions_dir), "images": str(images_dir), "scenarios": scenarios, "kinds": kinds,
            "image_preprocess": preprocess,
            "judge": describe(judge), "templates_apply": describe(judge).get("type") == "endpoint",
            "generated": generated.generated, "cached": generated.cached, "skipped": generated.skipped}
    if synthetic:
        info["synthetic"] = synthetic
    charts = [ChartSpec("asr_by_scenario_kind", y="asr", x="scenario", group="kind",
                        title="MM-SafetyBench ASR per scenario and image kind", ylabel="ASR (%)")]
    return SuiteResult(metrics=metrics, tables={"asr_by_scenario_kind": by_cell, "asr_by_kind": by_kind},
                       predictions=predictions, info=info, charts=charts)
