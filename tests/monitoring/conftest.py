"""Two real tiny training runs shared by the monitoring tests: SFT (CSV + TensorBoard, throughput with a peak,
answer accuracy) and BPO (CSV, throughput without a peak, safety rate)."""
from __future__ import annotations

import copy
import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from vlsafe.builders import TinyVLM
from vlsafe.data.synthetic.module import SyntheticWorld
from vlsafe.monitoring.throughput import VLMThroughputMonitor

PEAK_FLOPS = 1.0e11
STEPS, BATCH = 24, 8


class Recorder(L.Callback):
    """What the training loop really saw: each batch's loss, samples and tokens, and the first batch itself."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.samples: list[int] = []
        self.tokens: list[int] = []
        self.first_batch: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.first_batch is None:
            self.first_batch = copy.deepcopy(batch)
        self.losses.append(float(outputs["loss"]))
        self.samples.append(len(batch["ids"]))
        self.tokens.append(int(batch["attention_mask"].sum()))


@dataclass
class Run:
    log_dir: Path
    root: Path
    module: L.LightningModule
    data: SyntheticWorld
    monitor: VLMThroughputMonitor
    recorder: Recorder
    extra: dict[str, Any] = field(default_factory=dict)

    def csv_columns(self) -> dict[str, list[tuple[int, float]]]:
        """metrics.csv as {column: [(step, value), ...]}, read independently of vlsafe.monitoring.logs."""
        columns: dict[str, list[tuple[int, float]]] = {}
        with open(self.log_dir / "metrics.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                for name, text in row.items():
                    if name not in ("step", "epoch") and text:
                        columns.setdefault(name, []).append((int(row["step"]), float(text)))
        return columns


def _quiet_trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> Run:
    from vlsafe.eval.callbacks import AnswerAccuracy
    from vlsafe.methods.sft import SFTModule

    root = tmp_path_factory.mktemp("sft_run")
    L.seed_everything(0)
    module = SFTModule(vlm=TinyVLM(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, max_length=256),
                       optim={"lr": 1e-3, "warmup_ratio": 0.1})
    data = SyntheticWorld(root=str(root / "world"), kinds=["qa"], train_samples=STEPS * BATCH, val_samples=40,
                          batch_size=BATCH, num_workers=0)
    monitor, recorder = VLMThroughputMonitor(window_size=4, peak_flops=PEAK_FLOPS), Recorder()
    trainer = _quiet_trainer(max_steps=STEPS, log_every_n_steps=1, val_check_interval=12,
                             logger=[CSVLogger(root), TensorBoardLogger(root, name="tensorboard",
                                                                        default_hp_metric=False)],
                             callbacks=[monitor, recorder, LearningRateMonitor(logging_interval="step"),
                                        AnswerAccuracy(synthetic_samples=16, max_samples=16, generate=False)])
    trainer.fit(module, data)
    for logger in trainer.loggers:
        logger.finalize("success")
    return Run(Path(trainer.log_dir), root, module, data, monitor, recorder,
               {"tensorboard_dir": Path(trainer.loggers[1].log_dir)})


@pytest.fixture(scope="session")
def bpo_run(tmp_path_factory) -> Run:
    from vlsafe.eval.safety import SafetyRate
    from vlsafe.methods.preference.module import PreferenceModule

    root = tmp_path_factory.mktemp("bpo_run")
    L.seed_everything(0)
    module = PreferenceModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                          max_length=256),
                              blind="sum", reference="copy", sft_weight=1.0, optim={"lr": 3e-3})
    data = SyntheticWorld(root=str(root / "world"), kinds=["preference"], train_samples=32, val_samples=8,
                          batch_size=4, num_workers=0)
    monitor, recorder = VLMThroughputMonitor(window_size=3), Recorder()
    trainer = _quiet_trainer(max_steps=8, log_every_n_steps=1, val_check_interval=4, logger=CSVLogger(root),
                             callbacks=[monitor, recorder,
                                        SafetyRate(synthetic_samples=8, kinds=["preference"], max_new_tokens=6)])
    trainer.fit(module, data)
    return Run(Path(trainer.log_dir), root, module, data, monitor, recorder)
