"""Convert a vlsafe training checkpoint into a transformers LLaVA folder or one consolidated safetensors file.

Reads every checkpoint the strategies write: a Lightning `.ckpt` file (DDP, single device), a distributed
checkpoint folder (vlsafe.scale.FSDP2 / ModelParallelStrategy, Lightning FSDP with sharded state dict)
and a DeepSpeed ZeRO-2/3 folder (merged with DeepSpeed's zero_to_fp32). The model is rebuilt from the
checkpoint's stored hyperparameters.

    python tools/export.py runs/x/checkpoints/last.ckpt --out exported/llava-hf            # LoRA merged
    python tools/export.py runs/x/checkpoints/step=1000 --out exported/llava-hf --lora adapter
    python tools/export.py runs/x/checkpoints/epoch=0.ckpt/ --out exported/model --format safetensors

`--format hf` writes a LlavaForConditionalGeneration folder (config, safetensors weights, tokenizer,
processor) that `LlavaForConditionalGeneration.from_pretrained(out)` loads. With `--lora adapter` the
folder holds the base LLM and `out/adapter/` a peft adapter for it
(`PeftModel.from_pretrained(model, out / "adapter")`). `--format safetensors` writes the consolidated
vlsafe state dict (`model.safetensors`, keys `vlm.*`), the hyperparameters (`vlsafe_hparams.json`) and
the tokenizer, for reloading with vlsafe's own builders.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("checkpoint", help="a .ckpt file, a distributed-checkpoint folder or a DeepSpeed folder")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--format", choices=("hf", "safetensors"), default="hf",
                        help="hf: LlavaForConditionalGeneration folder (default); safetensors: consolidated vlsafe state")
    parser.add_argument("--lora", choices=("merge", "adapter"), default="merge",
                        help="merge the LoRA adapter into the LLM (default) or save it as a peft adapter (hf only)")
    parser.add_argument("--checkpoint-format", choices=("lightning", "dcp", "deepspeed"), default=None,
                        help="override format detection")
    parser.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: the 'latest' file)")
    parser.add_argument("--image-token", default="<image>", help="image placeholder token of the exported tokenizer")
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> Path:
    from safetensors.torch import save_file
    from tqdm import tqdm

    from vlsafe.core.interop import export_llava_hf
    from vlsafe.core.lora import is_peft
    from vlsafe.scale.convert import (consolidated_state_dict, load_vlm, save_llava_adapter, without_lora)

    out = Path(args.out)
    with tqdm(total=2, desc="export", unit="step") as bar:
        bar.set_postfix_str("loading checkpoint")
        vlm, processor, hparams = load_vlm(args.checkpoint, args.checkpoint_format, args.tag)
        bar.update()
        tokenizer = processor.tokenizer
        bar.set_postfix_str(f"writing {args.format}")
        if args.format == "safetensors":
            out.mkdir(parents=True, exist_ok=True)
            save_file(consolidated_state_dict(vlm), str(out / "model.safetensors"), metadata={"format": "pt"})
            (out / "vlsafe_hparams.json").write_text(json.dumps(hparams, indent=2, default=str))
            tokenizer.save_pretrained(str(out / "tokenizer"))
        elif args.lora == "adapter":
            if not is_peft(vlm.llm):
                raise ValueError(f"{args.checkpoint}: --lora adapter, but the checkpoint has no LoRA adapter")
            export_llava_hf(without_lora(vlm), tokenizer, out, image_token=args.image_token)
            save_llava_adapter(vlm, out / "adapter")
        else:
            export_llava_hf(vlm, tokenizer, out, image_token=args.image_token)  # merges LoRA on a copy
        bar.update()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vlsafe.scale.convert import ConversionError

    try:
        out = export(args)
    except (ConversionError, FileNotFoundError, ValueError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"export: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
