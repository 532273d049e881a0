"""`optim.fused`: torch's fused AdamW is the same optimiser as the default one, and `auto` only picks it when
every trainable parameter allows it."""
import lightning as L
import pytest
import torch

from vlsafe.builders import TinyVLM
from vlsafe.data.encoding.encoders import ConversationEncoder
from vlsafe.data.synthetic.world import generate
from vlsafe.methods.base import fused_adamw_blocker
from vlsafe.methods.sft import SFTModule

STEPS = 4


def _train(fused: str) -> tuple[SFTModule, torch.optim.Optimizer, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    module = SFTModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, max_length=256),
                       optim={"lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 2, "schedule": "cosine",
                              "projector_lr": 5e-3, "fused": fused})
    start = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    encoder = ConversationEncoder(module.processor)
    samples = list(generate(4 * STEPS, seed=3, kinds=["qa"]))
    batches = [encoder.collate([encoder.encode(s) for s in samples[i:i + 4]]) for i in range(0, len(samples), 4)]
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return module, trainer.optimizers[0], start


@pytest.fixture(scope="module")
def fused_and_default():
    return _train("auto"), _train("false")


def test_fused_adamw_gives_the_weights_of_the_default_adamw(fused_and_default):
    (fused, fused_opt, start), (default, default_opt, _) = fused_and_default
    assert all(g["fused"] for g in fused_opt.param_groups), "auto picks the fused kernel for plain CPU tensors"
    assert not any(g["fused"] for g in default_opt.param_groups)
    trained = dict(default.named_parameters())
    moved = 0.0
    for name, param in fused.named_parameters():
        if name in start:
            torch.testing.assert_close(param, trained[name], atol=1e-6, rtol=1e-5, msg=name)
            moved = max(moved, float((param.detach() - start[name]).abs().max()))
    assert moved > 1e-2, "the weights must have moved for the comparison to mean anything"
    # the optimiser states (moments) agree too, so a resumed run continues identically
    for a, b in zip(fused_opt.state.values(), default_opt.state.values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], atol=1e-9, rtol=1e-5)


def test_auto_falls_back_and_true_names_the_parameter_that_prevents_fusing():
    class Quantised(torch.Tensor):
        pass

    assert fused_adamw_blocker([("w", torch.nn.Parameter(torch.zeros(2)))]) is None
    assert "step has dtype torch.int64" in fused_adamw_blocker([("step", torch.zeros(2, dtype=torch.long))])
    module = SFTModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64), optim={"fused": "true"})
    module.trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False)
    linear = module.vlm.projector[0]
    linear.weight = torch.nn.Parameter(linear.weight.detach().as_subclass(Quantised))
    with pytest.raises(ValueError, match=r"optim.fused=true.*vlm.projector.0.weight is a Quantised"):
        module.configure_optimizers()
    module.optim.fused = "auto"
    assert not any(g["fused"] for g in module.configure_optimizers()["optimizer"].param_groups)


def test_an_unknown_fused_setting_fails_at_construction():
    with pytest.raises(ValueError, match="optim.fused must be one of auto, true, false"):
        SFTModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64), optim={"fused": "fast"})
