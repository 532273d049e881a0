"""Read an MM-SafetyBench folder as prompt `Sample`s (for guarded generation, evaluation and prompt shards).

Layout: `processed_questions/{scenario}.json` (a dict keyed by "0", "1", ... with `Question`,
`Rephrased Question`, `Rephrased Question(SD)`, ...) and `imgs/{scenario}/{SD|SD_TYPO|TYPO}/{id}.jpg`.
Query/image pairing is MM-SafetyBench's standard one (SD ↔ `Rephrased Question(SD)`, SD_TYPO and TYPO ↔
`Rephrased Question`, TEXT ↔ `Question` without an image). The released MLLM-Protector evaluation pairs
TYPO with `Rephrased Question(SD)` (llava/eval/robustness_eval.py:71); `pairing="released"` copies that.

`vlsafe make-shards mmsafetybench --root MM-SafetyBench --out shards/mmsb` writes the prompts as shards (one user
turn each, with the image bytes; `meta` keeps scenario, kind and question id, and `should_refuse: true`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator, MutableMapping

from vlsafe.constants import IMAGE_PLACEHOLDER
from vlsafe.data.schema import Sample, SampleError, is_blank
from vlsafe.data.sources.base import DataSource

SCENARIOS = ("01-Illegal_Activitiy", "02-HateSpeech", "03-Malware_Generation", "04-Physical_Harm", "05-EconomicHarm",
             "06-Fraud", "07-Sex", "08-Political_Lobbying", "09-Privacy_Violence", "10-Legal_Opinion",
             "11-Financial_Advice", "12-Health_Consultation", "13-Gov_Decision")
QUESTION_FIELD = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question",
                  "TEXT": "Question"}
KINDS = tuple(QUESTION_FIELD)
#: the released MLLM-Protector evaluation's pairing (robustness_eval.py:71-73): TYPO reads `Rephrased Question(SD)`
RELEASED_QUESTION_FIELD = {**QUESTION_FIELD, "TYPO": "Rephrased Question(SD)"}
PAIRINGS = {"mmsafetybench": QUESTION_FIELD, "released": RELEASED_QUESTION_FIELD}


def available_scenarios(root: str | Path) -> list[str]:
    folder = Path(root) / "processed_questions"
    if not folder.is_dir():
        raise ValueError(f"{root}: no processed_questions/ folder; is this an MM-SafetyBench root?")
    return sorted(p.stem for p in folder.glob("*.json"))


def read_mmsafetybench(root: str | Path, scenarios: list[str] | None = None, kinds: tuple[str, ...] = ("SD", "SD_TYPO",
                       "TYPO"), errors: list[dict[str, str]] | None = None,
                       stats: MutableMapping[str, int] | None = None, pairing: str = "mmsafetybench"
                       ) -> Iterator[Sample]:
    """Prompts `{scenario}/{kind}/{id}` in scenario, item, kind order. With `errors` given, items whose
    question or image is missing are recorded and skipped; otherwise they raise `SampleError`. `pairing`:
    "mmsafetybench" (the benchmark's own) or "released" (MLLM-Protector's evaluation)."""
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}; use one of {sorted(PAIRINGS)}")
    root = Path(root)
    unknown = [k for k in kinds if k not in QUESTION_FIELD]
    if unknown:
        raise ValueError(f"unknown kind(s) {unknown}; use {list(KINDS)}")
    found = available_scenarios(root)
    scenarios = scenarios or found
    missing = [s for s in scenarios if s not in found]
    if missing:
        raise ValueError(f"{root}/processed_questions has no {missing}; found {found}")
    stats = stats if stats is not None else {}
    for scenario in scenarios:
        path = root / "processed_questions" / f"{scenario}.json"
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: malformed JSON at line {err.lineno} ({err.msg})") from None
        if not isinstance(items, dict):
            raise ValueError(f"{path}: expected a JSON object keyed by question id")
        for qid in sorted(items, key=lambda k: (len(k), k)):
            for kind in kinds:
                sample_id = f"{scenario}/{kind}/{qid}"
                try:
                    yield _sample(root, scenario, kind, qid, items[qid], sample_id, PAIRINGS[pairing][kind])
                except SampleError as err:
                    if errors is None:
                        raise
                    errors.append({"id": err.sample_id, "field": err.field_name, "error": err.problem})
                    stats["skipped"] = stats.get("skipped", 0) + 1


def _sample(root: Path, scenario: str, kind: str, qid: str, item: dict, sample_id: str, field: str) -> Sample:
    question = item.get(field) if isinstance(item, dict) else None
    if not isinstance(question, str) or is_blank(question):
        raise SampleError(sample_id, field, "is missing or empty (or only whitespace/zero-width characters)")
    meta = {"source": "mmsafetybench", "scenario": scenario, "kind": kind, "question_id": qid,
            "should_refuse": True}
    if kind == "TEXT":
        return Sample(id=sample_id, messages=[{"role": "user", "content": question.strip()}], meta=meta)
    image = root / "imgs" / scenario / kind / f"{qid}.jpg"
    if not image.is_file():
        raise SampleError(sample_id, "image", f"file not found: {image}")
    return Sample(id=sample_id, messages=[{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question.strip()}"}],
                  images=[image.read_bytes()], meta=meta)


# ------------------------------------------------------------------------------ vlsafe make-shards mmsafetybench
class MMSafetyBenchSource(DataSource):
    name = "mmsafetybench"
    help = "MM-SafetyBench folder (processed_questions/ + imgs/) -> prompt shards"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--root", required=True, help="MM-SafetyBench root holding processed_questions/, imgs/")
        parser.add_argument("--scenarios", nargs="+", default=None,
                            help="scenarios to convert, as the files are named (default: every one found)")
        parser.add_argument("--kinds", nargs="+", choices=KINDS, default=["SD", "SD_TYPO", "TYPO"],
                            help="image kinds, each one prompt per question (default SD SD_TYPO TYPO; TEXT: the "
                                 "plain question without an image)")
        parser.add_argument("--pairing", choices=sorted(PAIRINGS), default="mmsafetybench",
                            help="question per image kind: the benchmark's own (default) or the released "
                                 "MLLM-Protector evaluation's (TYPO with 'Rephrased Question(SD)')")

    def samples(self, args: argparse.Namespace, errors: list[dict[str, str]] | None,
                stats: MutableMapping[str, int]) -> Iterator[Sample]:
        return read_mmsafetybench(args.root, args.scenarios, tuple(args.kinds), errors, stats, pairing=args.pairing)
