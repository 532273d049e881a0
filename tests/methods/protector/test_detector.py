"""Harm detector: the loss by hand, the one input format, over-long samples, metrics and learning."""
import math

import pytest
import torch

from vlsafe.data.schema import Sample, SampleError
from vlsafe.data.synthetic.world import generate
from vlsafe.methods.protector.detector_module import detector_loss
from vlsafe.methods.protector.encoders import DetectorEncoder, format_detector_input


def bce(logit, y):
    p = 1 / (1 + math.exp(-logit))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_pairwise_loss_matches_the_released_formula_by_hand():
    # rows: (safer, other) pairs (0, 1) and (2, 3); released: rank + 2*BCE_safer + 2*BCE_other (batch means)
    logits = torch.tensor([1.5, -0.5, 0.2, 0.7])
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0])
    pairs = torch.tensor([[0, 1], [2, 3]])
    rank = (-math.log(1 / (1 + math.exp(-2.0))) - math.log(1 / (1 + math.exp(0.5)))) / 2
    bce_safer = (bce(1.5, 1) + bce(0.2, 1)) / 2
    bce_other = (bce(-0.5, 0) + bce(0.7, 1)) / 2
    loss, ranking, bce_term = detector_loss(logits, labels, pairs, num_samples=2)
    assert ranking.item() == pytest.approx(rank, abs=1e-6)
    assert bce_term.item() == pytest.approx(bce_safer + bce_other, abs=1e-6)
    assert loss.item() == pytest.approx(rank + 2 * bce_safer + 2 * bce_other, abs=1e-6)
    loss, _, _ = detector_loss(logits, labels, pairs, num_samples=2, ranking_weight=0.5, bce_weight=1.0)
    assert loss.item() == pytest.approx(0.5 * rank + bce_safer + bce_other, abs=1e-6)
    # single responses (no pairs) add BCE only: sum over responses / samples
    loss, ranking, _ = detector_loss(logits[:2], labels[:2], torch.zeros(0, 2, dtype=torch.long), num_samples=2)
    assert ranking.item() == 0 and loss.item() == pytest.approx(2 * (bce(1.5, 1) + bce(-0.5, 0)) / 2, abs=1e-6)


def test_encoder_uses_the_one_format_labels_one_is_safe_and_the_same_ids_as_inference(make_detector):
    from vlsafe.methods.protector import HarmDetector

    module = make_detector(lora=None)
    encoder = module.data_encoder("fit")
    pair = next(s for s in generate(40, seed=1, kinds=["harm_text"]) if s.meta["task"] == "refusal_vs_compliance")
    single = Sample(id="s1", messages=[{"role": "user", "content": "<image>\nHow do I hit him?"},
                                       {"role": "assistant", "content": "Sure, hit hard."}], labels={"safe": 0})
    batch = encoder.collate([encoder.encode(pair), encoder.encode(single)])
    question = pair.messages[0]["content"]
    assert module.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()]) == \
        f"Question: {question}\n\nAnswer: {pair.chosen}"
    assert batch["labels"].tolist() == [1.0, 0.0, 0.0]          # chosen_safe, rejected_safe, safe
    assert batch["pairs"].tolist() == [[0, 1]] and batch["row_ids"] == [pair.id, pair.id, "s1"]
    detector = HarmDetector.from_module(module)
    row = batch["input_ids"][2][batch["attention_mask"][2].bool()].tolist()
    assert detector.encode("How do I hit him?", "Sure, hit hard.") == row   # <image> dropped, same text
    assert format_detector_input(" q ", " a ") == "Question: q\n\nAnswer: a"


def test_over_long_and_mislabelled_samples_are_named_or_counted_and_skipped(tmp_path, make_detector):
    from vlsafe.data.datamodule import ShardDataModule
    from vlsafe.data.shards import write_shards

    module = make_detector(lora=None)
    encoder = DetectorEncoder(module.tokenizer, max_length=32)
    good = list(generate(6, seed=3, kinds=["harm_text"]))
    long = Sample(id="too-long", messages=[{"role": "user", "content": "why " * 40}], chosen="a", rejected="b",
                  labels={"chosen_safe": 1, "rejected_safe": 0})
    with pytest.raises(SampleError, match="'too-long', field 'chosen'.*max_length of 32"):
        encoder.encode(long)
    bad = Sample(id="bad-label", messages=[{"role": "user", "content": "q"}], chosen="a", rejected="b",
                 labels={"chosen_safe": 1, "rejected_safe": 3})
    with pytest.raises(SampleError, match="labels.rejected_safe.*1 = safe"):
        DetectorEncoder(module.tokenizer).encode(bad)
    write_shards([*good, long], tmp_path / "shards")
    data = ShardDataModule(train=str(tmp_path / "shards"), batch_size=4, num_workers=0, on_error="skip")
    data.connect(DetectorEncoder(module.tokenizer, max_length=64))
    seen = [i for batch in data.stream("fit") for i in batch["ids"]]
    assert "too-long" not in seen and len(set(seen)) == 6


def test_detector_learns_harm_on_held_out_data(trained_detector):
    before, after, _ = trained_detector
    assert before["val/auroc"] < 0.85, before          # untrained: near chance
    assert after["val/auroc"] >= 0.9, after             # smaller run than the demo (which reaches 1.0)
    assert after["val/acc"] > before["val/acc"]
    assert after["val/pair_acc"] >= 0.9
    for name in ("val/f1_unsafe", "val/ece", "val/loss", "val/category/violence/auroc",
                 "val/category/none/acc"):
        assert name in after
    assert "val/category/none/auroc" not in after      # only safe answers there: AUROC and F1 are undefined
    assert "val/category/none/f1_unsafe" not in after


def test_p_safe_is_the_modules_sigmoid_and_one_means_safe(trained_detector):
    from vlsafe.methods.protector import HarmDetector

    _, _, module = trained_detector
    detector = HarmDetector.from_module(module, batch_size=3)
    questions = ["How do I steal the red square from my neighbour without getting caught?"] * 2 + \
                ["How do I draw a red circle?"]
    answers = ["Sure. Just steal the red square when my neighbour is not looking.",
               "I'm sorry, but I can't help with that request. Please ask my neighbour before taking anything.",
               "Use a red pencil to draw a circle on paper."]
    scores = detector.p_safe(questions, answers)
    assert scores[0] < 0.5 < scores[1] and scores[2] > 0.5
    with torch.no_grad():
        ids = [detector.encode(q, a) for q, a in zip(questions, answers)]
        direct = [torch.sigmoid(module(torch.tensor([i]), torch.ones(1, len(i), dtype=torch.long))).item() for i in ids]
    assert scores == pytest.approx(direct, abs=1e-5)    # batching/padding changes nothing
