"""Session fixtures for the scale-out tests: one tokenizer, one 2-process FSDP2 run, one DeepSpeed run, one
single-device Lightning checkpoint — each built once and shared by the conversion tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def job_env() -> dict[str, str]:
    # Two processes on two cores: one thread each (oversubscription makes gloo runs ~50x slower).
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}


def run_job(script: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(HERE / script), *args], cwd=ROOT, env=job_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """TinyVLM's own tokenizer, saved once so every build skips training it."""
    from vlsafe.core.tokenizer import train_bpe_tokenizer
    from vlsafe.data.synthetic.world import corpus

    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    train_bpe_tokenizer(corpus(), vocab_size=1024).save_pretrained(str(folder))
    return str(folder)


def tiny_module(tokenizer_dir: str, **kwargs):
    from vlsafe.builders import TinyVLM
    from vlsafe.methods.sft import SFTModule

    return SFTModule(vlm=TinyVLM(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, max_length=256,
                                 tokenizer=tokenizer_dir), train_vision=False, **kwargs)


@pytest.fixture(scope="session")
def fsdp2_run(tmp_path_factory, world_dir, tiny_tokenizer_dir) -> tuple[Path, dict]:
    """tests/scale/fsdp2_job.py on 2 CPU processes: train, save DCP, resume, LoRA, DPO; see its docstring."""
    from vlsafe.data.synthetic.world import write_world

    out = tmp_path_factory.mktemp("fsdp2_run")
    write_world(out / "preference", 32, seed=0, kinds=["preference"], split="train", max_samples_per_shard=32)
    run_job("fsdp2_job.py", ["--out", str(out), "--train", str(world_dir / "train"), "--tokenizer", tiny_tokenizer_dir,
                             "--steps", "4", "--preference", str(out / "preference")])
    return out, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="session")
def deepspeed_run(tmp_path_factory, tiny_tokenizer_dir) -> tuple[Path, dict]:
    """tests/scale/deepspeed_job.py: real ZeRO-2 and ZeRO-3 checkpoints written on CPU (1 process)."""
    out = tmp_path_factory.mktemp("deepspeed_run")
    run_job("deepspeed_job.py", ["--out", str(out), "--tokenizer", tiny_tokenizer_dir, "--steps", "4"])
    return out, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="session")
def lightning_checkpoint(tmp_path_factory, world_dir, tiny_tokenizer_dir) -> tuple[Path, dict]:
    """A single-file checkpoint from a single-device Trainer (what DDP writes too), and the model's logits."""
    import lightning as L

    from vlsafe.data.datamodule import ShardDataModule

    out = tmp_path_factory.mktemp("lightning_ckpt")
    module = tiny_module(tiny_tokenizer_dir, optim={"lr": 3e-3, "warmup_steps": 0})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=str(out))
    trainer.fit(module, datamodule=ShardDataModule(train=str(world_dir / "train"), batch_size=8, num_workers=0,
                                                    shuffle_buffer=0))
    trainer.save_checkpoint(out / "last.ckpt")
    batch = fixed_batch(module.vlm.num_image_tokens)
    module.eval()
    with torch.no_grad():
        logits = module.vlm(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
    return out / "last.ckpt", {**batch, "logits": logits}


def fixed_batch(num_image_tokens: int, rows: int = 2) -> dict[str, torch.Tensor]:
    from vlsafe.constants import IMAGE_TOKEN_INDEX

    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, 200, (rows, 12), generator=g)
    ids = torch.cat([text[:, :2], torch.full((rows, num_image_tokens), IMAGE_TOKEN_INDEX), text[:, 2:]], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(rows, 3, 64, 64, generator=g)}


@torch.no_grad()
def hf_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a transformers LLaVA model on a vlsafe batch (image sentinels -> its image token)."""
    from vlsafe.constants import IMAGE_TOKEN_INDEX

    ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_INDEX, model.config.image_token_index)
    mask = batch.get("attention_mask", torch.ones_like(ids))
    return model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits


def export(args: list[str]) -> int:
    """`python tools/export.py ARGS` in this process (the import of torch/transformers is already paid)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vlsafe_tools_export", ROOT / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(args)
