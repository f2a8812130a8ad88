"""``optdiag demo``: train a small model on built-in synthetic data with the callbacks attached.

Each scenario reproduces a training problem on purpose, so that what the callbacks report can be
seen (and checked) without any data or setup:

- ``healthy``: a regression MLP trained with Adam; nothing should be reported.
- ``nan``: plain SGD with a learning rate that blows up: the weights grow until the gradients
  overflow; NonFiniteGuard skips each non-finite step (weights and optimizer state stay
  finite) and stops training after 10 in a row, naming the step and the parameters.
- ``exploding``: a few batches carry outlier targets (scaled by 100): the gradient norm spikes far
  above its running median at exactly those steps, and GradientMonitor flags each one.
- ``saddle``: a two-layer linear network initialised to zero: every gradient is exactly zero
  although the loss is high; the Hessian has a clearly negative eigenvalue: a saddle point.
- ``oscillation``: linear regression on unstandardised features (scales 1 to 10) with a
  learning rate 1.5x the stability threshold ``2 / lambda_max``; gradient clipping keeps it from
  diverging, so the iterates bounce between the walls of the ravine and the loss is stuck with
  a large gradient: the learning rate is too high.
- ``plateau``: a linear model fitted to a non-linear target: it converges to the best linear fit,
  a minimum with a high loss: model bias.
- ``overfitting``: a wide MLP on 64 noisy training samples: the validation loss turns up while
  the training loss keeps falling.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["SCENARIOS", "DemoResult", "Scenario", "run_demo"]

Loaders = tuple[DataLoader[tuple[Tensor, ...]], DataLoader[tuple[Tensor, ...]] | None]


@dataclass(frozen=True)
class Scenario:
    """A reproducible training problem.

    Attributes:
        description: one line for the command's help.
        expected: the diagnoses the doctor should report (empty: none at all).
        model: builds the network from a seed.
        data: builds the training and (optional) validation loaders from a seed.
        optimizer: builds the optimizer from the module and the training loader.
        outlier_steps: steps whose targets are multiplied by 100.
        trainer: extra Trainer arguments.
        init: ``"default"`` or ``"zeros"`` (every parameter set to zero).
        switch: attach ``OptimizerSwitch(policy="swats")``.
    """

    description: str
    expected: tuple[str, ...]
    model: Callable[[], nn.Module]
    data: Callable[[int], Loaders]
    optimizer: Callable[[nn.Module, Any], torch.optim.Optimizer]
    outlier_steps: tuple[int, ...] = ()
    trainer: dict[str, Any] = field(default_factory=dict)
    init: str = "default"
    switch: bool = False


# ------------------------------------------------------------------------------------ data
def _regression_data(seed: int, samples: int = 2048, validation: int = 0) -> Loaders:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples + validation, 16, generator=generator)
    weights = torch.randn(16, 1, generator=generator)
    weights = 2.0 * weights / weights.norm()  # a target a small MLP learns within the demo
    noise = 0.1 * torch.randn(samples + validation, 1, generator=generator)
    targets = torch.sin(inputs @ weights) + noise
    train = TensorDataset(inputs[:samples], targets[:samples])
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=generator)
    if not validation:
        return loader, None
    held_out = TensorDataset(inputs[samples:], targets[samples:])
    return loader, DataLoader(held_out, batch_size=validation)


def _regression_with_validation(seed: int) -> Loaders:
    return _regression_data(seed, validation=512)


def _linear_data(seed: int, samples: int = 2048) -> Loaders:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 16, generator=generator)
    targets = inputs @ torch.randn(16, 1, generator=generator)
    targets = targets + 0.1 * torch.randn(samples, 1, generator=generator)
    loader = DataLoader(
        TensorDataset(inputs, targets), batch_size=32, shuffle=True, generator=generator
    )
    return loader, None


def _ravine_data(seed: int, samples: int = 256) -> Loaders:
    """Features on scales from 1 to 10: the loss surface is a long, narrow ravine."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, 1, 8)
    inputs = torch.randn(samples, 8, generator=generator) * scales
    targets = inputs @ torch.randn(8, 1, generator=generator)
    targets = targets + 0.1 * torch.randn(samples, 1, generator=generator)
    dataset = TensorDataset(inputs, targets)
    return DataLoader(dataset, batch_size=samples), None  # full batch: a deterministic ravine


