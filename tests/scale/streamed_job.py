"""Streamed (meta-device) loading measured for real; launched by tests/scale/test_streamed_load.py, not a test.

- `write`: a random-weight llava-hf checkpoint (`LlavaForConditionalGeneration` key layout, safetensors shards
  and index as transformers writes them, the tiny BPE tokenizer), generated tensor by tensor so the writer
  holds at most one shard file's tensors.
- `eager`: one process, `LlavaHF(load=eager).build()`: logits on a fixed prompt, peak RSS, build time.
- `fsdp2`: 2 processes (gloo, `vlsafe.scale.FSDP2`): an SFT module on `LlavaHF(load=streamed|eager)`, the sharded
  model's logits on a fixed prompt as loaded, then one training step (projector only, so optimizer state stays
  small). Every rank writes its peak RSS (ru_maxrss and VmHWM) and its time to the first finished step. With
  `--preference`, `dpo` follows in the same processes.
- `dpo`: DPO with LoRA and a reference copy sharing the frozen tower, streamed under FSDP2 (first loss: ln 2).
"""
from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

SIZES = {  # text (Llama) and vision (CLIP) sizes: 53M, 300M and 1.15B parameters
    "small": {"text": dict(vocab_size=8192, hidden_size=640, intermediate_size=1728, num_hidden_layers=8,
                           num_attention_heads=10, num_key_value_heads=10),
              "vision": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                             image_size=112, patch_size=14)},
    "300m": {"text": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                          num_attention_heads=16, num_key_value_heads=16),
             "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=112, patch_size=14)},
    "1b": {"text": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
                        num_attention_heads=16, num_key_value_heads=16),
           "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          image_size=112, patch_size=14)},
}


def peak_rss_bytes() -> dict[str, int]:
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "vm_hwm": hwm * 1024}


def current_rss_bytes() -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmRSS:")) * 1024


# ---------------------------------------------------------------------------------------------- writing
def _value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=g) * 0.02
    return noise + 1.0 if "norm" in name and name.endswith("weight") else noise


def write_checkpoint(out: Path, size: str, shard_bytes: int) -> dict:
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vlsafe.core.tokenizer import train_bpe_tokenizer
    from vlsafe.data.synthetic.world import corpus

    out.mkdir(parents=True, exist_ok=True)
    spec = SIZES[size]
    tokenizer = train_bpe_tokenizer(corpus(), vocab_size=1024)
    text = LlamaConfig(**spec["text"], tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**spec["vision"], hidden_act="quick_gelu"), text_config=text,
                         image_token_index=spec["text"]["vocab_size"] - 1, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config.architectures = ["LlavaForConditionalGeneration"]
    with init_empty_weights():
        shapes = {k: tuple(v.shape) for k, v in LlavaForConditionalGeneration(config).state_dict().items()}
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    weight_map, files, current, current_bytes, total = {}, [], {}, 0, 0

    def flush() -> None:
        nonlocal current, current_bytes
        if current:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(current, str(out / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in current})
            current, current_bytes = {}, 0

    for key, shape in shapes.items():
        tensor = _value(key, shape)
        if current_bytes + tensor.nbytes > shard_bytes:
            flush()
        current[key], current_bytes, total = tensor, current_bytes + tensor.nbytes, total + tensor.nbytes
    flush()
    count = len(files)
    renamed = {name: name.replace(".safetensors", f"-of-{count:05d}.safetensors") for name in files}
    for old, new in renamed.items():
        (out / old).rename(out / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return {"checkpoint_bytes": total, "parameters": sum(torch.Size(s).numel() for s in shapes.values()),
            "files": count}


# ---------------------------------------------------------------------------------------------- prompt
def prompt(num_image_tokens: int, image_size: int) -> dict[str, torch.Tensor]:
    from vlsafe.constants import IMAGE_TOKEN_INDEX

    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, 900, (1, 10), generator=g)
    ids = torch.cat([text[:, :2], torch.full((1, num_image_tokens), IMAGE_TOKEN_INDEX), text[:, 2:]], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, image_size, image_size, generator=g)}


