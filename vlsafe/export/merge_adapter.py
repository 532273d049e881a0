"""Merge a LoRA adapter into its base model and save a standalone model + tokenizer (safetensors).

    python tools/merge_adapter.py --adapter runs/detector/adapter --out models/detector-merged
    python tools/merge_adapter.py --adapter ADAPTER --base openlm-research/open_llama_3b_v2 --out DIR --dtype bf16
    python tools/merge_adapter.py --checkpoint runs/demo-protector-detector/checkpoints/last.ckpt --out DIR

--adapter is a peft adapter folder (adapter_config.json + weights). Its task type picks the base class:
SEQ_CLS -> AutoModelForSequenceClassification with num_labels=1 (the harm detector; the trained `score`
head comes from the adapter's modules_to_save), anything else -> AutoModelForCausalLM (the detoxifier).
The base defaults to the adapter's `base_model_name_or_path`; the tokenizer is the base's (or --tokenizer).
--checkpoint takes a vlsafe HarmDetectorModule / DetoxifierModule training checkpoint instead.
The result loads with `HarmDetector.load(DIR)` / `Detoxifier.load(DIR)` or plain transformers. A merged
checkpoint records its input-format preset (and the detoxifier's prompt) in DIR/vlsafe_protector.json.
trust_remote_code stays off.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def merge_adapter(adapter: str, out: str, base: str | None = None, tokenizer: str | None = None,
                  dtype: str | None = None) -> Path:
    from peft import PeftConfig, PeftModel
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from vlsafe.methods.protector.builders import ensure_pad_token, resolve_dtype

    config = PeftConfig.from_pretrained(adapter)
    base = base or config.base_model_name_or_path
    if not base:
        raise ValueError(f"{adapter}: adapter_config.json names no base model; pass --base")
    kwargs = {"trust_remote_code": False}
    if dtype:
        kwargs["dtype"] = resolve_dtype(dtype)
    task = str(getattr(config, "task_type", "") or "")
    if task.endswith("SEQ_CLS"):
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    tok = AutoTokenizer.from_pretrained(tokenizer or base, use_fast=True)
    ensure_pad_token(tok, model)
    merged = PeftModel.from_pretrained(model, adapter).eval().merge_and_unload()
    return _save(merged, tok, out)


def merge_checkpoint(checkpoint: str, out: str) -> Path:
    from vlsafe.methods.protector.loading import load_text_module
    from vlsafe.ops.checkpoint_guard import read_checkpoint

    hparams = read_checkpoint(checkpoint).get("hyper_parameters") or {}  # weights_only=True
    if "bce_weight" in hparams:
        from vlsafe.methods.protector.detector_module import HarmDetectorModule as cls
    elif "template" in hparams:
        from vlsafe.methods.protector.detoxifier_module import DetoxifierModule as cls
    else:
        raise ValueError(f"{checkpoint} is neither a HarmDetectorModule nor a DetoxifierModule checkpoint")
    module = load_text_module(checkpoint, cls)
    settings = {"preset": module.preset}
    if hasattr(module, "inference_template"):
        settings["template"] = module.inference_template
    return _save(module.merged_model(), module.tokenizer, out, settings)


def _save(model, tokenizer, out: str, settings: dict | None = None) -> Path:
    import json

    from vlsafe.methods.protector.loading import SETTINGS_FILE

    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if settings:  # the input format it was trained for, so HarmDetector/Detoxifier.load use it
        (path / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="peft adapter folder (adapter_config.json)")
    source.add_argument("--checkpoint", help="vlsafe HarmDetectorModule / DetoxifierModule checkpoint (.ckpt)")
    parser.add_argument("--base", default=None, help="base model folder or id (default: the adapter's own)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer to save (default: the base model's)")
    parser.add_argument("--dtype", default=None, help="load the base in this dtype (bf16, fp16, fp32)")
    parser.add_argument("--out", required=True, help="output folder for the merged model + tokenizer")
    args = parser.parse_args(argv)
    source = args.adapter or args.checkpoint
    if not Path(source).exists():
        raise SystemExit(f"error: {source} does not exist")
    try:
        if args.adapter:
            path = merge_adapter(args.adapter, args.out, args.base, args.tokenizer, args.dtype)
        else:
            if args.base or args.tokenizer or args.dtype:
                raise ValueError("--base/--tokenizer/--dtype apply to --adapter only")
            path = merge_checkpoint(args.checkpoint, args.out)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"saved the merged model and tokenizer to {path}")


if __name__ == "__main__":
    main()
