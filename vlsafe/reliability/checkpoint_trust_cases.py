"""Trust cases for checkpoints: pickled payloads (local, http, `hpc`), broken files, a checkpoint of another
method, overrides a resume ignores, a full disk and a read-only folder.

Each runs the real code path (a real HTTP server on 127.0.0.1, a real Lightning restore, a real full
filesystem) in well under 10 s; the tests pinning each behaviour are named in `expect`'s neighbours:
tests/reliability/test_security.py, tests/test_cli.py, tests/ops/test_ops_checkpoint_io.py.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import os
import subprocess
import threading
from pathlib import Path
from typing import Callable, Iterator

from vlsafe.reliability.bad_inputs import (
    LOADS,
    REJECTED,
    Bench,
    Case,
    WrongResult,
    _Tripwire,
)


@contextlib.contextmanager
def _serving(folder: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 for `folder`; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _poisoned(folder: Path, name: str) -> tuple[Path, Path]:
    """A Lightning-shaped checkpoint whose unpickling would create `marker`."""
    import lightning as L
    import torch

    marker = folder / "PAYLOAD_RAN"
    path = folder / name
    torch.save({"state_dict": {}, "global_step": 1, "pytorch-lightning_version": L.__version__,
                "hyper_parameters": {"vlm": _Tripwire(str(marker))}}, path)
    return path, marker


def _never_runs(marker: Path, load: Callable[[], object]) -> str:
    try:
        load()
    except Exception:
        if marker.exists():
            raise WrongResult("the pickled payload ran before the load was refused") from None
        raise
    raise WrongResult("a checkpoint with a pickled payload loaded")


def _http_ckpt_path(bench: Bench) -> str:
    from vlsafe.ops.checkpoint_io import AtomicCheckpointIO

    folder = bench.folder("served")
    _, marker = _poisoned(folder, "last.ckpt")
    with _serving(folder) as url:  # what Lightning calls for `--ckpt_path http://...` (the CLI forces weights_only)
        return _never_runs(marker, lambda: AtomicCheckpointIO().load_checkpoint(f"{url}/last.ckpt", weights_only=True))


def _hpc_ckpt_path(bench: Bench) -> str:
    import lightning as L
    import torch

    from vlsafe.ops.checkpoint_io import AtomicCheckpointIO

    class Idle(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    root = bench.folder("hpc")
    _, marker = _poisoned(root, "hpc_ckpt_1.ckpt")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                        default_root_dir=root)
    return _never_runs(marker, lambda: trainer.fit(Idle(), ckpt_path="hpc", weights_only=True))


def _weights_only_false(bench: Bench) -> str:
    from vlsafe.cli import main

    path, marker = _poisoned(bench.folder("asked"), "model.ckpt")
    recipe = Path(__file__).resolve().parents[2] / "recipes/demo/sft.yaml"
    return _never_runs(marker, lambda: main(["validate", "--config", str(recipe), "--ckpt_path", str(path),
                                             "--weights_only", "false"]))


def _broken_file(content: bytes) -> Callable[[Bench], str]:
    def build(bench: Bench) -> str:
        from vlsafe.ops.checkpoint_guard import read_checkpoint

        path = bench.folder("broken") / "model.ckpt"
        path.write_bytes(content)
        read_checkpoint(path)
        raise WrongResult(f"{len(content)} bytes of non-checkpoint loaded")
    return build


def security_cases() -> list[Case]:
    """Checkpoint loading: remote and local checkpoints never unpickle code."""
    return [
        Case("security", "pickled checkpoint served over http as --ckpt_path", REJECTED,
             ("last.ckpt: refused", "weights_only=True"), _http_ckpt_path),
        Case("security", "pickled hpc_ckpt_1.ckpt picked by --ckpt_path hpc", REJECTED,
             ("hpc_ckpt_1.ckpt: refused", "GLOBAL"), _hpc_ckpt_path),
        Case("security", "--weights_only false on the command line", REJECTED,
             ("--weights_only false is refused", "never unpickles"), _weights_only_false),
        Case("security", "empty .ckpt (0 bytes)", REJECTED, ("model.ckpt", "empty (0 bytes)"), _broken_file(b"")),
        Case("security", "text file named .ckpt", REJECTED, ("model.ckpt", "not a readable PyTorch checkpoint"),
             _broken_file(b"this is not a checkpoint\n" * 10)),
    ]


# ------------------------------------------------------------------------------------ checkpoints
def _tiny(cls_path: str):
    import importlib

    from vlsafe.builders import TinyVLM

    module_name, _, name = cls_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    return cls(vlm=TinyVLM(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, vision_width=16,
                           vision_layers=1))


def _sft_into_bpo(bench: Bench) -> str:
    from vlsafe.ops.checkpoint_guard import check_resume

    sft = _tiny("vlsafe.methods.sft.SFTModule")
    bpo = _tiny("vlsafe.methods.preference.module.PreferenceModule")
    checkpoint = {"hyper_parameters": dict(sft.hparams), "vlsafe_method": "vlsafe.methods.sft.SFTModule"}
    check_resume(checkpoint, "sft/last.ckpt", "vlsafe.methods.preference.module.PreferenceModule", dict(bpo.hparams))
    raise WrongResult("an SFT checkpoint resumed a BPO recipe")


def _lr_override(bench: Bench) -> str:
    from vlsafe.ops.checkpoint_guard import check_resume

    sft = _tiny("vlsafe.methods.sft.SFTModule")
    recipe = dict(sft.hparams)
    recipe["optim"] = {**recipe["optim"], "lr": 0.5}
    ignored = check_resume({"hyper_parameters": dict(sft.hparams), "vlsafe_method": "vlsafe.methods.sft.SFTModule"},
                           "sft/last.ckpt", "vlsafe.methods.sft.SFTModule", recipe)
    if not ignored:
        raise WrongResult("the lr override was dropped without a word")
    return "reported as ignored: " + "; ".join(ignored)


def _tmpfs(folder: Path, options: str) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                                capture_output=True).returncode == 0


def _disk_full(bench: Bench) -> str:
    import torch

    from vlsafe.ops.checkpoint_io import AtomicCheckpointIO

    folder = bench.folder("tiny-disk")
    checkpoint = {"state_dict": {"w": torch.zeros(100_000)}}  # 400 KB
    if _tmpfs(folder, "size=64k"):  # a real full filesystem
        try:
            AtomicCheckpointIO().save_checkpoint(checkpoint, folder / "last.ckpt")
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    else:  # not root: the kernel's always-full device, through the same writer

        class DevFull(AtomicCheckpointIO):
            def _serialize(self, checkpoint, file):
                with open("/dev/full", "wb") as sink:
                    torch.save(checkpoint, sink)

        DevFull().save_checkpoint(checkpoint, folder / "last.ckpt")
    raise WrongResult("a 400 KB checkpoint was written to a 64 KB disk")


def _read_only_folder(bench: Bench) -> str:
    from vlsafe.ops.checkpoint_io import check_writable

    folder = bench.folder("read-only")
    mounted = _tmpfs(folder, "ro,size=64k")
    if not mounted:
        folder.chmod(0o555)
    try:
        check_writable([folder / "checkpoints"])
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        else:
            folder.chmod(0o755)
    raise WrongResult("a read-only folder passed the writability check")


def checkpoint_cases() -> list[Case]:
    """Checkpoints of another method, overrides ignored on resume, full or read-only disks."""
    return [
        Case("checkpoints", "SFT checkpoint as --ckpt_path of a BPO recipe", REJECTED,
             ("vlsafe.methods.sft.SFTModule", "beta: only the recipe has it", "FromCheckpoint"), _sft_into_bpo),
        Case("checkpoints", "--model.init_args.optim.lr 0.5 on resume", LOADS,
             ("optim.lr: 0.5 (recipe/CLI) vs 2e-05 (checkpoint)",), _lr_override),
        Case("checkpoints", "disk full while saving (real ENOSPC)", REJECTED,
             ("CheckpointWriteError", "No space left on device", "last.ckpt"), _disk_full),
        Case("checkpoints", "read-only checkpoint folder at fit start", REJECTED,
             ("CheckpointFolderError", "is not writable"), _read_only_folder),
    ]
