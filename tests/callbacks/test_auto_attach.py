"""AutoAttach inside real Trainers: what it attaches, what it leaves alone, and resuming."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optdiag.autoattach import ENV_VAR
from lightning_optdiag.callbacks import (
    AutoAttach,
    CurvatureMonitor,
    GradientMonitor,
    NonFiniteGuard,
    OptimizerSwitch,
    ScheduleAdvisor,
    TrainingDoctor,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than"),
    # The resume test restores without the ModelCheckpoint that wrote the checkpoint, on purpose.
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
]

OPTDIAG = (
    AutoAttach,
    CurvatureMonitor,
    GradientMonitor,
    NonFiniteGuard,
    OptimizerSwitch,
    ScheduleAdvisor,
    TrainingDoctor,
)
QUIET: dict[str, Any] = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "accelerator": "cpu",
    "max_steps": 12,
}


class Regressor(LightningModule):
    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.automatic_optimization = not manual

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.net(inputs), targets)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(loss)
            optimizer.step()  # type: ignore[union-attr]
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(96, 4, generator=generator)
        targets = inputs.sum(dim=1, keepdim=True)
        return DataLoader(TensorDataset(inputs, targets), batch_size=8)


def optdiag_callbacks(trainer: Trainer) -> list[Callback]:
    return [c for c in trainer.callbacks if isinstance(c, OPTDIAG)]  # type: ignore[attr-defined]


def fit(callbacks: list[Callback] | None = None, manual: bool = False, **kwargs: Any) -> Trainer:
    seed_everything(0)
    trainer = Trainer(callbacks=callbacks, **{**QUIET, **kwargs})
    trainer.fit(Regressor(manual=manual))
    return trainer


def test_nothing_is_attached_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert optdiag_callbacks(fit()) == []


def test_the_variable_attaches_the_four_monitors_and_they_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_VAR, "1")
    seed_everything(0)
    trainer = Trainer(**QUIET)
    assert [type(c) for c in optdiag_callbacks(trainer)] == [AutoAttach]
    trainer.fit(Regressor())
    attached = optdiag_callbacks(trainer)
    assert [type(c) for c in attached] == [
        GradientMonitor,
        NonFiniteGuard,
        CurvatureMonitor,
        TrainingDoctor,
    ]
    monitor, _, _, doctor = attached
    assert monitor.latest[0].total > 0  # type: ignore[attr-defined]
    assert doctor._monitors[0] is monitor  # type: ignore[attr-defined]
    assert len(doctor._losses) == QUIET["max_steps"]  # type: ignore[attr-defined]


def test_callbacks_the_user_passed_are_not_duplicated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "gradient,doctor")
    mine = GradientMonitor(log_every_n_steps=3)
    trainer = fit(callbacks=[mine])
    attached = optdiag_callbacks(trainer)
    assert [type(c) for c in attached] == [GradientMonitor, TrainingDoctor]
    assert attached[0] is mine
    assert mine.latest[0].total > 0


def test_manual_optimization_leaves_out_the_curvature_monitor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_VAR, "all")
    trainer = fit(manual=True)
    assert [type(c) for c in optdiag_callbacks(trainer)] == [
        GradientMonitor,
        NonFiniteGuard,
        TrainingDoctor,
    ]


def test_the_attached_monitors_leave_training_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    plain = fit()
    monkeypatch.setenv(ENV_VAR, "1")
    watched = fit()
    assert len(optdiag_callbacks(watched)) == 4
    for a, b in zip(
        plain.lightning_module.parameters(), watched.lightning_module.parameters(), strict=True
    ):
        assert torch.equal(a, b)


class _DoctorState(Callback):
    """The auto-attached doctor's loss history when training (re)starts."""

    def __init__(self) -> None:
        self.losses: list[float] | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        doctor = next(c for c in trainer.callbacks if isinstance(c, TrainingDoctor))  # type: ignore[attr-defined]
        self.losses = list(doctor._losses)


def test_attached_callbacks_resume_from_a_checkpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV_VAR, "doctor")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = fit(callbacks=[checkpoint], enable_checkpointing=True, default_root_dir=tmp_path)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    (doctor_state,) = [state for key, state in saved.items() if "TrainingDoctor" in key]
    assert len(doctor_state["losses"]) == QUIET["max_steps"]

    probe = _DoctorState()
    seed_everything(0)
    trainer = Trainer(
        callbacks=[probe], **{**QUIET, "max_steps": 16, "default_root_dir": str(tmp_path)}
    )
    trainer.fit(Regressor(), ckpt_path=tmp_path / "last.ckpt")
    assert probe.losses == doctor_state["losses"]
    assert first.global_step == QUIET["max_steps"]
    assert trainer.global_step == 16
