"""Measure what a real sharded run allocates, for tests/scale/test_plan.py; not a test module itself.

Builds the module and strategy a recipe YAML names, trains one step on 2 CPU processes (gloo) with FSDP2
(Lightning ModelParallelStrategy, data_parallel_size=2) and then one step with DDP, and records on each rank
the bytes it holds: parameters (local shards), gradients, and AdamW's exp_avg / exp_avg_sq. Rank 0 writes
measured.json: {"fsdp2": [rank0, rank1], "ddp": [rank0, rank1]}.
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from vlsafe.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlsafe.tools.plan import load_recipe


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


class Measure(Callback):
    """Bytes held after the first optimizer step (gradients are cleared only before the next backward)."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        params = list(module.parameters())
        optimizer = trainer.optimizers[0]
        states = [t for state in optimizer.state.values() for key, t in state.items()
                  if key in ("exp_avg", "exp_avg_sq")]
        self.bytes = {"parameters": sum(local_bytes(p) for p in params),
                      "gradients": sum(local_bytes(p.grad) for p in params if p.grad is not None),
                      "optimizer": sum(local_bytes(t) for t in states)}


def batches(image_tokens: int, rows: int, length: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 200, (rows, length - image_tokens), generator=g)
    ids = torch.cat([text[:, :2], torch.full((rows, image_tokens), IMAGE_TOKEN_INDEX), text[:, 2:]], dim=1)
    labels = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.randint(0, 256, (rows, 3, 64, 64), dtype=torch.uint8, generator=g)}]


def instantiate(spec: dict):
    module_name, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), name)(**(spec.get("init_args") or {}))


def run(recipe: dict, strategy, out: Path) -> list[dict[str, int]]:
    torch.manual_seed(0)
    module = instantiate(recipe["model"])
    measure = Measure()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, precision="32-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        use_distributed_sampler=False, callbacks=[measure], default_root_dir=str(out))
    data = batches(module.vlm.num_image_tokens, int(recipe["data"]["init_args"]["batch_size"]),
                   int(recipe["model"]["init_args"]["vlm"]["init_args"]["max_length"]))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    gathered: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, measure.bytes)
    return gathered


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    recipe = load_recipe([args.recipe])
    report = {"fsdp2": run(recipe, instantiate(recipe["trainer"]["strategy"]), out), "ddp": run(recipe, "ddp", out)}
    if torch.distributed.get_rank() == 0:
        (out / "measured.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
