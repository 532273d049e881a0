"""NaN/Inf during training: a bad step is skipped (weights and optimizer state untouched) with a warning;
when bad steps persist, training stops with a clear error and a checkpoint of the last good weights."""
import math

import lightning as L
import pytest
import torch

from vlsafe.builders import TinyVLM
from vlsafe.data.synthetic.module import SyntheticWorld
from vlsafe.methods.sft import SFTModule
from vlsafe.ops.nonfinite import (
    NonFiniteGuard,
    NonFiniteStepWarning,
    NonFiniteTrainingError,
)


class Inject(L.Callback):
    """Poison chosen steps: NaN pixels (-> NaN loss) or an Inf gradient after a finite loss."""

    def __init__(self, nan_batches=(), inf_grad_batches=()):
        self.nan_batches, self.inf_grad_batches = set(nan_batches), set(inf_grad_batches)
        self.before, self.changed, self.adam_steps = {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step in self.nan_batches:
            batch["pixel_values"].fill_(float("nan"))
        self.before[step] = [p.detach().clone() for p in pl_module.parameters() if p.requires_grad]

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.inf_grad_batches:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        after = [p.detach() for p in pl_module.parameters() if p.requires_grad]
        self.changed[step] = any(not torch.equal(a, b) for a, b in zip(self.before[step], after))
        state = trainer.optimizers[0].state
        self.adam_steps[step] = max((float(s["step"]) for s in state.values()), default=0.0)


def tiny_run(tmp_path, guard, inject, max_steps):
    L.seed_everything(0)
    module = SFTModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64, vision_layers=1, num_layers=1),
                       optim={"lr": 1e-3, "warmup_steps": 0})
    data = SyntheticWorld(root=str(tmp_path / "world"), train_samples=64, val_samples=0, batch_size=4,
                          num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path / "run"), callbacks=[inject, guard])
    return module, data, trainer


def test_nan_loss_and_inf_gradient_steps_are_skipped_and_training_goes_on(tmp_path):
    guard = NonFiniteGuard(max_consecutive=3)
    inject = Inject(nan_batches={1}, inf_grad_batches={3})
    module, data, trainer = tiny_run(tmp_path, guard, inject, max_steps=6)
    with pytest.warns(NonFiniteStepWarning) as caught:
        trainer.fit(module, data)
    assert trainer.global_step == 6, "the run finishes"
    assert [r["step"] for r in guard.skipped_steps] == [1, 3]
    assert guard.skipped_steps[0]["problem"].startswith("loss=nan")
    assert guard.skipped_steps[1]["problem"] == "gradient norm=inf", "caught with a finite loss"
    assert all(guard.skipped_steps[0]["ids"]), "the warning names the samples of the bad batch"
    assert {s: inject.changed[s] for s in range(6)} == {0: True, 1: False, 2: True, 3: False, 4: True, 5: True}
    assert inject.adam_steps[1] == inject.adam_steps[0] and inject.adam_steps[3] == inject.adam_steps[2], \
        "a skipped step leaves AdamW's state (step count, moments) untouched"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    ours = [str(w.message) for w in caught if issubclass(w.category, NonFiniteStepWarning)]
    assert len(ours) == 2 and "step 1: skipped the optimizer step because of a non-finite loss=nan" in ours[0]


def test_persistent_nan_stops_with_a_checkpoint_of_the_last_good_weights(tmp_path):
    guard = NonFiniteGuard(max_consecutive=2)
    inject = Inject(nan_batches=set(range(2, 100)))
    module, data, trainer = tiny_run(tmp_path, guard, inject, max_steps=10)
    with pytest.warns(NonFiniteStepWarning), pytest.raises(NonFiniteTrainingError) as err:
        trainer.fit(module, data)
    message = str(err.value)
    assert "2 optimizer steps in a row had a non-finite loss" in message and "gradient clipping" in message
    path = tmp_path / "run" / "nonfinite-stop-step4.ckpt"
    assert str(path) in message and path.exists()
    raw = torch.load(path, weights_only=True, map_location="cpu")
    good = dict(zip([n for n, p in module.named_parameters() if p.requires_grad], inject.before[2]))
    for name, value in good.items():
        torch.testing.assert_close(raw["state_dict"][name], value, rtol=0, atol=0)
    assert all(torch.isfinite(v).all() for v in raw["state_dict"].values() if v.is_floating_point())
    assert raw["callbacks"]["NonFiniteGuard"]["consecutive"] == 2
    reloaded = SFTModule.load_from_checkpoint(path, weights_only=True)
    assert all(math.isfinite(float(p.abs().sum())) for p in reloaded.parameters())
