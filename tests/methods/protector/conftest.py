"""Shared fixtures for the MLLM-Protector tests: the demo data and one small trained harm detector."""
from __future__ import annotations

import contextlib

import pytest
import torch

QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
             enable_checkpointing=False)
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4}


@contextlib.contextmanager
def single_thread():
    """Tiny models train much faster on one thread (and far faster on a loaded machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def one_thread():
    return single_thread


@pytest.fixture(scope="session")
def protector_world(tmp_path_factory):
    """harm_text pairs + harm_qa singles (train 640 + 640, val 64 + 64), written once."""
    from vlsafe.data.synthetic.text import ProtectorWorld

    world = ProtectorWorld(root=str(tmp_path_factory.mktemp("protector-world")), harm_text_samples=640,
                           harm_qa_samples=640, val_fraction=0.1, batch_size=16, num_workers=0)
    world.prepare_data()
    return world


def detector_module(**kwargs):
    import torch

    from vlsafe.methods.protector.builders import TinyTextLM
    from vlsafe.methods.protector.detector_module import HarmDetectorModule

    torch.manual_seed(0)
    defaults = dict(model=TinyTextLM(**TINY), lora={"r": 8, "alpha": 16, "dropout": 0.0},
                    optim={"lr": 5e-3, "warmup_ratio": 0.0, "schedule": "constant"},
                    categories=["violence", "weapons", "none"], preset="vlsafe")  # the demo's format
    return HarmDetectorModule(**{**defaults, **kwargs})


@pytest.fixture(scope="session")
def make_detector():
    return detector_module


@pytest.fixture(scope="session")
def trained_detector(protector_world):
    """(untrained val metrics, trained val metrics, trained module): 160 LoRA steps of the pairwise loss.

    Cosine decay, not the other fixtures' constant rate: at a constant 5e-3 the guard's held-out harmful-answer
    rate swung with the step count (0.53 at 80 steps in a fresh install, 0.08 at 160, 0.11 at 240); decayed,
    it settles (0.00 at 160 and 200 steps)."""
    import lightning as L

    module = detector_module(optim={"lr": 5e-3, "warmup_ratio": 0.0, "schedule": "cosine"})

    def validate():
        results = L.Trainer(**QUIET).validate(module, datamodule=protector_world, verbose=False)
        return {k: float(v) for k, v in results[0].items()}

    with single_thread():
        before = validate()
        L.Trainer(max_steps=160, num_sanity_val_steps=0, limit_val_batches=0, **QUIET).fit(module,
                                                                                          datamodule=protector_world)
        after = validate()
    return before, after, module.eval()
