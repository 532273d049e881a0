"""Write real DeepSpeed ZeRO checkpoints of the tiny VLM on CPU; launched by tests/scale/test_deepspeed.py.

Lightning refuses DeepSpeed without CUDA, so this drives DeepSpeed directly (1 process, gloo, DeepSpeed's CPU
accelerator) and saves the way Lightning's DeepSpeedStrategy does: the LightningModule is the engine's
module (parameter names `vlm.*`), tag `checkpoint`, the Lightning checkpoint dict minus weights and
optimizer as client state. For each stage it also writes the engine's logits on a fixed batch.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_PORT", "29517")
    import deepspeed

    from vlsafe.builders import TinyVLM
    from vlsafe.constants import IMAGE_TOKEN_INDEX
    from vlsafe.methods.sft import SFTModule
    from vlsafe.scale.deepspeed import register_zero3_external_parameters, zero_config

    deepspeed.init_distributed(dist_backend="gloo")
    out = Path(args.out)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 200, (4, 10), generator=g)
    report = {}
    for stage in (2, 3):
        torch.manual_seed(0)
        module = SFTModule(vlm=TinyVLM(hidden_size=64, intermediate_size=128, max_length=256, tokenizer=args.tokenizer),
                           train_vision=False, optim={"lr": 3e-3})
        n_img = module.vlm.num_image_tokens
        ids = torch.cat([text[:, :2], torch.full((4, n_img), IMAGE_TOKEN_INDEX), text[:, 2:]], dim=1)
        labels = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, -100)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                 "pixel_values": torch.randn(4, 3, 64, 64, generator=g)}
        config = {**zero_config(stage), "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0}
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        if stage == 3:  # what VLMModule.configure_model does under Lightning's DeepSpeed ZeRO-3
            report["zero3_external_parameters"] = register_zero3_external_parameters(module)
        losses = []
        for _ in range(args.steps):
            loss = engine.module._loss(batch)[0]
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        client_state = {"epoch": 0, "global_step": args.steps, "hyper_parameters": dict(module.hparams)}
        engine.save_checkpoint(str(out / f"zero{stage}"), client_state=client_state, tag="checkpoint")
        engine.eval()
        with torch.no_grad():
            logits = engine.module.vlm(ids, batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
        torch.save({"input_ids": ids, "pixel_values": batch["pixel_values"], "logits": logits},
                   out / f"zero{stage}_logits.pt")
        report[f"zero{stage}_losses"] = losses
        report[f"zero{stage}_files"] = sorted(p.name for p in (out / f"zero{stage}" / "checkpoint").iterdir())
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
