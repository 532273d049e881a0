"""DeepSpeed: the generated ZeRO config, its consistency with the Trainer, and real ZeRO checkpoints -> HF.

Lightning refuses to *fit* with DeepSpeed on a CPU, so training through Lightning's DeepSpeedStrategy is
not tested here. The strategy is constructed and its final config checked, and tests/scale/deepspeed_job.py
trains with DeepSpeed directly on CPU to produce genuine ZeRO-2/3 checkpoint folders for the export.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from tests.scale.conftest import export, hf_logits
from vlsafe.scale.deepspeed import DeepSpeed, check_consistent, zero_config


def test_zero_config_stage_2_and_3_with_offload():
    two = zero_config(2, offload_optimizer=True)
    assert two["zero_optimization"]["stage"] == 2
    assert two["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in two["zero_optimization"]
    three = zero_config(3, offload_optimizer=True, offload_parameters=True, offload_device="nvme", nvme_path="/nvme")
    zero = three["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "nvme" and zero["offload_param"]["nvme_path"] == "/nvme"
    assert "stage3_prefetch_bucket_size" in zero and "allgather_bucket_size" not in zero
    for config in (two, three):  # the Trainer owns these
        assert not {"gradient_clipping", "bf16", "fp16", "gradient_accumulation_steps",
                    "train_micro_batch_size_per_gpu"} & set(config)
    with pytest.raises(ValueError, match="needs ZeRO stage 3"):
        zero_config(2, offload_parameters=True)
    with pytest.raises(ValueError, match="stage must be 2 or 3"):
        zero_config(1)


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)


def _final_config(strategy: DeepSpeed, **trainer_kwargs) -> dict:
    """The config Lightning hands to deepspeed.initialize, built the way Trainer.fit builds it."""
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, **trainer_kwargs)
    module = _Tiny()
    module.trainer = trainer
    trainer.strategy._lightning_module = module
    trainer.strategy._auto_select_batch_size = lambda: 4  # fit reads it off the train dataloader
    trainer.strategy._format_config()
    return trainer.strategy.config


def test_lightning_deepspeed_strategy_takes_precision_clipping_and_accumulation_from_the_trainer():
    config = _final_config(DeepSpeed(stage=3, offload_optimizer=True), precision="bf16-mixed", gradient_clip_val=0.7,
                           accumulate_grad_batches=4)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["gradient_clipping"] == 0.7
    assert config["gradient_accumulation_steps"] == 4
    assert config["bf16"] == {"enabled": True}
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert DeepSpeed(stage=3).zero_stage_3 and not DeepSpeed(stage=2).zero_stage_3


def test_a_config_that_contradicts_the_trainer_is_refused():
    config = {**zero_config(2), "gradient_clipping": 1.0, "fp16": {"enabled": True}}
    with pytest.raises(ValueError) as error:
        _final_config(DeepSpeed(config=config), precision="bf16-mixed", gradient_clip_val=0.5)
    message = str(error.value)
    assert "gradient_clipping=1.0" in message and "gradient_clip_val=0.5" in message and "fp16" in message
    with pytest.raises(ValueError, match="clips by norm only"):
        check_consistent(zero_config(2), 1.0, "value", "32-true")
    check_consistent({**zero_config(2), "gradient_clipping": 0.5}, 0.5, "norm", "32-true")  # agreeing is fine


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_real_zero_checkpoint_exports_to_transformers_with_identical_logits(deepspeed_run, tmp_path, stage):
    out, report = deepspeed_run
    losses = report[f"zero{stage}_losses"]
    assert losses[-1] < losses[0] - 0.5, losses  # DeepSpeed really trained it on CPU
    assert export([str(out / f"zero{stage}"), "--out", str(tmp_path / "hf")]) == 0
    model, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    expected = torch.load(out / f"zero{stage}_logits.pt", weights_only=True)
    theirs = hf_logits(model.float().eval(), expected)[..., :expected["logits"].shape[-1]]
    assert (theirs - expected["logits"]).abs().max() < 1e-5
    assert expected["logits"].abs().max() > 0.1


@pytest.mark.slow
def test_zero3_needs_the_vision_tower_parameters_registered(deepspeed_run):
    # 3 direct ViT parameters (class/position embedding, projection) + 2 blocks x out_proj (weight, bias)
    assert deepspeed_run[1]["zero3_external_parameters"] == 3 + 2 * 2


@pytest.mark.slow
def test_deepspeed_files_load_weights_only(deepspeed_run, tmp_path, capsys):
    """A checkpoint file that pickles anything beyond DeepSpeed's enums is refused, not executed."""
    import shutil

    out, _ = deepspeed_run
    bad = tmp_path / "bad"
    shutil.copytree(out / "zero2", bad)
    state_file = bad / "checkpoint" / "mp_rank_00_model_states.pt"
    state = torch.load(state_file, weights_only=False)  # our own file, written by the job above
    state["payload"] = _Tiny  # any class outside the allow-list
    torch.save(state, state_file)
    assert export([str(bad), "--out", str(tmp_path / "hf")]) == 2
    assert "refused to unpickle (WeightsUnpickler error: Unsupported global: GLOBAL" in capsys.readouterr().err