def train_batches(num_image_tokens: int, image_size: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
    from vlsafe.constants import IGNORE_INDEX

    batch = prompt(num_image_tokens, image_size)
    labels = batch["input_ids"].clone()
    labels[:, : 2 + num_image_tokens] = IGNORE_INDEX
    return [{**batch, "labels": labels} for _ in range(n)]


# ---------------------------------------------------------------------------------------------- runs
def run_eager(ckpt: str, out: Path) -> None:
    from vlsafe.builders import LlavaHF

    t = time.time()
    vlm, _ = LlavaHF(ckpt).build()
    built = time.time() - t
    torch.save({"inv_freq": vlm.llm.model.rotary_emb.inv_freq}, out / "eager_buffers.pt")
    tower = vlm.vision
    batch = prompt(tower.num_patches, tower.image_size)
    with torch.no_grad():
        logits = vlm(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
    torch.save({"logits": logits}, out / "eager_logits.pt")
    (out / "eager.json").write_text(json.dumps({"build_s": built, "since_start_s": time.time() - STARTED,
                                                **peak_rss_bytes()}))


def run_fsdp2(ckpt: str, out: Path, load: str) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from vlsafe.builders import LlavaHF
    from vlsafe.methods.sft import SFTModule
    from vlsafe.scale.fsdp2 import FSDP2

    class Clock(Callback):
        def on_train_start(self, trainer, module) -> None:
            self.loaded = {"configured_s": time.time() - STARTED, **peak_rss_bytes()}
            batch = prompt(module.vlm.vision.num_patches, module.vlm.vision.image_size)
            module.eval()
            with torch.no_grad():  # the sharded model as loaded, before the step moves the projector
                self.logits = module.vlm(batch["input_ids"], batch["attention_mask"],
                                         pixel_values=batch["pixel_values"]).logits
            module.train()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if batch_idx == 0:
                self.first_step_s = time.time() - STARTED
                self.loss = float(outputs["loss"])

    # imports a build would pay for lazily, paid before the RSS baseline is read
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.models.llava.modeling_llava  # noqa: F401

    before_build = current_rss_bytes()
    torch.manual_seed(0)
    module = SFTModule(vlm=LlavaHF(ckpt, load=load), train_vision=False, train_llm=False, train_projector=True,
                       optim={"lr": 1e-4, "warmup_steps": 0, "schedule": "constant"})
    clock = Clock()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=FSDP2(), max_steps=1, precision="32-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock],
                        default_root_dir=str(out))
    tower = module.vlm.vision
    batches = train_batches(tower.num_patches, tower.image_size)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    rank = trainer.global_rank
    embed = module.vlm.llm.get_input_embeddings().weight
    report = {"rank": rank, "world_size": trainer.world_size, "load": load, "rss_before_build": before_build,
              **clock.loaded, "inv_freq": module.vlm.llm.model.rotary_emb.inv_freq.tolist(),
              "first_step_s": clock.first_step_s, "loss": clock.loss,
              "embed_local_rows": int(embed.to_local().shape[0]), "embed_global_rows": int(embed.shape[0]),
              "meta_left": sum(p.to_local().is_meta if hasattr(p, "to_local") else p.is_meta
                               for p in module.parameters())}
    report.update({f"final_{k}": v for k, v in peak_rss_bytes().items()})
    if rank == 0:
        torch.save({"logits": clock.logits}, out / f"{load}_fsdp2_logits.pt")
    (out / f"{load}_rank{rank}.json").write_text(json.dumps(report))


def run_dpo(ckpt: str, out: Path, preference: str) -> None:
    """DPO with LoRA and a frozen reference copy that shares the frozen tower, all streamed under FSDP2: the
    reference is the checkpoint's model and the fresh adapters add nothing, so the first loss is -log sigmoid(0)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from vlsafe.builders import LlavaHF
    from vlsafe.data.datamodule import ShardDataModule
    from vlsafe.methods.preference.module import PreferenceModule
    from vlsafe.scale.fsdp2 import FSDP2

    class Losses(Callback):
        losses: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))

    module = PreferenceModule(vlm=LlavaHF(ckpt, load="streamed"), lora={"r": 4, "alpha": 8, "dropout": 0.0},
                              reference="copy", train_vision=False, beta=0.5,
                              optim={"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"})
    log = Losses()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=FSDP2(), max_steps=2, precision="32-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[log],
                        default_root_dir=str(out))
    trainer.fit(module, datamodule=ShardDataModule(train=preference, batch_size=2, num_workers=0, shuffle_buffer=0))
    report = {"losses": log.losses, "shared_tower": module.reference_vlm.vision is module.vlm.vision,
              "meta_left": sum(p.to_local().is_meta if hasattr(p, "to_local") else p.is_meta
                               for p in module.parameters()),
              "reference_sharded": hasattr(module.reference_vlm.llm.model.embed_tokens.weight, "to_local")}
    (out / f"dpo_rank{trainer.global_rank}.json").write_text(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("write", "eager", "fsdp2", "dpo"))
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--shard-mb", type=int, default=64)
    parser.add_argument("--load", choices=("streamed", "eager"), default="streamed")
    parser.add_argument("--preference", default=None, help="preference shards: DPO after the fsdp2 run, or alone")
    args = parser.parse_args()
    out = Path(args.out or args.ckpt)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "write":
        info = write_checkpoint(Path(args.ckpt), args.size, args.shard_mb << 20)
        (out / "written.json").write_text(json.dumps({**info, **peak_rss_bytes()}))
    elif args.mode == "eager":
        run_eager(args.ckpt, out)
    elif args.mode == "dpo":
        run_dpo(args.ckpt, out, args.preference)
    else:
        run_fsdp2(args.ckpt, out, args.load)
        if args.preference:  # same processes: the imports and the process group are paid once
            run_dpo(args.ckpt, out, args.preference)


if __name__ == "__main__":
    main()