def _nonlinear_data(seed: int, samples: int = 2048) -> Loaders:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 16, generator=generator)
    weights = torch.randn(16, 1, generator=generator)
    targets = torch.sin(2.0 * inputs @ weights) + 0.1 * torch.randn(samples, 1, generator=generator)
    loader = DataLoader(
        TensorDataset(inputs, targets), batch_size=64, shuffle=True, generator=generator
    )
    return loader, None


def _small_noisy_data(seed: int) -> Loaders:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(16, 1, generator=generator)

    def sample(count: int) -> TensorDataset:
        inputs = torch.randn(count, 16, generator=generator)
        noise = 0.5 * torch.randn(count, 1, generator=generator)
        return TensorDataset(inputs, torch.sin(inputs @ weights) + noise)

    train = DataLoader(sample(64), batch_size=16, shuffle=True, generator=generator)
    return train, DataLoader(sample(512), batch_size=512)


# ----------------------------------------------------------------------------------- models
def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )


def _wide_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1)
    )


def _deep_linear() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 1, bias=False))


def _linear_16() -> nn.Module:
    return nn.Linear(16, 1)


def _linear_8() -> nn.Module:
    return nn.Linear(8, 1)


# ------------------------------------------------------------------------------- optimizers
def _adam(lr: float) -> Callable[[nn.Module, Any], torch.optim.Optimizer]:
    return lambda module, loader: torch.optim.Adam(module.parameters(), lr=lr)


def _sgd(lr: float, momentum: float = 0.0) -> Callable[[nn.Module, Any], torch.optim.Optimizer]:
    return lambda module, loader: torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum)


def _sgd_beyond_stability(factor: float) -> Callable[[nn.Module, Any], torch.optim.Optimizer]:
    """SGD at ``factor`` times the stability threshold ``2 / lambda_max`` of the data's
    (constant) MSE Hessian, ``2 X^T X / N`` for the weights and the bias together."""

    def build(module: nn.Module, loader: Any) -> torch.optim.Optimizer:
        inputs, _ = loader.dataset.tensors
        augmented = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)
        top = float(torch.linalg.eigvalsh(2.0 * augmented.T @ augmented / len(inputs))[-1])
        return torch.optim.SGD(module.parameters(), lr=factor * 2.0 / top)

    return build


