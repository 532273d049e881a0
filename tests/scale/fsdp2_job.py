"""A real 2-process FSDP2 run on CPU (gloo), launched by tests/scale/test_fsdp2.py; not a test module itself.

Phase 1 trains the tiny VLM (frozen tower) for `--steps` steps with `vlsafe.scale.FSDP2` and saves a
distributed checkpoint; phase 2 resumes from it in a fresh module and Trainer and trains as many steps
again; then the sharded model's logits on a fixed batch are written for the export round trip. Phase 3
trains a LoRA variant for a few steps and saves its distributed checkpoint; phase 4 (optional) runs DPO
with a frozen reference copy sharing the vision tower. Rank 0 writes report.json.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from vlsafe.builders import TinyVLM
from vlsafe.data.datamodule import ShardDataModule
from vlsafe.methods.sft import SFTModule
from vlsafe.scale.fsdp2 import FSDP2


class LossLog(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def builder(tokenizer: str) -> TinyVLM:
    return TinyVLM(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, max_length=256, tokenizer=tokenizer)


class SFTWithHead(SFTModule):
    """SFT plus a small trainable head outside the VLM (as perception methods have): it is not an FSDP2
    unit, so its gradients must be averaged across ranks by VLMModule, or the ranks drift apart."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head = torch.nn.Linear(3, 1)

    def _param_groups(self):
        return [*super()._param_groups(), {"params": list(self.head.parameters()), "lr": 1e-2, "name": "head"}]

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss + 0.1 * self.head(batch["pixel_values"].mean(dim=(2, 3))).pow(2).mean()


def make_module(tokenizer: str, lora: dict | None = None) -> SFTModule:
    cls = SFTModule if lora else SFTWithHead
    return cls(vlm=builder(tokenizer), lora=lora, train_vision=False,
               optim={"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"})


def trainer(steps: int, out: Path, callbacks: list) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2, strategy=FSDP2(), max_steps=steps, precision="32-true",
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=str(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--preference", default=None, help="preference shards for phase 4 (DPO, reference copy)")
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    data = lambda: ShardDataModule(train=args.train, batch_size=8, num_workers=0, shuffle_buffer=0)  # noqa: E731
    report: dict = {}

    # phase 1: train and save a distributed checkpoint
    log1 = LossLog()
    module = make_module(args.tokenizer)
    t1 = trainer(args.steps, out, [log1])
    t1.fit(module, datamodule=data())
    embed = module.vlm.llm.get_input_embeddings().weight
    report["embed_local_rows"], report["embed_global_rows"] = int(embed.to_local().shape[0]), int(embed.shape[0])
    report["optimizer_params"] = sum(len(g["params"]) for g in t1.optimizers[0].param_groups)
    report["trainable_params"] = sum(p.requires_grad for p in module.parameters())
    t1.save_checkpoint(out / "phase1")

    # phase 2: a fresh module and Trainer resume from the directory and continue
    log2 = LossLog()
    resumed = make_module(args.tokenizer)
    t2 = trainer(2 * args.steps, out, [log2])
    t2.fit(resumed, datamodule=data(), ckpt_path=str(out / "phase1"))
    report["resumed_global_step"] = t2.global_step
    head = torch.cat([p.detach().reshape(-1) for p in resumed.head.parameters()])
    gathered = [torch.zeros_like(head) for _ in range(t2.world_size)]
    torch.distributed.all_gather(gathered, head)
    report["head_rank_difference"] = float((gathered[0] - gathered[1]).abs().max())
    torch.manual_seed(0)
    report["head_change"] = float((head - torch.cat([p.reshape(-1) for p in SFTWithHead(
        vlm=builder(args.tokenizer)).head.parameters()])).abs().max())
    t2.save_checkpoint(out / "phase2")
    reference = make_module(args.tokenizer).vlm  # the initial weights (same seed)
    trained = {k: full(v) for k, v in resumed.vlm.state_dict().items()}
    initial = reference.state_dict()
    report["vision_max_change"] = max(float((trained[k] - initial[k]).abs().max()) for k in initial
                                      if k.startswith("vision."))
    report["llm_max_change"] = max(float((trained[k] - initial[k]).abs().max()) for k in initial if k.startswith("llm."))

    # logits of the sharded model on a fixed batch, for the export round trip
    resumed.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (2, 12), generator=g)
    from vlsafe.constants import IMAGE_TOKEN_INDEX
    n_img = resumed.vlm.num_image_tokens
    ids = torch.cat([ids[:, :2], torch.full((2, n_img), IMAGE_TOKEN_INDEX), ids[:, 2:]], dim=1)
    pixels = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        logits = resumed.vlm(ids, torch.ones_like(ids), pixel_values=pixels).logits
    if t2.global_rank == 0:
        torch.save({"input_ids": ids, "pixel_values": pixels, "logits": logits}, out / "logits.pt")

    # phase 3: LoRA under FSDP2 (frozen base and trainable adapters in the same units)
    log3 = LossLog()
    lora_module = make_module(args.tokenizer, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    t3 = trainer(3, out, [log3])
    t3.fit(lora_module, datamodule=data())
    t3.save_checkpoint(out / "lora")
    lora_state = {k: full(v) for k, v in lora_module.vlm.state_dict().items()}
    base = make_module(args.tokenizer, lora={"r": 4, "alpha": 8, "dropout": 0.0}).vlm.state_dict()
    report["lora_base_max_change"] = max(float((lora_state[k] - base[k]).abs().max()) for k in base
                                         if k.startswith("llm.") and "lora_" not in k)
    report["lora_adapter_max_change"] = max(float((lora_state[k] - base[k]).abs().max()) for k in base
                                            if "lora_B" in k)
    with torch.no_grad():
        lora_module.eval()
        lora_logits = lora_module.vlm(ids, torch.ones_like(ids), pixel_values=pixels).logits
    # phase 4: DPO with a frozen reference copy that shares the frozen vision tower with the policy
    if args.preference:
        from vlsafe.methods.preference.module import PreferenceModule

        log4 = LossLog()
        dpo = PreferenceModule(vlm=builder(args.tokenizer), train_vision=False, beta=0.5,
                               reference="copy", optim={"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"})
        ref_before = {k: v.clone() for k, v in dpo.reference_vlm.llm.state_dict().items()}
        t4 = trainer(4, out, [log4])
        t4.fit(dpo, datamodule=ShardDataModule(train=args.preference, batch_size=4, num_workers=0, shuffle_buffer=0))
        report["dpo_shared_tower"] = dpo.reference_vlm.vision is dpo.vlm.vision
        report["dpo_reference_max_change"] = max(float((full(v) - ref_before[k]).abs().max())
                                                 for k, v in dpo.reference_vlm.llm.state_dict().items())
        report["dpo_losses"] = log4.losses
    if t3.global_rank == 0:
        torch.save({"logits": lora_logits}, out / "lora_logits.pt")
        report.update(phase1_losses=log1.losses, phase2_losses=log2.losses, lora_losses=log3.losses,
                      world_size=t1.world_size, threads=torch.get_num_threads(),
                      omp=os.environ.get("OMP_NUM_THREADS"))
        (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
