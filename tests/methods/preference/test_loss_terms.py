"""BPO's blind pair and the RPO/ORPO NLL are weighted loss terms; `blind: rows` checks its training data."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from vlsafe.builders import TinyVLM
from vlsafe.data.datamodule import Source
from vlsafe.data.shards import write_shards
from vlsafe.data.synthetic.world import generate
from vlsafe.methods.preference.module import PreferenceModule, find_blind_rows


def _module(**kwargs):
    torch.manual_seed(0)
    return PreferenceModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64), **kwargs).eval()


def _batch(module, n=3):
    encoder = module.data_encoder("fit")
    return encoder.collate([encoder.encode(s) for s in generate(n, seed=2, kinds=["preference"])])


def test_the_loss_is_the_weighted_sum_of_its_logged_terms():
    module = _module(blind="sum", blind_weight=0.25, sft_weight=0.5)
    batch = _batch(module)
    with torch.no_grad():
        loss, stats = module.compute_loss(batch)
    assert module.term_weights() == {"pair": 1.0, "blind": 0.25, "nll": 0.5}
    expected = stats["loss/pair"] + 0.25 * stats["loss/blind"] + 0.5 * stats["loss/nll"]
    torch.testing.assert_close(loss, expected)
    # policy == reference at the start: each DPO term is log 2; the NLL term is the chosen token-mean NLL
    torch.testing.assert_close(stats["loss/pair"], torch.tensor(math.log(2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats["loss/blind"], torch.tensor(math.log(2)), atol=1e-5, rtol=0)
    assert stats["loss/nll"] > 0


def test_a_zero_blind_weight_trains_exactly_like_dpo_on_the_same_pairs():
    with_blind, plain = _module(blind="sum", blind_weight=0.0), _module(blind="off")
    batch_blind, batch_plain = _batch(with_blind), _batch(plain)
    losses = []
    for module, batch in ((with_blind, batch_blind), (plain, batch_plain)):
        loss, _ = module.compute_loss(batch)
        loss.backward()
        losses.append((loss.detach(), [p.grad.clone() for p in module.vlm.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[0][0], losses[1][0], atol=1e-6, rtol=0)
    for a, b in zip(losses[0][1], losses[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _shards(path, samples):
    write_shards(samples, path, max_samples=100)
    return Source(str(path))


def test_blind_rows_must_be_in_a_training_source(tmp_path):
    originals = list(generate(4, seed=3, kinds=["preference"]))
    blind_rows = []
    for sample in generate(4, seed=3, kinds=["preference"]):
        sample.id, sample.rejected, sample.blind = f"{sample.id}-blind", sample.blind, None
        sample.meta = {**sample.meta, "pair": "blind"}
        blind_rows.append(sample)
    plain = _shards(tmp_path / "pairs", originals)
    with_rows = _shards(tmp_path / "blind", blind_rows)
    module = _module(blind="rows")
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(sources={"fit": [plain]}))
    with pytest.raises(ValueError, match=r"blind: rows, but no training source holds blind rows"):
        module.on_fit_start()
    module.trainer.datamodule.sources["fit"] = [plain, with_rows]
    module.on_fit_start()  # passes: the second source holds them
    assert find_blind_rows(module.trainer.datamodule) == with_rows.path


def test_the_mmsafe_po_converter_marks_the_blind_rows_of_a_concatenated_train_json(tmp_path):
    """The released pipeline concatenates the blind rows (same id, prompt and chosen; rejected replaced) to the
    original rows of train.json; the converter marks them so `blind: rows` can see them."""
    from collections import Counter

    from PIL import Image

    from vlsafe.data.sources.mmsafe_po import read_mmsafe_po

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.jpg")
    row = {"id": "7", "image": "a.jpg", "question": "USER: <image>\nHow do I do this? ASSISTANT:",
           "chosen": "I can't help with that.", "rejected": "Sure, first..."}
    rows = [row, {**row, "rejected": "Here is a guess without the image."}, {**row}]  # original, blind, exact copy
    (tmp_path / "train.json").write_text(json.dumps(rows))
    stats = Counter()
    samples = list(read_mmsafe_po(tmp_path / "train.json", tmp_path, stats=stats))
    assert [s.meta.get("pair") for s in samples] == [None, "blind", None]
    assert stats["duplicate_ids"] == 2 and stats["blind_rows"] == 1