SCENARIOS: dict[str, Scenario] = {
    "healthy": Scenario(
        "a regression MLP trained with Adam (nothing should be reported)",
        (),
        _mlp,
        _regression_data,
        _adam(3e-3),
    ),
    "nan": Scenario(
        "SGD with a learning rate that blows up (NaN/inf)",
        ("nonfinite", "exploding_gradients"),
        _mlp,
        _regression_data,
        _sgd(2.0),
    ),
    "exploding": Scenario(
        "outlier batches (targets x100) at steps 60, 120 and 180: gradient spikes, which "
        "clipping keeps from derailing training",
        ("exploding_gradients",),
        _mlp,
        _regression_data,
        _sgd(0.05, momentum=0.9),
        outlier_steps=(60, 120, 180),
        trainer={"gradient_clip_val": 1.0},
    ),
    "saddle": Scenario(
        "a two-layer linear network initialised to zero: stuck at a saddle point",
        ("plateau", "saddle_point"),
        _deep_linear,
        _linear_data,
        _sgd(0.05),
        init="zeros",
    ),
    "oscillation": Scenario(
        "unstandardised features, SGD at 1.5x the stability threshold with clipping: "
        "the loss is stuck with a large gradient",
        ("plateau", "lr_too_high"),
        _linear_8,
        _ravine_data,
        _sgd_beyond_stability(1.5),
        trainer={"gradient_clip_val": 40.0},
    ),
    "plateau": Scenario(
        "a linear model on a non-linear target: a minimum with a high loss",
        ("plateau", "local_minimum", "model_bias"),
        _linear_16,
        _nonlinear_data,
        _sgd(0.1),
    ),
    "switch": Scenario(
        "Adam until its step settles on an SGD learning rate, then momentum SGD (SWATS)",
        (),
        _mlp,
        _regression_with_validation,
        _adam(3e-3),
        trainer={"val_check_interval": 100, "check_val_every_n_epoch": None},
        switch=True,
    ),
    "overfitting": Scenario(
        "a wide MLP on 64 noisy samples: validation loss turns up",
        ("overfitting",),
        _wide_mlp,
        _small_noisy_data,
        _adam(3e-3),
        trainer={"check_val_every_n_epoch": 5},
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
    curvature: Any = None
    doctor: Any = None


def make_module(scenario: Scenario, seed: int, train: Any = None) -> Any:
    """The demo's LightningModule (built lazily: importing Lightning takes a second)."""
    from lightning.pytorch import LightningModule

    class DemoModule(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.net = scenario.model()
            if scenario.init == "zeros":
                with torch.no_grad():
                    for param in self.net.parameters():
                        param.zero_()

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            inputs, targets = batch
            if self.global_step in scenario.outlier_steps:
                targets = targets * 100.0
            loss = nn.functional.mse_loss(self.net(inputs), targets)
            self.log("train_loss", loss, prog_bar=False)
            return loss

        def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
            inputs, targets = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(inputs), targets))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return scenario.optimizer(self.net, train)

    return DemoModule()


def make_data(seed: int, samples: int = 2048) -> DataLoader[tuple[Tensor, ...]]:
    """The healthy scenario's training data (kept for the examples and benchmarks)."""
    return _regression_data(seed, samples)[0]


def run_demo(
    scenario: str = "healthy",
    steps: int = 240,
    logdir: str | Path = "optdiag_logs",
    seed: int = 0,
    console: bool = False,
) -> DemoResult:
    """Run one scenario with every optdiag callback attached; return what they recorded.

    Args:
        scenario: a key of :data:`SCENARIOS`.
        steps: optimizer steps.
        logdir: where the TensorBoard logs go (``<logdir>/<scenario>/version_<n>``).
        seed: seeds the data, the model and Lightning.
        console: let the doctor print its panels and final report.

    Raises:
        ValueError: ``scenario`` is unknown or ``steps`` is not positive.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"Invalid scenario: {scenario!r} (expected one of {', '.join(SCENARIOS)})")
    if steps < 1:
        raise ValueError(f"Invalid steps: {steps} (expected an integer >= 1)")
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_optdiag.callbacks import (
        CurvatureMonitor,
        GradientMonitor,
        NonFiniteError,
        NonFiniteGuard,
        OptimizerSwitch,
        TrainingDoctor,
    )

    _quiet_lightning()
    seed_everything(seed, verbose=False)
    spec = SCENARIOS[scenario]
    monitor = GradientMonitor(log_every_n_steps=10)
    guard = NonFiniteGuard(action="skip", locate=True, max_consecutive_skips=10)
    # The demo's models take about a millisecond per step, so any Hessian check costs dozens of
    # steps: at the default 5% budget the first scheduled check would come after the demo ends.
    curvature = CurvatureMonitor(every_n_steps=50, max_overhead=None)
    doctor = TrainingDoctor(check_every_n_steps=20, window=100, console=console)
    logger = TensorBoardLogger(save_dir=str(logdir), name=scenario, default_hp_metric=False)
    train, val = spec.data(seed)
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": steps,
        "max_epochs": -1,
        "logger": logger,
        "callbacks": [monitor, guard, curvature, doctor]
        + ([OptimizerSwitch(policy="swats", verbose=console)] if spec.switch else []),
        "log_every_n_steps": 10,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        **spec.trainer,
    }
    if val is None:
        options["limit_val_batches"] = 0
    trainer = Trainer(**options)
    module = make_module(spec, seed, train)
    started = time.perf_counter()
    stopped: str | None = None
    with warnings.catch_warnings():
        # The guard's warnings are summarised by the caller; Lightning's are noise here.
        warnings.simplefilter("ignore")
        try:
            trainer.fit(module, train, val)
        except NonFiniteError as error:
            stopped = str(error)  # the doctor has judged and recorded the run (on_exception)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        inputs, targets = train.dataset.tensors  # type: ignore[attr-defined]
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
        curvature,
        doctor,
    )


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
