"""Object hallucination on the synthetic world: does the model say "yes" to objects that are not there?

LRV-Instruction's finding is that instruction data made only of *positive* instructions (every question is
about something in the image) teaches a model to agree: asked "Is there a red square?" it says "yes"
whether or not there is one. This module measures that, on questions whose truth is known exactly:

- **yes-rate on absent objects** (`yes_rate_absent`): among existence questions ("Is there a {color}
  {shape}?") about a colour-shape combination that is *not* in the image, the share of greedy answers whose
  first word is "yes". Lower is better; a model that always agrees scores 1.0.
- **accuracy on present objects** (`accuracy_present`): the same question about a combination that *is*
  in the image, answered "yes". A model that always says "no" would get a perfect yes-rate and 0 here, so
  the two are reported together (and `balanced_accuracy` is their mean of correct answers).
- **false-premise acceptance** (`false_premise_acceptance`): among LRV-style negative instructions (the
  world's `negative` kind: a nonexistent object, a wrong attribute, wrong knowledge), the share of answers
  that do not reject the premise, i.e. contain neither "no" nor "not" as a word. Reported per negative task.

Scoring is a pure function of (samples, answers) (`score_hallucination`), so it is tested without a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from vlsafe.data.schema import Sample
from vlsafe.data.synthetic.world import WorldConfig, generate
from vlsafe.eval.answers import greedy_answers, normalise_answer
from vlsafe.monitoring.callbacks import BeforeAfterEvaluation

REJECTION_WORDS = frozenset({"no", "not"})


def is_yes(answer: str) -> bool:
    """The answer's first word is "yes" ("Yes.", "yes, there is" count; "yesterday" does not)."""
    words = normalise_answer(answer).split()
    return bool(words) and words[0] == "yes"


def rejects_premise(answer: str) -> bool:
    """The answer denies something: "There is no ...", "The square is red, not blue.", "No"."""
    return not REJECTION_WORDS.isdisjoint(normalise_answer(answer).split())


def existence_truth(sample: Sample) -> bool | None:
    """True/False for an existence question about a present/absent object, None for anything else."""
    meta = sample.meta
    if meta.get("task") != "exists" or meta.get("answer") not in ("yes", "no"):
        return None
    return meta["answer"] == "yes"


def is_false_premise(sample: Sample) -> bool:
    return sample.meta.get("kind") == "negative"


@dataclass
class HallucinationReport:
    absent: int = 0
    absent_yes: int = 0
    present: int = 0
    present_yes: int = 0
    false_premise: int = 0
    false_premise_accepted: int = 0
    per_task: dict[str, list[int]] = field(default_factory=dict)  # negative task -> [accepted, n]

    @property
    def yes_rate_absent(self) -> float:
        return self.absent_yes / max(self.absent, 1)

    @property
    def accuracy_present(self) -> float:
        return self.present_yes / max(self.present, 1)

    @property
    def balanced_accuracy(self) -> float:
        return ((1 - self.yes_rate_absent) + self.accuracy_present) / 2

    @property
    def false_premise_acceptance(self) -> float:
        return self.false_premise_accepted / max(self.false_premise, 1)

    def summary(self) -> str:
        tasks = ", ".join(f"{t} {a}/{n}" for t, (a, n) in sorted(self.per_task.items()))
        return (f"yes-rate on absent objects {self.yes_rate_absent:.3f} (n={self.absent}); accuracy on present "
                f"objects {self.accuracy_present:.3f} (n={self.present}); false-premise acceptance "
                f"{self.false_premise_acceptance:.3f} (n={self.false_premise}; {tasks})")

    def as_dict(self) -> dict[str, float]:
        return {"yes_rate_absent": self.yes_rate_absent, "accuracy_present": self.accuracy_present,
                "balanced_accuracy": self.balanced_accuracy, "false_premise_acceptance": self.false_premise_acceptance,
                "n_absent": self.absent, "n_present": self.present, "n_false_premise": self.false_premise}


def score_hallucination(samples: Sequence[Sample],
                        answers: Sequence[str]) -> tuple[HallucinationReport, list[dict[str, Any]]]:
    """Score answers to existence and false-premise questions; other samples are ignored.

    Returns the report and one record per scored sample (id, question type, answer, verdict).
    """
    if len(samples) != len(answers):
        raise ValueError(f"{len(samples)} samples but {len(answers)} answers")
    report, records = HallucinationReport(), []
    for sample, answer in zip(samples, answers):
        truth = existence_truth(sample)
        if truth is not None:
            said_yes = is_yes(answer)
            if truth:
                report.present += 1
                report.present_yes += said_yes
            else:
                report.absent += 1
                report.absent_yes += said_yes
            records.append({"id": sample.id, "type": "present" if truth else "absent", "answer": answer,
                            "said_yes": said_yes, "correct": said_yes == truth})
        elif is_false_premise(sample):
            accepted = not rejects_premise(answer)
            report.false_premise += 1
            report.false_premise_accepted += accepted
            counts = report.per_task.setdefault(str(sample.meta.get("task")), [0, 0])
            counts[0] += accepted
            counts[1] += 1
            records.append({"id": sample.id, "type": f"false_premise/{sample.meta.get('task')}", "answer": answer,
                            "accepted_premise": accepted, "correct": not accepted})
    return report, records


def hallucination_samples(n_existence: int, n_false_premise: int, *, seed: int = 0, split: str = "heldout",
                          cfg=None) -> list[Sample]:
    """Held-out questions: `n_existence` existence questions from the world's `qa` kind (present/absent about
    50/50 by construction) and `n_false_premise` `negative`-kind instructions."""

    cfg = cfg or WorldConfig()
    existence: list[Sample] = []
    start = 0
    while len(existence) < n_existence:
        batch = list(generate(max(64, 4 * (n_existence - len(existence))), seed=seed, kinds=["qa"], cfg=cfg,
                              split=split, start=start))
        start += len(batch)
        existence += [s for s in batch if existence_truth(s) is not None]
    negatives = list(generate(n_false_premise, seed=seed, kinds=["negative"], cfg=cfg, split=f"{split}-negative"))
    return existence[:n_existence] + negatives


def evaluate_hallucination(vlm, processor, samples: Iterable[Sample], *, batch_size: int = 16,
                           max_new_tokens: int = 16) -> HallucinationReport:
    """Greedy answers to `samples` (see `hallucination_samples`), scored by `score_hallucination`."""

    samples = list(samples)
    was_training = vlm.training
    vlm.eval()
    try:
        answers = greedy_answers(vlm, processor, samples, batch_size, max_new_tokens)
    finally:
        vlm.train(was_training)
    return score_hallucination(samples, answers)[0]


class HallucinationRate(BeforeAfterEvaluation):
    """Print and log the held-out hallucination numbers before and after training (demo recipes).

    Logs `heldout/yes_rate_absent`, `heldout/accuracy_present` and `heldout/false_premise_acceptance`, and
    writes `<log_dir>/hallucination.json`.
    """

    results_file = "hallucination.json"

    def __init__(self, n_existence: int = 200, n_false_premise: int = 60, batch_size: int = 16,
                 max_new_tokens: int = 16):
        super().__init__()
        self.n_existence, self.n_false_premise = n_existence, n_false_premise
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def evaluate(self, trainer, module):
        samples = hallucination_samples(self.n_existence, self.n_false_premise)
        report = evaluate_hallucination(module.vlm, module.processor, samples, batch_size=self.batch_size,
                                        max_new_tokens=self.max_new_tokens)
        return report, report.as_dict(), {f"heldout/{k}": float(v) for k, v in report.as_dict().items()
                                          if not k.startswith("n_")}
