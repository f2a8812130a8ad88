"""``optdiag demo``: train a small model on built-in synthetic data with the callbacks attached.

Each scenario reproduces a training problem on purpose, so that what the callbacks report can be
seen (and checked) without any data or setup:

- ``healthy``: a regression MLP trained with Adam; nothing should be reported.
- ``nan``: plain SGD with a learning rate that blows up: the weights grow until the gradients
  overflow; NonFiniteGuard skips each non-finite step (weights and optimizer state stay
  finite) and stops training after 10 in a row, naming the step and the parameters.
- ``exploding``: a few batches carry outlier targets (scaled by 100): the gradient norm spikes far
  above its running median at exactly those steps, and GradientMonitor flags each one.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["SCENARIOS", "DemoResult", "run_demo"]


@dataclass(frozen=True)
class Scenario:
    description: str
    optimizer: str
    lr: float
    outlier_steps: tuple[int, ...] = ()


SCENARIOS: dict[str, Scenario] = {
    "healthy": Scenario(
        "a regression MLP trained with Adam (nothing should be reported)", "adam", 3e-3
    ),
    "nan": Scenario("SGD with a learning rate that blows up (NaN/inf)", "sgd", 2.0),
    "exploding": Scenario(
        "outlier batches (targets x100) at steps 60, 120 and 180: gradient spikes",
        "adam",
        3e-3,
        (60, 120, 180),
    ),
}


@dataclass
class DemoResult:
    """What a demo run produced, for printing and for tests."""

    scenario: str
    steps: int
    seconds: float
    logdir: Path
    monitor: Any
    guard: Any
    final_loss: float
    stopped: str | None = None


def make_module(scenario: Scenario, seed: int) -> Any:
    """The demo's LightningModule (built lazily: importing Lightning takes a second)."""
    from lightning.pytorch import LightningModule

    class DemoRegressor(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
            )

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            inputs, targets = batch
            if self.global_step in scenario.outlier_steps:
                targets = targets * 100.0
            loss = nn.functional.mse_loss(self.net(inputs), targets)
            self.log("train_loss", loss, prog_bar=False)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            if scenario.optimizer == "sgd":
                return torch.optim.SGD(self.parameters(), lr=scenario.lr)
            return torch.optim.Adam(self.parameters(), lr=scenario.lr)

    return DemoRegressor()


def make_data(seed: int, samples: int = 2048) -> DataLoader[tuple[Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 16, generator=generator)
    weights = torch.randn(16, 1, generator=generator)
    targets = torch.sin(inputs @ weights) + 0.1 * torch.randn(samples, 1, generator=generator)
    return DataLoader(
        TensorDataset(inputs, targets), batch_size=32, shuffle=True, generator=generator
    )


def run_demo(
    scenario: str = "healthy", steps: int = 240, logdir: str | Path = "optdiag_logs", seed: int = 0
) -> DemoResult:
    """Run one scenario and return the callbacks with what they recorded.

    Raises:
        ValueError: ``scenario`` is unknown or ``steps`` is not positive.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"Invalid scenario: {scenario!r} (expected one of {', '.join(SCENARIOS)})")
    if steps < 1:
        raise ValueError(f"Invalid steps: {steps} (expected an integer >= 1)")
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_optdiag.callbacks import GradientMonitor, NonFiniteError, NonFiniteGuard

    _quiet_lightning()
    seed_everything(seed, verbose=False)
    spec = SCENARIOS[scenario]
    monitor = GradientMonitor(log_every_n_steps=10)
    guard = NonFiniteGuard(action="skip", locate=True, max_consecutive_skips=10)
    logger = TensorBoardLogger(save_dir=str(logdir), name=scenario, default_hp_metric=False)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=logger,
        callbacks=[monitor, guard],
        log_every_n_steps=10,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = make_module(spec, seed)
    data = make_data(seed)
    started = time.perf_counter()
    stopped: str | None = None
    with warnings.catch_warnings():
        # The guard's warnings are summarised by the caller; Lightning's are noise here.
        warnings.simplefilter("ignore")
        try:
            trainer.fit(module, data)
        except NonFiniteError as error:
            stopped = str(error)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        inputs, targets = data.dataset.tensors  # type: ignore[attr-defined]
        final_loss = float(nn.functional.mse_loss(module.net(inputs), targets))
    return DemoResult(
        scenario,
        trainer.global_step,
        seconds,
        Path(logger.log_dir),
        monitor,
        guard,
        final_loss,
        stopped,
    )


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
