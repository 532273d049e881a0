"""Security: no unpickling anywhere (weights, checkpoints, shards), no remote code unless a recipe asks,
no shard member or image path that reaches outside its folder."""
import json
from pathlib import Path

import pytest
import torch

from vlsafe.reliability.bad_inputs import _Tripwire
from vlsafe.reliability.unsafe_loads import scan, unsafe_calls

ROOT = Path(__file__).resolve().parents[2]


def test_package_and_tools_load_nothing_unsafely():
    assert scan([ROOT / "vlsafe", ROOT / "tools"]) == []


def test_the_scanner_catches_unsafe_loads():
    bad = ("import torch, pickle\ntorch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\n"
           "from dill import load\nds.decode('pil')\nf(trust_remote_code=True)\nnp.load(f, allow_pickle=True)\n")
    assert len(unsafe_calls(bad)) == 7
    assert unsafe_calls("torch.load(p, weights_only=True)\nb.decode('utf-8')\nf(trust_remote_code=flag)\n") == []


@pytest.fixture
def tripwire(tmp_path):
    """A torch checkpoint whose unpickling would create `marker` (stands in for arbitrary code)."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"vlm": _Tripwire(str(marker))}}, path)
    return path, marker


def test_poisoned_checkpoints_are_refused_not_run(tripwire, tmp_path):
    from vlsafe.core.builders import FromCheckpoint, load_projector_weights
    from vlsafe.core.interop import _load_file

    path, marker = tripwire
    with pytest.raises(Exception, match="[Ww]eights.only|Unsupported global"):
        FromCheckpoint(str(path)).build()
    bin_path = tmp_path / "mm_projector.bin"
    bin_path.write_bytes(path.read_bytes())
    with pytest.raises(Exception, match="[Ww]eights.only|Unsupported global"):
        load_projector_weights(torch.nn.Linear(2, 2), str(bin_path))
    with pytest.raises(Exception, match="[Ww]eights.only|Unsupported global"):
        _load_file(bin_path)
    assert not marker.exists()


def test_cli_ckpt_path_is_read_weights_only(tripwire):
    from vlsafe.cli import main

    path, marker = tripwire
    with pytest.raises(Exception, match="[Ww]eights.only|Unsupported global"):
        main(["validate", "--model", "vlsafe.methods.sft.SFTModule", "--model.vlm", "vlsafe.core.builders.TinyVLM",
              "--data", "vlsafe.data.datamodule.ShardDataModule", "--ckpt_path", str(path)])
    assert not marker.exists()


@pytest.fixture
def remote_code_model(tmp_path):
    """A model folder whose config asks for custom code; importing that code would create `marker`."""
    folder = tmp_path / "remote"
    folder.mkdir()
    marker = tmp_path / "REMOTE_CODE_RAN"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "vlsafe-evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                     "AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return folder, marker


def test_remote_code_is_not_run_by_default(remote_code_model, monkeypatch):
    from vlsafe.core.builders import FromParts, LlavaHF
    from vlsafe.core.vision import VisionTower

    folder, marker = remote_code_model
    tiny = VisionTower.from_open_clip
    monkeypatch.setattr(VisionTower, "from_open_clip", classmethod(lambda cls, *a, **k: tiny(
        vision_cfg={"image_size": 32, "patch_size": 16, "width": 32, "layers": 2, "head_width": 16})))
    with pytest.raises(ValueError, match="trust_remote_code"):
        FromParts(llm=str(folder)).build()
    with pytest.raises(ValueError, match="trust_remote_code"):
        LlavaHF(path=str(folder)).build()
    assert not marker.exists()


def test_trust_remote_code_is_passed_through_only_when_the_recipe_sets_it(monkeypatch):
    import transformers

    from vlsafe.core.builders import FromParts

    seen = []

    def record(name, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record)
    monkeypatch.setattr("vlsafe.core.vision.VisionTower.from_open_clip", classmethod(lambda cls, *a, **k: None))
    for builder in (FromParts(llm="x"), FromParts(llm="x", trust_remote_code=True)):
        with pytest.raises(RuntimeError, match="stop here"):
            builder.build()
    assert seen == [False, True]
    recipes = [p for p in (ROOT / "recipes").rglob("*.yaml") if "trust_remote_code: true" in p.read_text().lower()]
    assert recipes == [], "no shipped recipe turns remote code on"
