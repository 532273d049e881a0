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
    from vlsafe.builders import FromCheckpoint, load_projector_weights
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
        main(["validate", "--model", "vlsafe.methods.sft.SFTModule", "--model.vlm", "vlsafe.builders.TinyVLM",
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
    from vlsafe.builders import FromParts, LlavaHF
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

    from vlsafe.builders import FromParts

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


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving `tmp_path/served`; yields its base URL, stopped afterwards."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_remote_ckpt_path_over_http_never_runs_its_pickle(http_server, tmp_path):
    """Issue 16.1: Lightning loads http(s) checkpoints with weights_only=False; the CLI and Lightning's own
    restore (through vlsafe's checkpoint IO, also `hpc`) must refuse the payload with a named error."""
    import lightning as L

    from vlsafe.cli import main
    from vlsafe.ops.checkpoint_io import AtomicCheckpointIO

    class Linear(L.LightningModule):  # never trains: the restore must fail first
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    folder, url = http_server
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": {}, "global_step": 1, "pytorch-lightning_version": L.__version__,
                "hyper_parameters": {"vlm": _Tripwire(str(marker))}}, folder / "last.ckpt")
    tiny = ["--trainer.callbacks", "[]", "--trainer.logger", "false", "--trainer.default_root_dir",
            str(tmp_path / "run"), "--data.init_args.root", str(tmp_path / "world"), "--data.init_args.train_samples",
            "8", "--data.init_args.val_samples", "0", "--data.init_args.num_workers", "0",
            "--model.init_args.vlm.init_args.hidden_size", "32",
            "--model.init_args.vlm.init_args.intermediate_size", "64"]
    with pytest.raises(Exception, match=r"last\.ckpt: refused: .*pickled objects.*weights_only=True") as cli_error:
        main(["fit", "--config", str(ROOT / "recipes/demo/sft.yaml"), *tiny, "--ckpt_path", f"{url}/last.ckpt"])
    assert type(cli_error.value).__name__ == "CheckpointLoadError"
    assert not marker.exists()

    # Lightning's own load (what ran the payload before): a remote path and `hpc` both reach vlsafe's reader
    (tmp_path / "root").mkdir()
    (tmp_path / "root/hpc_ckpt_1.ckpt").write_bytes((folder / "last.ckpt").read_bytes())
    for ckpt_path in (f"{url}/last.ckpt", "hpc"):
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, plugins=[AtomicCheckpointIO()],
                            default_root_dir=tmp_path / "root")
        with pytest.raises(Exception, match="refused: .*pickled objects") as fit_error:
            trainer.fit(Linear(), ckpt_path=ckpt_path)
        assert type(fit_error.value).__name__ == "CheckpointLoadError"
        assert not marker.exists(), f"the payload ran when Lightning loaded ckpt_path={ckpt_path}"


def test_the_scanner_sees_checkpoint_loads_lightning_does_for_us():
    bad = ("trainer.fit(model, ckpt_path=path)\nModule.load_from_checkpoint(path)\n"
           "torch.hub.load_state_dict_from_url(url)\nstrategy.load_checkpoint(path)\n")
    assert len(unsafe_calls(bad)) == 4
    assert unsafe_calls("trainer.fit(model, ckpt_path=p, weights_only=True)\ntrainer.fit(model)\n"
                        "Module.load_from_checkpoint(p, weights_only=True)\n") == []


def test_an_empty_or_garbage_checkpoint_is_a_named_error_naming_the_file(tmp_path):
    """Issue 16.15: bare EOFError / IndexError / 'Unsupported operand' become one named error naming the file."""
    from vlsafe.cli import main
    from vlsafe.eval.checkpoint import load_module

    empty, garbage = tmp_path / "empty.ckpt", tmp_path / "garbage.ckpt"
    empty.write_bytes(b"")
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(ValueError, match=r"garbage.ckpt: not a readable PyTorch checkpoint \(250 bytes\)") as error:
        main(["validate", "--config", str(ROOT / "recipes/demo/sft.yaml"), "--ckpt_path", str(garbage)])
    assert type(error.value).__name__ == "CheckpointLoadError"
    with pytest.raises(ValueError, match=r"empty.ckpt: the checkpoint file is empty \(0 bytes\)"):
        load_module(empty)
    with pytest.raises(ValueError, match=r"garbage.ckpt: not a readable PyTorch checkpoint"):
        load_module(garbage)


def test_a_method_argument_added_later_at_its_default_does_not_refuse_an_older_checkpoint():
    """A checkpoint of an earlier vlsafe lacks a newer argument (e.g. `loss`, None by default): resuming it is
    still the same run; a key with a real value on one side only still means another method."""
    from vlsafe.ops.checkpoint_guard import resume_differences

    saved = {"beta": 0.1, "vlm": {"class_path": "x"}}
    method, _ = resume_differences(saved, {**saved, "loss": None})
    assert method == []
    method, _ = resume_differences(saved, {**saved, "loss": {"class_path": "vlsafe.methods.preference.losses.SimPOLoss"}})
    assert method == ["loss: only the recipe has it"]
    method, _ = resume_differences({**saved, "sft_only": 1}, saved)
    assert method == ["sft_only: only the checkpoint has it"]
