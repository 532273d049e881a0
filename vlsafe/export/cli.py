"""Convert a vlsafe training checkpoint into a transformers LLaVA folder or one consolidated safetensors file.

Reads every checkpoint the strategies write: a Lightning `.ckpt` file (DDP, single device), a distributed
checkpoint folder (vlsafe.scale.FSDP2 / ModelParallelStrategy, Lightning FSDP with sharded state dict)
and a DeepSpeed ZeRO-2/3 folder (merged with DeepSpeed's zero_to_fp32). The model is rebuilt from the
checkpoint's stored hyperparameters.

    python tools/export.py runs/x/checkpoints/last.ckpt --out exported/llava-hf            # LoRA merged
    python tools/export.py runs/x/checkpoints/step=1000 --out exported/llava-hf --lora adapter
    python tools/export.py runs/x/checkpoints/epoch=0.ckpt/ --out exported/model --format safetensors

`--format hf` writes a LlavaForConditionalGeneration folder (config, safetensors weights, tokenizer,
processor) that `LlavaForConditionalGeneration.from_pretrained(out)` loads. It prompts the way the model was
trained: the conversation template is the tokenizer's and processor's `chat_template`, the tokenizer adds a
BOS exactly when training did, the image processor pads to a square like vlsafe (`pad_to_square`), and
generation_config.json holds the EOS/pad ids and the recipe's generation settings. With `--lora adapter` the
folder holds the base LLM and `out/adapter/` a peft adapter for it
(`PeftModel.from_pretrained(model, out / "adapter")`). `--format safetensors` writes the consolidated
vlsafe state dict (`model.safetensors`, keys `vlm.*`), the hyperparameters (`vlsafe_hparams.json`) and
the tokenizer, for reloading with vlsafe's own builders.

Every export also gets a model card, README.md and model_card.json: base model, method and hyperparameters,
data sources with weights and sample counts, fidelity switches, steps, and with `--eval-dir` the metrics of a
`vlsafe evaluate` folder with their denominators and judge settings. The run's logs are found beside the
checkpoint (`runs/x` for `runs/x/checkpoints/last.ckpt`) or given with `--run-dir`.
"""
from __future__ import annotations

import argparse
import copy
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
    parser.add_argument("--run-dir", default=None,
                        help="the run's log folder for the model card (default: the folder above checkpoints/)")
    parser.add_argument("--eval-dir", default=None,
                        help="a `vlsafe evaluate` output folder whose metrics go into the model card")
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> Path:
    from safetensors.torch import save_file
    from tqdm import tqdm

    from vlsafe.core.interop import export_llava_hf
    from vlsafe.core.lora import is_peft
    from vlsafe.scale.convert import (consolidated_state_dict, load_vlm, read_meta, save_llava_adapter,
                                      without_lora)
    from vlsafe.export.model_card import build_card, write_model_card
    from vlsafe.export.prompting import prompting

    out = Path(args.out)
    for flag, folder in (("--run-dir", args.run_dir), ("--eval-dir", args.eval_dir)):
        if folder is not None and not Path(folder).is_dir():  # before minutes of loading, not after
            raise FileNotFoundError(f"{flag} {folder} is not a folder")
    with tqdm(total=3, desc="export", unit="step") as bar:
        bar.set_postfix_str("loading checkpoint")
        vlm, processor, hparams = load_vlm(args.checkpoint, args.checkpoint_format, args.tag)
        bar.update()
        tokenizer = processor.tokenizer
        setup = prompting(processor, hparams, args.image_token)
        hf_prompting = {"chat_template": setup.chat_template, "add_bos_token": setup.add_bos,
                        "image_preprocess": setup.image_preprocess, "generation_config": setup.generation_config}
        bar.set_postfix_str(f"writing {args.format}")
        if args.format == "safetensors":
            from transformers import GenerationConfig

            out.mkdir(parents=True, exist_ok=True)
            save_file(consolidated_state_dict(vlm), str(out / "model.safetensors"), metadata={"format": "pt"})
            (out / "vlsafe_hparams.json").write_text(json.dumps(hparams, indent=2, default=str))
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.chat_template = setup.chat_template
            tokenizer.save_pretrained(str(out / "tokenizer"))
            GenerationConfig(**setup.generation_config).save_pretrained(str(out))
        elif args.lora == "adapter":
            if not is_peft(vlm.llm):
                raise ValueError(f"{args.checkpoint}: --lora adapter, but the checkpoint has no LoRA adapter")
            export_llava_hf(without_lora(vlm), tokenizer, out, image_token=args.image_token, **hf_prompting)
            save_llava_adapter(vlm, out / "adapter")
        else:  # merges LoRA on a copy
            export_llava_hf(vlm, tokenizer, out, image_token=args.image_token, **hf_prompting)
        bar.update()
        bar.set_postfix_str("model card")
        meta = read_meta(args.checkpoint, args.checkpoint_format, args.tag)
        card = build_card(args.checkpoint, meta, run_dir=args.run_dir, eval_dir=args.eval_dir,
                          prompting=setup.record(),
                          export={"format": args.format, "lora": args.lora, "image_token": args.image_token})
        write_model_card(out, card)
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
