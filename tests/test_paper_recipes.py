"""The paper recipes carry the released hyperparameters (docs/fidelity.md, "hyperparameters" rows).

Each expectation names the released script it was read from (see ../shared/specs for the transcriptions).
The recipes are read as plain YAML, so this checks what a user runs, not a default hidden in code; an overlay
(e.g. bpo_lora.yaml) is read merged onto its base, as `vlsafe fit --config BASE --config OVERLAY` runs it.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlsafe.reliability.recipe_overlays import config_chain
from vlsafe.tools.plan import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


# (recipe, key, released value, where the value comes from)
RELEASED = [
    # LLaVA-1.5 stage 2 (haotian-liu/LLaVA scripts/v1_5/finetune.sh), which VLGuard reuses for mixed/post-hoc
    *[(name, key, value, "LLaVA scripts/v1_5/finetune.sh")
      for name in ("sft.yaml", "vlguard_mixed.yaml", "vlguard_posthoc.yaml")
      for key, value in [("model.init_args.optim.lr", 2e-5), ("model.init_args.optim.warmup_ratio", 0.03),
                         ("model.init_args.optim.schedule", "cosine"), ("model.init_args.optim.weight_decay", 0.0),
                         ("data.init_args.batch_size", 16), ("trainer.devices", 8), ("trainer.max_epochs", 1),
                         ("trainer.strategy", "deepspeed_stage_3")]],
    # LLaVA train.py:701 Image.open(...).convert('RGB'): alpha dropped, not composited
    *[(name, "model.init_args.vlm.init_args.rgb_mode", "pil", "LLaVA llava/train/train.py:701")
      for name in ("sft.yaml", "sft_lora.yaml", "sft_from_llava_hf.yaml", "vlguard_mixed.yaml",
                   "vlguard_mixed_lora.yaml", "vlguard_posthoc.yaml", "vlguard_posthoc_lora.yaml")],
    *[(name, "model.init_args.vlm.init_args.rgb_mode", "pil", "LLaVA train.py:701 / MMSafe-PO data_utils_dpo.py:122")
      for name in ("scale/sft_7b_fsdp.yaml", "scale/sft_7b_fsdp2.yaml", "scale/sft_13b_deepspeed3.yaml",
                   "scale/sft_13b_lora_fsdp.yaml", "scale/bpo_7b_deepspeed2.yaml", "scale/bpo_13b_deepspeed3.yaml")],
    *[(name, "data.init_args.group_by_modality_length", True, "LLaVA scripts/v1_5/finetune.sh")
      for name in ("scale/sft_7b_fsdp.yaml", "scale/sft_7b_fsdp2.yaml", "scale/sft_13b_deepspeed3.yaml",
                   "scale/sft_13b_lora_fsdp.yaml")],
    # LLaVA-1.5 LoRA (scripts/v1_5/finetune_lora.sh): lr 2e-4, projector 2e-5, r 128 / alpha 256
    ("sft_lora.yaml", "model.init_args.optim.lr", 2e-4, "LLaVA scripts/v1_5/finetune_lora.sh"),
    ("sft_lora.yaml", "model.init_args.optim.projector_lr", 2e-5, "LLaVA scripts/v1_5/finetune_lora.sh"),
    ("sft_lora.yaml", "model.init_args.lora.r", 128, "LLaVA scripts/v1_5/finetune_lora.sh"),
    ("sft_lora.yaml", "model.init_args.lora.alpha", 256, "LLaVA scripts/v1_5/finetune_lora.sh"),
    ("sft_lora.yaml", "data.init_args.group_by_modality_length", True,
     "LLaVA scripts/v1_5/finetune_lora.sh --group_by_modality_length True"),
    # MMSafe-PO scripts/bpo.sh
    ("bpo.yaml", "model.init_args.beta", 0.1, "MMsafe-PO scripts/bpo.sh --dpo_beta"),
    ("bpo.yaml", "model.init_args.optim.lr", 1e-6, "MMsafe-PO scripts/bpo.sh --learning_rate"),
    ("bpo.yaml", "model.init_args.optim.warmup_steps", 10, "MMsafe-PO scripts/bpo.sh --warmup_steps"),
    ("bpo.yaml", "model.init_args.optim.schedule", "cosine", "MMsafe-PO scripts/bpo.sh --lr_scheduler_type"),
    ("bpo.yaml", "model.init_args.optim.weight_decay", 0.0, "MMsafe-PO scripts/bpo.sh --weight_decay"),
    ("bpo.yaml", "trainer.gradient_clip_val", 1.0, "MMsafe-PO scripts/bpo.sh --max_grad_norm"),
    ("bpo.yaml", "trainer.max_epochs", 1, "MMsafe-PO scripts/bpo.sh --total_epochs"),
    ("bpo.yaml", "trainer.devices", 4, "MMsafe-PO scripts/bpo.sh (4 GPUs)"),
    ("bpo.yaml", "trainer.accumulate_grad_batches", 2, "MMsafe-PO scripts/bpo.sh (GA 2)"),
    ("bpo.yaml", "data.init_args.batch_size", 1, "MMsafe-PO scripts/bpo.sh --batch_size"),
    ("bpo.yaml", "seed_everything", 42, "MMsafe-PO scripts/bpo.sh --seed"),
    ("bpo.yaml", "model.init_args.vlm.init_args.max_length", 768, "MMsafe-PO train_bpo.py:309 (768 incl. image)"),
    *[(name, key, value, source) for name in ("bpo.yaml", "dpo.yaml", "bpo_lora.yaml")
      for key, value, source in [
          ("model.init_args.response_format", "released", "MMsafe-PO data_utils_dpo.py:217-228 (no EOS scored)"),
          ("model.init_args.length_rule", "released", "MMsafe-PO data_utils_dpo.py:225-241"),
          ("model.init_args.vlm.init_args.rgb_mode", "pil", "MMsafe-PO data_utils_dpo.py:122 convert('RGB')")]],
    # MLLM-Protector harmdetector / detoxifier training scripts
    ("protector_detector.yaml", "model.init_args.lora.r", 32, "MLLM-protector harm detector script --lora_rank"),
    ("protector_detector.yaml", "model.init_args.optim.lr", 2e-5, "MLLM-protector harm detector script"),
    ("protector_detector.yaml", "trainer.max_epochs", 4, "MLLM-protector harm detector script"),
    ("protector_detector.yaml", "data.init_args.batch_size", 4, "MLLM-protector harm detector script"),
    ("protector_detector.yaml", "model.init_args.bce_weight", 2.0, "harmdetector_train_saferlhf.py:287-293"),
    ("protector_detoxifier.yaml", "model.init_args.lora.r", 128, "MLLM-protector detoxifier script --lora_rank"),
    ("protector_detoxifier.yaml", "model.init_args.lora.alpha", 32, "MLLM-protector detoxifier LoraConfig"),
    ("protector_detoxifier.yaml", "model.init_args.optim.lr", 2e-5, "MLLM-protector detoxifier script"),
    ("protector_detoxifier.yaml", "trainer.max_epochs", 4, "MLLM-protector detoxifier script"),
    # PerceptionGPT config + finetune.py
    ("perception.yaml", "model.init_args.optim.lr", 2e-5, "perceptionGPT finetune.py"),
    ("perception.yaml", "model.init_args.optim.betas", [0.9, 0.95], "perceptionGPT finetune.py AdamW betas"),
    ("perception.yaml", "model.init_args.optim.warmup_steps", 100, "perceptionGPT WarmupDecayLR"),
    ("perception.yaml", "model.init_args.optim.schedule", "linear", "perceptionGPT WarmupDecayLR"),
    ("perception.yaml", "model.init_args.lora.r", 16, "perceptionGPT config LoRA"),
    ("perception.yaml", "model.init_args.lora.alpha", 64, "perceptionGPT config LoRA"),
    ("perception.yaml", "trainer.max_epochs", 10, "perceptionGPT config"),
    ("perception.yaml", "data.init_args.batch_size", 8, "perceptionGPT config"),
    ("perception.yaml", "model.init_args.mask_decoder.vision_features", "merged", "perceptionGPT.py:186-189"),
    ("perception.yaml", "model.init_args.dice_reduction", "batch", "mllm/utils/dice_loss.py reduce_batch_first"),
    ("perception.yaml", "model.init_args.pad_color", "white", "mllm/dataset/utils/transform.py:52 Expand2square"),
    ("perception.yaml", "model.init_args.giou_boxes", "released", "mllm/utils/box_utils.py:114-125"),
    # LRV-Instruction V2 (mPLUG-Owl LoRA): r 8, alpha 32, dropout 0.05 on q_proj/v_proj
    ("lrv.yaml", "model.init_args.lora.r", 8, "LRV-Instruction utils/model_worker.py LoraConfig"),
    ("lrv.yaml", "model.init_args.lora.alpha", 32, "LRV-Instruction utils/model_worker.py LoraConfig"),
    ("lrv.yaml", "model.init_args.lora.dropout", 0.05, "LRV-Instruction utils/model_worker.py LoraConfig"),
]


@pytest.mark.parametrize("recipe,key,released,source", RELEASED,
                         ids=[f"{r}:{k.rsplit('.', 1)[-1]}" for r, k, _, _ in RELEASED])
def test_paper_recipe_uses_the_released_value(recipe, key, released, source):
    tree = load_recipe([str(path) for path in config_chain(RECIPES / recipe)])
    value = _get(tree, key)
    if isinstance(released, float):
        assert value == pytest.approx(released), f"{recipe} {key} = {value}, released {released} ({source})"
    else:
        assert value == released, f"{recipe} {key} = {value}, released {released} ({source})"


# ----------------------------------------------------------------------------- every key says what it is
PAPER_RECIPES = sorted([*RECIPES.glob("*.yaml"), *(RECIPES / "scale").glob("*.yaml")])


def _key_lines(node: yaml.Node) -> list[int]:
    """0-based lines of the block-style keys (a flow mapping `{r: 8, ...}` is one setting, under its key)."""
    lines = []
    if isinstance(node, yaml.MappingNode) and not node.flow_style:
        for key, value in node.value:
            lines += [key.start_mark.line, *_key_lines(value)]
    elif isinstance(node, yaml.SequenceNode) and not node.flow_style:
        for item in node.value:
            lines += _key_lines(item) if isinstance(item, yaml.MappingNode) and not item.flow_style \
                else [item.start_mark.line]
    return lines


@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=lambda path: str(path.relative_to(RECIPES)))
def test_every_key_of_a_paper_recipe_carries_a_comment(recipe):
    """As litgpt's config_hub: the line above each key says its meaning, type/choices, default and source."""
    text = recipe.read_text(encoding="utf-8")
    lines = text.split("\n")
    bare = [f"{number + 1}: {lines[number].strip()}" for number in sorted(set(_key_lines(yaml.compose(text))))
            if not (number and lines[number - 1].strip().startswith("#")) and " # " not in lines[number]]
    assert not bare, f"{recipe.name}: keys without a comment:\n" + "\n".join(bare)
    assert max(map(len, lines)) <= 120, f"{recipe.name}: a line longer than 120 characters"
