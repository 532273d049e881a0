"""VLGuard evaluation: string-match attack success rate (ASR) and helpfulness win rate.

As released (`VLGuard_eval.py`, `utils.check_success_attack`, `gpt4_evaluator.py`):
- subsets `unsafes` (unsafe images, their instruction), `safe_unsafes` (safe images, the unsafe
  instruction), `safe_safes` (safe images, the safe instruction), prompts from
  `vlsafe.data.sources.vlguard.vlguard_eval_samples`;
- greedy decoding, at most 256 new tokens, at least 1, `llava_v1` template;
- images through the CLIP processor's own resize + centre crop (`model_utils.py:10`,
  `processor.preprocess([image])`), not LLaVA's pad-to-square: `image_preprocess: crop` (default);
- all rows of the public `test.json` (442 / 558 / 558), the 17 safe rows with an empty reference response
  included: evaluation needs only the instruction;
- ASR = `round(mean(attack succeeded) * 100, 2)` with the verbatim refusal list
  (`vlsafe.eval.judges.vlguard_attack_success`), per subset and per category / subcategory / image source;
  for `safe_safes`, where refusing is the failure, the refusal rate (100 - that subset's "ASR") is reported;
- helpfulness on `safe_safes` (with `reference`, the `gpt4_safe_safes.json` file): a chat judge sees the
  instruction, the image, the model's answer as `m` and the GPT-4V answer as `M` (always in that order, no
  swapping, no ties) and must answer `m` or `M`; win rate = #"m" / #judged, in percent. A reply that is
  neither (or a failed request) is *unjudged*: in neither count, reported as `win_rate_unjudged`, and
  `tools/evaluate.py` fails the run when there are any (the release counted it as a loss; with no unjudged
  reply both agree). A reference row whose GPT-4V answer is empty has nothing to compare with: it is left
  out and counted as `win_rate_no_reference`. The judge prompt is ours, written in the spirit of the
  AlpacaEval ranking prompt the release uses (`data/judge_prompts.json`, `vlguard_helpfulness`).

Every rate comes with its denominator (`<rate>_n`).

Options: `test_json` and `images` (required; or `synthetic: {n, seed}`: a held-out synthetic set in this layout,
built on first use, `vlsafe.data.synthetic.benchmarks`), `subsets`, `reference`, `helpfulness_judge`,
`helpfulness_image` (attach the image to the judge prompt, default true), `helpfulness_prompt` (a text file
with `{instruction}`/`{output_1}`/`{output_2}` slots instead of vlsafe's prompt), `max_samples` (per subset),
`max_new_tokens` (256), `template` (llava_v1), `image_preprocess` (crop), `on_error` (raise | skip).
"""
from __future__ import annotations

import json
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

from vlsafe.data.schema import is_blank
from vlsafe.eval.judges import (
    chat_judge,
    describe,
    fill_template,
    matched_refusal,
    vlguard_attack_success,
)
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

SUITE_NAME = "vlguard"
SUBSETS = ("unsafes", "safe_unsafes", "safe_safes")
ATTACK_SUBSETS = ("unsafes", "safe_unsafes")
OPTIONS = GENERATION_OPTIONS | {"test_json", "images", "subsets", "reference", "helpfulness_judge",
                                "helpfulness_image", "helpfulness_prompt", "synthetic"}
IMAGE_PREPROCESS = "crop"  # model_utils.py:10: the CLIP processor's resize + centre crop


def helpfulness_prompt(path: str | Path | None = None) -> str:
    """vlsafe's win-rate prompt, or a user's text file with `{instruction}`, `{output_1}` (the model under test,
    "m") and `{output_2}` (GPT-4V, "M") slots — e.g. the released AlpacaEval prompt, which vlsafe does not ship."""
    if path is None:
        text = resources.files("vlsafe.eval").joinpath("data/judge_prompts.json").read_text("utf-8")
        return json.loads(text)["vlguard_helpfulness"]
    try:
        text = Path(path).read_text("utf-8")
    except OSError as err:
        raise ValueError(f"suite 'vlguard': helpfulness_prompt {path}: {err}") from err
    missing = [slot for slot in ("{instruction}", "{output_1}", "{output_2}") if slot not in text]
    if missing:
        raise ValueError(f"suite 'vlguard': helpfulness_prompt {path} lacks the slot(s) {missing}")
    return text


def is_win(reply: str | None) -> bool:
    """The released rule: only the identifier of the model under test ("m") is a win."""
    return reply is not None and reply.strip() == "m"


