"""tools/export.py on a plain single-file Lightning checkpoint, and its refusals of bad input."""
from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from tests.scale.conftest import export, hf_logits


def test_lightning_checkpoint_exports_to_transformers_with_identical_logits(lightning_checkpoint, tmp_path):
    path, expected = lightning_checkpoint
    assert export([str(path), "--out", str(tmp_path / "hf")]) == 0
    model, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    theirs = hf_logits(model.float().eval(), expected)[..., :expected["logits"].shape[-1]]
    assert (theirs - expected["logits"]).abs().max() < 1e-5
    assert expected["logits"].abs().max() > 0.1


def test_help_and_bad_inputs_exit_non_zero_with_the_reason(lightning_checkpoint, tmp_path, capsys):
    path, _ = lightning_checkpoint
    with pytest.raises(SystemExit) as info:
        export(["--help"])
    assert info.value.code == 0 and "--lora" in capsys.readouterr().out

    assert export([str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.ckpt: no such checkpoint" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    assert export([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "neither a distributed checkpoint" in capsys.readouterr().err

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, foreign)
    assert export([str(foreign), "--out", str(tmp_path / "o")]) == 2
    assert "not a vlsafe checkpoint" in capsys.readouterr().err

    state = torch.load(path, weights_only=True)
    del state["state_dict"]["vlm.projector.0.weight"]
    truncated = tmp_path / "truncated.ckpt"
    torch.save(state, truncated)
    assert export([str(truncated), "--out", str(tmp_path / "o")]) == 2
    assert "missing ['projector.0.weight']" in capsys.readouterr().err

    assert export([str(path), "--out", str(tmp_path / "o"), "--lora", "adapter"]) == 2
    assert "has no LoRA adapter" in capsys.readouterr().err
