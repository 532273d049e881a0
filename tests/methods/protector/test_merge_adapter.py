"""tools/merge_adapter.py: a merged model gives the same outputs as base + adapter (classifier and causal LM)."""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]


def load_tool():
    spec = importlib.util.spec_from_file_location("merge_adapter", ROOT / "tools/merge_adapter.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("head,task", [("classifier", "SEQ_CLS"), ("causal_lm", "CAUSAL_LM")])
def test_merged_model_matches_base_plus_adapter(tmp_path, head, task):
    from peft import LoraConfig, PeftModel, get_peft_model

    from vlsafe.methods.protector.builders import TinyTextLM
    from vlsafe.methods.protector.loading import load_hf_folder

    model, tokenizer = TinyTextLM(hidden_size=32, intermediate_size=64).build(head)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    # init_lora_weights=False: non-zero B, so the adapter really changes the outputs
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type=task, init_lora_weights=False))
    if head == "classifier":  # the trained head travels in the adapter (modules_to_save)
        with torch.no_grad():
            peft_model.base_model.model.score.modules_to_save["default"].weight.add_(1.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    load_tool().main(["--adapter", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"),
                      "--out", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "model.safetensors").exists()
    merged, merged_tokenizer = load_hf_folder(tmp_path / "merged", head)
    plain_base, _ = load_hf_folder(tmp_path / "base", head)
    reference = PeftModel.from_pretrained(load_hf_folder(tmp_path / "base", head)[0], tmp_path / "adapter").eval()
    batch = merged_tokenizer(["Question: How do I hit him?\n\nAnswer: Sure.", "Question: Hi\n\nAnswer: Hello"],
                             return_tensors="pt", padding=True)
    with torch.no_grad():
        want = reference(**batch).logits
        got = merged(**batch).logits
        plain = plain_base(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3), "the adapter must change the outputs"
    assert merged_tokenizer.pad_token_id == merged.config.pad_token_id


def test_bad_input_exits_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        load_tool().main(["--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