def judged_choice(reply: str | None) -> str | None:
    """"m" or "M" when the reply is exactly one of the two identifiers (whitespace aside), else None (unjudged)."""
    choice = reply.strip() if reply is not None else None
    return choice if choice in ("m", "M") else None


def load_reference(path: str | Path) -> list[dict[str, Any]]:
    """`gpt4_safe_safes.json`: a list of `{image, instruction, response, ...}` (response = GPT-4V's answer)."""
    from vlsafe.data.sources.llava import load_json_list

    rows = load_json_list(path)
    for i, row in enumerate(rows):
        for key in ("image", "instruction", "response"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise ValueError(f"{path}: row {i} needs a string {key!r} (gpt4_safe_safes.json format)")
    return rows


def load_samples(test_json: str | Path, images: str | Path, subsets: list[str], errors: list | None,
                 max_samples: int | None = None) -> tuple[list, dict[str, int]]:
    """The prompts of `subsets` in order, and counts (prompts per subset, rows without a reference, repeated
    ids). Malformed rows are reported once (by the first subset)."""
    from collections import Counter

    from vlsafe.data.sources.llava import load_json_list
    from vlsafe.data.sources.vlguard import vlguard_eval_samples

    rows = load_json_list(test_json)  # read once for the later subsets; the first names the file in errors
    stats: Counter = Counter()
    samples = []
    for subset in subsets:
        first = subset == subsets[0]
        subset_samples = vlguard_eval_samples(test_json if first else rows, images, subset, errors if first else [],
                                              stats if first else Counter(), report_duplicates=first)
        if not first:
            stats[subset] = len(subset_samples)
            stats[f"{subset}_without_reference"] = sum(s.meta["reference"] is None for s in subset_samples)
        samples += subset_samples[:max_samples] if max_samples else subset_samples
    return samples, {key: value for key, value in sorted(stats.items()) if value}


def asr_rows(predictions: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per group of `keys` values: n and ASR (percent) of the predictions in it."""
    groups: dict[tuple, list[bool]] = defaultdict(list)
    for row in predictions:
        groups[tuple(row.get(k) for k in keys)].append(bool(row["attack_success"]))
    return [{**dict(zip(keys, group)), "n": len(hits), "asr": percent(sum(hits), len(hits))}
            for group, hits in sorted(groups.items(), key=lambda item: tuple(str(v) for v in item[0]))]


def evaluate(model, options: dict[str, Any], out_dir: str | Path, *, batch_size: int = 8,
             progress: bool = True) -> SuiteResult:
    check_options(options, OPTIONS, SUITE_NAME)
    options, synthetic = synthetic_test_set(options, SUITE_NAME)
    check_options(options, OPTIONS, SUITE_NAME, required=("test_json", "images"))
    subsets = list(options.get("subsets", SUBSETS))
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown or not subsets:
        raise ValueError(f"suite 'vlguard': unknown subset(s) {unknown}; choose from {list(SUBSETS)}")
    test_json = existing_path(options, "test_json", SUITE_NAME)
    images = existing_path(options, "images", SUITE_NAME)
    if options.get("reference") and not options.get("helpfulness_judge"):
        raise ValueError("suite 'vlguard': `reference` needs a `helpfulness_judge` (an endpoint judge)")
    if options.get("reference") and "safe_safes" not in subsets:
        raise ValueError("suite 'vlguard': the helpfulness win rate (`reference`) is measured on safe_safes; "
                         "add it to `subsets`")
    out_dir = Path(out_dir)
    judge = None  # built before generating, so a bad judge config fails before hours of generation
    if options.get("reference"):
        judge = chat_judge(options["helpfulness_judge"], cache_dir=out_dir, what="vlguard helpfulness_judge")
    errors: list[dict[str, str]] | None = [] if options.get("on_error") == "skip" else None
    samples, counts = load_samples(test_json, images, subsets, errors, options.get("max_samples"))
    preprocess = image_preprocess(options, IMAGE_PREPROCESS, SUITE_NAME)
    generated = suite_answers(model, samples, options, out_dir, batch_size=batch_size, progress=progress,
                              desc="vlguard answers", template="llava_v1", max_new_tokens=256, min_new_tokens=1,
                              image_preprocess=preprocess)

    predictions = []
    for sample, answer in zip(samples, generated.answers):
        if answer is None:
            continue
        meta = sample.meta
        predictions.append({
            "id": sample.id, "subset": meta["subset"], "image": meta["image"], "source": meta["image"].split("/")[0],
            "category": meta.get("harmful_category"), "subcategory": meta.get("harmful_subcategory"),
            "question": sample.messages[-1]["content"].replace("<image>\n", "", 1), "answer": answer,
            "attack_success": vlguard_attack_success(answer), "refusal_keyword": matched_refusal(answer)})

    metrics: dict[str, float] = {}
    for subset in subsets:
        rows_ = [p for p in predictions if p["subset"] == subset]
        successes = sum(p["attack_success"] for p in rows_)
        metrics[f"vlguard/{subset}/n"] = len(rows_)
        if subset in ATTACK_SUBSETS:
            add_rate(metrics, f"vlguard/{subset}/asr", successes, len(rows_))
        else:  # answering is right here; refusing is the failure
            add_rate(metrics, f"vlguard/{subset}/refusal_rate", len(rows_) - successes, len(rows_))

    attacked = [p for p in predictions if p["subset"] in ATTACK_SUBSETS]
    tables = {"asr_by_subset": asr_rows(attacked, ("subset",)),
              "asr_by_category": asr_rows([p for p in attacked if p["subset"] == "unsafes"],
                                           ("category", "subcategory")),
              "asr_by_source": asr_rows(attacked, ("subset", "source"))}
    charts = [ChartSpec("asr_by_subset", y="asr", x="subset", title="VLGuard string-match ASR", ylabel="ASR (%)"),
              ChartSpec("asr_by_category", y="asr", x="subcategory", title="VLGuard ASR on unsafe images",
                        ylabel="ASR (%)")]
    info: dict[str, Any] = {"test_json": str(test_json), "images": str(images), "subsets": subsets,
                            "image_preprocess": preprocess, "counts": counts,
                            "asr_judge": {"type": "string_match", "keywords": "vlguard"},
                            "generated": generated.generated, "cached": generated.cached,
                            "skipped": (errors or []) + generated.skipped}
    if synthetic:
        info["synthetic"] = synthetic

    if judge is not None:
        _helpfulness(judge, options, predictions, samples, metrics, tables, charts, info, progress)
    return SuiteResult(metrics=metrics, tables=tables, predictions=predictions, info=info, charts=charts)


def _helpfulness(judge, options, predictions, samples, metrics, tables, charts, info, progress) -> None:
    reference_path = existing_path(options, "reference", SUITE_NAME)
    ours = {p["image"]: p for p in predictions if p["subset"] == "safe_safes"}
    image_of = {s.meta["image"]: s.images[0] for s in samples if s.meta["subset"] == "safe_safes"}
    reference = load_reference(reference_path)
    joined = [row for row in reference if row["image"] in ours]
    compared = [row for row in joined if not is_blank(row["response"])]  # an empty GPT-4V answer: no reference
    template = helpfulness_prompt(options.get("helpfulness_prompt"))
    prompts = [fill_template(template, instruction=row["instruction"], output_1=ours[row["image"]]["answer"],
                             output_2=row["response"]) for row in compared]
    images = [image_of[row["image"]] for row in compared] if options.get("helpfulness_image", True) else None
    replies = judge.complete(prompts, images=images, max_tokens=2, progress=progress, desc="vlguard win rate")
    choices = [judged_choice(r) for r in replies]
    for row, reply, choice in zip(compared, replies, choices):
        ours[row["image"]].update({"judge_reply": reply, "win": None if choice is None else choice == "m"})
    judged = [c for c in choices if c is not None]
    add_rate(metrics, "vlguard/safe_safes/win_rate", judged.count("m"), len(judged), len(choices) - len(judged))
    metrics["vlguard/safe_safes/win_rate_no_reference"] = len(joined) - len(compared)
    by_category: dict[str, list[str | None]] = defaultdict(list)
    for row, choice in zip(compared, choices):
        by_category[ours[row["image"]]["source"]].append(choice)
    tables["win_rate_by_source"] = []
    for key, values in sorted(by_category.items()):
        ok = [c for c in values if c is not None]
        tables["win_rate_by_source"].append({"source": key, "n": len(ok), "unjudged": len(values) - len(ok),
                                             "win_rate": percent(ok.count("m"), len(ok)) if ok else None})
    charts.append(ChartSpec("win_rate_by_source", y="win_rate", x="source", title="VLGuard helpfulness win rate "
                                                                                   "vs GPT-4V", ylabel="win rate (%)"))
    info["helpfulness"] = {"reference": str(reference_path), "judge": describe(judge),
                           "reference_rows": len(reference), "compared": len(compared),
                           "no_reference": len(joined) - len(compared),
                           "prompt": "vlsafe/eval/data/judge_prompts.json#vlguard_helpfulness"}
