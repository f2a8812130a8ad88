"""OptimizerSwitch on real Lightning runs, checked against independent references.

References: the projections ``p.p`` / ``p.g`` recomputed here from parameter snapshots taken
before and after each optimizer step; the bundled :class:`lightning_optdiag.optim.SWATS`
optimizer (global mode) on the same problem, seeds and data; a plain PyTorch loop with
``torch.optim.SGD`` (or the registry target) started from the weights at the switch; an
uninterrupted run for checkpoint/resume; the closed-form cosine schedule for scheduler re-binding.

The realistic problem: an 8-32-32-1 tanh MLP regressing a sum of sines (1024 training and 256
validation samples, batch 32, 32 steps per epoch, no shuffling so that every run and every
resumed run sees the same batches), trained with Adam at lr 3e-3 from seed 0.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optdiag.callbacks import OptimizerSwitch, SwitchEvent, TrainingDoctor
from lightning_optdiag.callbacks import training_doctor as training_doctor_module
from lightning_optdiag.callbacks.optimizer_switch import _adam_projections
from lightning_optdiag.diagnosis import Finding
from lightning_optdiag.optim import SWATS
from lightning_optdiag.signals import SwatsCriterion
from tests.callbacks.conftest import assert_rejected
from tests.ddp import run_scenario

REPO_ROOT = Path(__file__).resolve().parents[2]
FEATURES = 8
BATCH = 32
TRAIN_SAMPLES = 1024
STEPS_PER_EPOCH = TRAIN_SAMPLES // BATCH
QUIET: dict[str, Any] = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "accelerator": "cpu",
    "num_sanity_val_steps": 0,
}
BETA1 = 0.9

Snapshot = dict[str, Tensor]


# ----------------------------------------------------------------------------- the problem
@functools.cache
def regression_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and validation sets of one teacher: y = sum(sin(x @ W)) + 0.1 noise."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(TRAIN_SAMPLES, FEATURES, generator=generator)
    teacher = torch.randn(FEATURES, 4, generator=generator)
    y = torch.sin(x @ teacher).sum(1, keepdim=True)
    y = y + 0.1 * torch.randn(TRAIN_SAMPLES, 1, generator=generator)
    val_x = torch.randn(256, FEATURES, generator=generator)
    val_y = torch.sin(val_x @ teacher).sum(1, keepdim=True)
    val_y = val_y + 0.1 * torch.randn(256, 1, generator=generator)
    return x, y, val_x, val_y


def train_loader() -> DataLoader[Any]:
    x, y, _, _ = regression_data()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def val_loader() -> DataLoader[Any]:
    _, _, x, y = regression_data()
    return DataLoader(TensorDataset(x, y), batch_size=256, shuffle=False)


def train_batch(step: int) -> tuple[Tensor, Tensor]:
    """The batch of 0-based optimizer step ``step`` (no accumulation)."""
    x, y, _, _ = regression_data()
    index = step % STEPS_PER_EPOCH
    return x[index * BATCH : (index + 1) * BATCH], y[index * BATCH : (index + 1) * BATCH]


class Regression(LightningModule):
    """The MLP, with the optimizer (and optional schedule / param groups) picked by name."""

    def __init__(
        self,
        optimizer: str = "adam",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        scheduler: str | None = None,
        total_steps: int = 64,
        groups: bool = False,
        manual: bool = False,
        huge_at: int | None = None,
        swats_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
        )
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.amsgrad = amsgrad
        self.scheduler_name = scheduler
        self.total_steps = total_steps
        self.groups = groups
        self.automatic_optimization = not manual
        self.huge_at = huge_at
        self.swats_kwargs = dict(swats_kwargs or {})
        self.seen_optimizers: list[Any] = []  # what self.optimizers() returned, per manual step

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.mse_loss(self.net(x).float(), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        loss = self.loss(batch)
        if batch_idx == self.huge_at:
            loss = loss * 1e30  # finite in float32, overflows float16 gradients
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        self.seen_optimizers.append(optimizer)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return None

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self) -> Any:
        if self.groups:
            first, rest = list(self.net[0].parameters()), list(self.net[2:].parameters())
            params: Any = [
                {"params": first, "lr": self.lr, "weight_decay": 0.01},
                {"params": rest, "lr": self.lr / 4},
            ]
        else:
            params = self.parameters()
        if self.optimizer_name == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=self.lr, weight_decay=self.weight_decay, amsgrad=self.amsgrad
            )
        elif self.optimizer_name == "adamw":
            optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        elif self.optimizer_name == "swats":
            optimizer = SWATS(
                params, lr=self.lr, weight_decay=self.weight_decay, **self.swats_kwargs
            )
        else:
            optimizer = torch.optim.SGD(params, lr=self.lr)
        if self.scheduler_name is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def make_module(seed: int = 0, **kwargs: Any) -> Regression:
    torch.manual_seed(seed)
    return Regression(**kwargs)


def fit(
    module: LightningModule,
    callbacks: list[Callback],
    steps: int,
    val: bool = False,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> Trainer:
    options = {**QUIET, "devices": 1, **trainer_kwargs}
    if not val:
        options["limit_val_batches"] = 0
    trainer = Trainer(max_steps=steps, callbacks=callbacks, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*`training_step` returned `None`.*")
        warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
        # Mid-epoch resumption (StepIndexed below makes the data independent of it).
        warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")
        trainer.fit(module, train_loader(), val_loader() if val else None, ckpt_path=ckpt_path)
    return trainer


# ------------------------------------------------------------------------------- references
def params_of(module: nn.Module) -> Snapshot:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def optimizer_state_of(optimizer: torch.optim.Optimizer, module: nn.Module) -> Snapshot:
    names = {id(p): n for n, p in module.named_parameters()}
    return {
        f"{names[id(param)]}[{key}]": value.detach().clone()
        for param, state in optimizer.state.items()
        for key, value in state.items()
        if isinstance(value, Tensor)
    }


def assert_bitwise_equal(actual: Snapshot, expected: Snapshot) -> None:
    assert actual.keys() == expected.keys()
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def flat(tensors: Any) -> Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def unwrap(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "_optimizer", optimizer)


class Recorder(Callback):
    """Per optimizer step ``k`` (1-based): the parameters after it, the optimizer that made it
    and the lr it used (read in ``on_before_optimizer_step``), and the step's own ``p.p`` and
    ``p.g`` from float64 snapshots taken before and after it (single-group optimizers).

    ``p`` excludes AdamW's decoupled decay (``+ lr * wd * theta_before``); ``g`` is the
    gradient Adam used (``+ wd * theta_before`` for Adam's L2 term)."""

    def __init__(self) -> None:
        self.params: dict[int, Snapshot] = {}
        self.optimizer_names: dict[int, str] = {}
        self.lrs: dict[int, float] = {}
        self.projections: dict[int, tuple[float, float]] = {}
        self.batch_step = -1
        self._before: tuple[Tensor, Tensor, float, float, bool] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.params[trainer.global_step] = params_of(pl_module)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batch_step = trainer.global_step

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        optimizer = unwrap(optimizer)
        group = optimizer.param_groups[0]
        params = [p for p in pl_module.parameters()]
        theta = flat(params)
        grad = flat(p.grad for p in params)
        decoupled = isinstance(optimizer, torch.optim.AdamW)
        lr, weight_decay = float(group["lr"]), float(group.get("weight_decay", 0.0))
        self._before = (theta, grad, lr, weight_decay, decoupled)
        step = trainer.global_step + 1
        self.optimizer_names[step] = type(optimizer).__name__
        self.lrs[step] = lr

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self.batch_step:
            return
        self.params[step] = params_of(pl_module)
        if self._before is None:
            return
        theta, grad, lr, weight_decay, decoupled = self._before
        move = flat(pl_module.parameters()) - theta
        if decoupled:
            move = move + lr * weight_decay * theta
        else:
            grad = grad + weight_decay * theta
        self.projections[step] = (float(move @ move), float(move @ grad))
        self._before = None


class CriterionInputs:
    """Records every ``SwatsCriterion.update`` call (monkeypatched on the class)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[float, float]] = []
        original = SwatsCriterion.update

        def update(criterion: SwatsCriterion, squared_norm: float, projection: float) -> bool:
            self.calls.append((squared_norm, projection))
            return original(criterion, squared_norm, projection)

        monkeypatch.setattr(SwatsCriterion, "update", update)


def paper_switch(
    projections: list[tuple[float, float]],
    beta2: float = 0.999,
    threshold: float = 5e-3,
    min_steps: int = 10,
) -> tuple[int, float] | None:
    """The first step where the relative SWATS test fires, and Lambda there (paper's formulas)."""
    average = 0.0
    for k, (squared_norm, projection) in enumerate(projections, start=1):
        if projection == 0.0:
            continue
        gamma = squared_norm / -projection
        average = beta2 * average + (1.0 - beta2) * gamma
        estimate = average / (1.0 - beta2**k)
        if k >= min_steps and estimate > 0 and abs(estimate - gamma) < threshold * estimate:
            return k, estimate
    return None


def sgd_reference(
    start: Snapshot, first_step: int, last_step: int, lr: float, **sgd_kwargs: Any
) -> Snapshot:
    """Plain torch: the MLP from ``start`` trained on steps ``first_step..last_step - 1`` by
    ``torch.optim.SGD(lr=lr, **sgd_kwargs)`` on a fresh state."""
    module = make_module()
    module.load_state_dict(start, strict=False)
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, **sgd_kwargs)
    for step in range(first_step, last_step):
        optimizer.zero_grad()
        module.loss(train_batch(step)).backward()
        optimizer.step()
    return params_of(module)


# --------------------------------------------------------------------- shared SWATS runs
SWATS_STEPS = 15 * STEPS_PER_EPOCH  # the switch comes at step 209 (measured)


@pytest.fixture(scope="module")
def swats_run() -> dict[str, Any]:
    """Adam 3e-3 + OptimizerSwitch("swats"), 480 steps; and the bundled SWATS optimizer on the
    same seed and data."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        switch = OptimizerSwitch(policy="swats", verbose=False)
        recorder = Recorder()
        module = make_module()
        trainer = fit(module, [switch, recorder], SWATS_STEPS)
        bundled_recorder = Recorder()
        bundled_module = make_module(optimizer="swats")
        bundled = fit(bundled_module, [bundled_recorder], SWATS_STEPS)
    finally:
        torch.set_num_threads(threads)
    return {
        "switch": switch,
        "recorder": recorder,
        "module": module,
        "optimizer": unwrap(trainer.optimizers[0]),
        "bundled": unwrap(bundled.optimizers[0]),
        "bundled_recorder": bundled_recorder,
    }


def test_swats_fires_on_the_realistic_problem(swats_run: dict[str, Any]) -> None:
    switch: OptimizerSwitch = swats_run["switch"]
    [event] = switch.events
    assert event.step == 209
    assert (event.from_optimizer, event.to_optimizer) == ("Adam", "sgdm")
    assert switch.lambda_estimate == pytest.approx(0.09376, rel=1e-3)
    assert event.lr == (1.0 - BETA1) * switch.lambda_estimate
    assert "Lambda = 0.09376" in event.reason
    assert event.epoch == 209 // STEPS_PER_EPOCH
    optimizer = swats_run["optimizer"]
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["dampening"]) == (
        event.lr,
        BETA1,
        False,
        0,
    )


def test_swats_matches_the_paper_rule_on_independently_measured_projections(
    swats_run: dict[str, Any],
) -> None:
    # The recorder measured every Adam step's p.p and p.g from parameter snapshots (float32
    # weights: the differences carry ~1e-6 relative rounding); the paper's rule on those fires
    # at the same step with the same Lambda.
    recorder: Recorder = swats_run["recorder"]
    switch: OptimizerSwitch = swats_run["switch"]
    [event] = switch.events
    measured = [recorder.projections[k] for k in range(1, event.step + 1)]
    assert paper_switch(measured) == (event.step, pytest.approx(switch.lambda_estimate, rel=1e-4))
    assert {recorder.optimizer_names[k] for k in range(1, event.step + 1)} == {"Adam"}
    assert {recorder.optimizer_names[k] for k in range(event.step + 1, SWATS_STEPS + 1)} == {"SGD"}


def test_swats_switches_where_the_bundled_swats_optimizer_does(swats_run: dict[str, Any]) -> None:
    switch: OptimizerSwitch = swats_run["switch"]
    [event] = switch.events
    [status] = swats_run["bundled"].switch_status()
    assert status.switched
    assert status.switch_step == event.step
    # Lambda to float32 rounding: the callback reduces Adam's state in float32.
    assert status.lambda_estimate == pytest.approx(switch.lambda_estimate, rel=1e-5)
    assert status.sgd_lr == pytest.approx(event.lr, rel=1e-5)
    # Both Adam phases are torch's Adam bit for bit: the same weights at the switch.
    mine = swats_run["recorder"].params
    bundled = swats_run["bundled_recorder"].params
    assert_bitwise_equal(mine[event.step], bundled[event.step])
    # And the same SGD phases after it, up to that rounding of the learning rate.
    torch.testing.assert_close(mine[SWATS_STEPS], bundled[SWATS_STEPS], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("threshold", "min_steps", "lr", "seed", "expected_step"),
    [(1e-2, 20, 3e-3, 0, 137), (1e-2, 50, 1e-3, 1, 50)],
)
def test_swats_settings_switch_where_the_bundled_swats_optimizer_does(
    threshold: float, min_steps: int, lr: float, seed: int, expected_step: int
) -> None:
    settings = {"switch_threshold": threshold, "switch_min_steps": min_steps}
    switch = OptimizerSwitch(policy="swats", verbose=False, **settings)
    fit(make_module(seed=seed, lr=lr), [switch], expected_step + 5)
    bundled = fit(
        make_module(seed=seed, lr=lr, optimizer="swats", swats_kwargs=settings),
        [],
        expected_step + 5,
    )
    [status] = unwrap(bundled.optimizers[0]).switch_status()
    assert [e.step for e in switch.events] == [status.switch_step] == [expected_step]
    assert status.lambda_estimate == pytest.approx(switch.lambda_estimate, rel=1e-5)


def test_after_the_switch_it_is_plain_momentum_sgd_bit_for_bit(swats_run: dict[str, Any]) -> None:
    switch: OptimizerSwitch = swats_run["switch"]
    [event] = switch.events
    recorder: Recorder = swats_run["recorder"]
    lr = (1.0 - BETA1) * switch.lambda_estimate
    expected = sgd_reference(
        recorder.params[event.step], event.step, SWATS_STEPS, lr, momentum=BETA1
    )
    assert_bitwise_equal(recorder.params[SWATS_STEPS], expected)
    # A fresh momentum buffer: starting from Adam's exp_avg instead would differ.
    assert set(swats_run["optimizer"].state[next(swats_run["module"].parameters())]) == {
        "momentum_buffer"
    }


def test_swats_switches_exactly_once_and_stays_stable(swats_run: dict[str, Any]) -> None:
    switch: OptimizerSwitch = swats_run["switch"]
    [event] = switch.events
    assert switch.switched
    recorder: Recorder = swats_run["recorder"]
    x, y, _, _ = regression_data()
    module = make_module()

    def train_loss(step: int) -> float:
        module.load_state_dict(recorder.params[step], strict=False)
        with torch.no_grad():
            return float(F.mse_loss(module.net(x), y))

    at_switch = train_loss(event.step)
    after = [train_loss(step) for step in range(event.step + 1, SWATS_STEPS + 1)]
    assert all(math.isfinite(loss) for loss in after)
    # No blow-up at the hand-over (fresh momentum at (1 - beta1) Lambda), and progress after it.
    assert max(after[:32]) < 1.05 * at_switch
    assert max(after) < 1.05 * at_switch
    assert after[-1] < 0.8 * at_switch


@pytest.mark.slow
def test_documented_long_run_with_and_without_the_switch() -> None:
    # The figures recorded in the docs: 1600 steps (50 epochs), validation every epoch.
    def run(callbacks: list[Callback]) -> tuple[float, float]:
        module = make_module()
        trainer = fit(module, callbacks, 50 * STEPS_PER_EPOCH, val=True)
        x, y, _, _ = regression_data()
        with torch.no_grad():
            train = float(F.mse_loss(module.net(x), y))
        return train, float(trainer.callback_metrics["val_loss"])

    switch = OptimizerSwitch(policy="swats", verbose=False)
    switched = run([switch])
    adam = run([])
    assert [(e.step, e.epoch) for e in switch.events] == [(209, 6)]
    assert switch.lambda_estimate == pytest.approx(0.093755, rel=1e-4)
    assert switched == (pytest.approx(0.2352, rel=1e-3), pytest.approx(0.3524, rel=1e-3))
    assert adam == (pytest.approx(0.2930, rel=1e-3), pytest.approx(0.4272, rel=1e-3))


# ------------------------------------------------------------- projections from Adam's state
def _tiny_float64_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).double()


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
@pytest.mark.parametrize("groups", [False, True], ids=["one-group", "two-groups"])
def test_projections_equal_the_parameter_step(
    kind: str, weight_decay: float, amsgrad: bool, groups: bool
) -> None:
    model = _tiny_float64_mlp(0)
    if groups:
        params: Any = [
            {"params": model[0].parameters(), "lr": 1e-2},
            {"params": model[2].parameters(), "lr": 3e-3, "betas": (0.8, 0.99)},
        ]
    else:
        params = model.parameters()
    cls = getattr(torch.optim, kind)
    optimizer = cls(params, lr=1e-2, weight_decay=weight_decay, amsgrad=amsgrad)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(64, 1, generator=generator, dtype=torch.float64)
    assert _adam_projections(optimizer) is None  # before the first step
    for step in range(1, 31):
        optimizer.zero_grad()
        batch = slice(2 * step % 48, 2 * step % 48 + 16)
        F.mse_loss(model(x[batch]), y[batch]).backward()
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]
        lrs = [g["lr"] for g in optimizer.param_groups for _ in g["params"]]
        optimizer.step()
        moves, used = [], []
        for p, b, g, lr in zip(model.parameters(), before, grads, lrs, strict=True):
            move = p.detach() - b
            if kind == "AdamW":
                move = move + lr * weight_decay * b  # decoupled decay is not Adam's step
            else:
                g = g + weight_decay * b  # Adam's L2 term is part of its gradient
            moves.append(move)
            used.append(g)
        move, grad = flat(moves), flat(used)
        measured = _adam_projections(optimizer)
        assert measured is not None
        steps, squared_norm, projection = measured
        assert steps == step
        assert squared_norm == pytest.approx(float(move @ move), rel=1e-9, abs=0)
        assert projection == pytest.approx(float(move @ grad), rel=1e-9, abs=0)


@pytest.mark.parametrize("implementation", ["foreach", "for-loop", "fused"])
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_projections_do_not_depend_on_the_adam_implementation(
    kind: str, implementation: str
) -> None:
    model = _tiny_float64_mlp(1)
    flags = {
        "foreach": {"foreach": True},
        "for-loop": {"foreach": False},
        "fused": {"fused": True},
    }[implementation]
    optimizer = getattr(torch.optim, kind)(
        model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True, **flags
    )
    x = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for _ in range(8):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]
        optimizer.step()
        pairs = zip(model.parameters(), before, grads, strict=True)
        if kind == "AdamW":
            moves = [p.detach() - b + 1e-2 * 0.1 * b for p, b, _ in pairs]
            used = grads
        else:
            moves, used = [], []
            for p, b, g in pairs:
                moves.append(p.detach() - b)
                used.append(g + 0.1 * b)
        move, grad = flat(moves), flat(used)
        measured = _adam_projections(optimizer)
        assert measured is not None
        assert measured[1] == pytest.approx(float(move @ move), rel=1e-9)
        assert measured[2] == pytest.approx(float(move @ grad), rel=1e-9)


def test_projections_of_adam_with_decoupled_weight_decay() -> None:
    model = _tiny_float64_mlp(0)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=1e-2, weight_decay=0.5, decoupled_weight_decay=True
    )
    x = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        before = [p.detach().clone() for p in model.parameters()]
        grad = flat(p.grad for p in model.parameters())
        optimizer.step()
        move = flat(
            p.detach() - b + 1e-2 * 0.5 * b for p, b in zip(model.parameters(), before, strict=True)
        )
        measured = _adam_projections(optimizer)
        assert measured is not None
        assert measured[1] == pytest.approx(float(move @ move), rel=1e-9)
        assert measured[2] == pytest.approx(float(move @ grad), rel=1e-9)


@pytest.mark.parametrize(
    ("optimizer", "weight_decay", "amsgrad"),
    [("adam", 0.0, False), ("adam", 0.05, False), ("adam", 0.0, True), ("adamw", 0.05, False)],
)
def test_criterion_is_fed_the_step_projections_inside_lightning(
    monkeypatch: pytest.MonkeyPatch, optimizer: str, weight_decay: float, amsgrad: bool
) -> None:
    # Float64 end to end (precision="64-true"), so that parameter differences are exact enough
    # to compare at 1e-9.
    inputs = CriterionInputs(monkeypatch)
    recorder = Recorder()
    switch = OptimizerSwitch(policy="swats", switch_threshold=1e-12, verbose=False)
    module = make_module(optimizer=optimizer, weight_decay=weight_decay, amsgrad=amsgrad)
    fit(module, [switch, recorder], 12, precision="64-true")
    assert not switch.switched
    assert len(inputs.calls) == 12
    for step, (squared_norm, projection) in enumerate(inputs.calls, start=1):
        expected = recorder.projections[step]
        assert squared_norm == pytest.approx(expected[0], rel=1e-9), step
        assert projection == pytest.approx(expected[1], rel=1e-9), step


# ------------------------------------------------------------------- accumulation and fp16
def test_accumulation_feeds_the_criterion_once_per_optimizer_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inputs = CriterionInputs(monkeypatch)
    recorder = Recorder()
    switch = OptimizerSwitch(policy="swats", switch_threshold=1e-12, verbose=False)
    fit(make_module(), [switch, recorder], 6, accumulate_grad_batches=4, precision="64-true")
    assert len(inputs.calls) == 6  # 24 micro-batches, 6 optimizer steps
    for step, (squared_norm, projection) in enumerate(inputs.calls, start=1):
        # The recorder's gradient is the accumulated one Adam used.
        assert squared_norm == pytest.approx(recorder.projections[step][0], rel=1e-9)
        assert projection == pytest.approx(recorder.projections[step][1], rel=1e-9)


def test_at_step_counts_optimizer_steps_under_accumulation() -> None:
    recorder = Recorder()
    switch = OptimizerSwitch(policy="at_step", at_step=3, target="sgd", verbose=False)
    fit(make_module(), [switch, recorder], 5, accumulate_grad_batches=3)
    assert [e.step for e in switch.events] == [3]
    assert [recorder.optimizer_names[k] for k in range(1, 6)] == ["Adam"] * 3 + ["SGD"] * 2


def fp16_plugin() -> MixedPrecision:
    # Trainer(precision="16-mixed", accelerator="cpu") falls back to bf16-mixed in Lightning
    # 2.6; the plugin given explicitly runs float16 autocast with a GradScaler on CPU.
    return MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))


def test_fp16_skipped_step_does_not_feed_the_criterion(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = CriterionInputs(monkeypatch)
    recorder = Recorder()
    switch = OptimizerSwitch(policy="swats", switch_threshold=1e-12, verbose=False)
    module = make_module(huge_at=4)
    trainer = fit(module, [switch, recorder], 8, plugins=[fp16_plugin()])
    optimizer = unwrap(trainer.optimizers[0])
    adam_steps = int(optimizer.state[next(module.parameters())]["step"])
    assert trainer.global_step == 8
    assert adam_steps == 7  # the scaler skipped the overflowing step
    # The skipped step left the parameters where they were.
    assert_bitwise_equal(recorder.params[5], recorder.params[4])
    assert len(inputs.calls) == adam_steps
    real_steps = [s for s in range(1, 9) if s != 5]
    for step, (squared_norm, projection) in zip(real_steps, inputs.calls, strict=True):
        # Float32 weights: the snapshot differences carry ~1e-6 relative rounding.
        assert squared_norm == pytest.approx(recorder.projections[step][0], rel=1e-3)
        assert projection == pytest.approx(recorder.projections[step][1], rel=1e-3)


# ---------------------------------------------------------------------- the swap in Lightning
def test_at_step_switch_continues_as_the_target_optimizer_bit_for_bit() -> None:
    recorder = Recorder()
    switch = OptimizerSwitch(
        policy="at_step",
        at_step=5,
        target="rmsprop",
        target_kwargs={"lr": 1e-3, "alpha": 0.9},
        verbose=False,
    )
    module = make_module()
    trainer = fit(module, [switch, recorder], 12)
    [event] = switch.events
    assert (event.step, event.epoch, event.from_optimizer, event.to_optimizer, event.lr) == (
        5,
        0,
        "Adam",
        "rmsprop",
        1e-3,
    )
    assert event.reason == "reached step 5"
    assert [recorder.optimizer_names[k] for k in range(1, 13)] == ["Adam"] * 5 + ["RMSprop"] * 7
    reference = make_module()
    reference.load_state_dict(recorder.params[5], strict=False)
    rmsprop = torch.optim.RMSprop(reference.parameters(), lr=1e-3, alpha=0.9)
    for step in range(5, 12):
        rmsprop.zero_grad()
        reference.loss(train_batch(step)).backward()
        rmsprop.step()
    assert_bitwise_equal(params_of(module), params_of(reference))
    optimizer = unwrap(trainer.optimizers[0])
    assert type(optimizer) is torch.optim.RMSprop
    assert trainer.strategy.optimizers[0] is optimizer
    # The module sees the new optimizer, through a fresh LightningOptimizer wrapper.
    wrapped = module.optimizers()
    assert isinstance(wrapped, LightningOptimizer)
    assert wrapped.optimizer is optimizer
    assert module.optimizers(use_pl_optimizer=False) is optimizer


def test_the_default_lr_is_the_current_one_and_group_ratios_and_decay_are_kept() -> None:
    switch = OptimizerSwitch(policy="at_step", at_step=3, target="sgdm", verbose=False)
    module = make_module(groups=True, lr=4e-3)
    trainer = fit(module, [switch], 4)
    optimizer = unwrap(trainer.optimizers[0])
    assert type(optimizer) is torch.optim.SGD
    first, second = optimizer.param_groups
    assert (first["lr"], second["lr"]) == (4e-3, 1e-3)
    assert (first["weight_decay"], second["weight_decay"]) == (0.01, 0.0)
    assert first["momentum"] == second["momentum"] == 0.9  # sgdm's preset
    assert first["params"] == list(module.net[0].parameters())
    assert switch.events[0].lr == 4e-3


def test_target_lr_keeps_the_group_ratios() -> None:
    switch = OptimizerSwitch(
        policy="at_step", at_step=2, target="nag", target_kwargs={"lr": 0.02}, verbose=False
    )
    trainer = fit(make_module(groups=True, lr=4e-3), [switch], 3)
    optimizer = unwrap(trainer.optimizers[0])
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 0.005]
    assert all(g["nesterov"] for g in optimizer.param_groups)


def test_manual_optimization_gets_the_new_optimizer_from_self_optimizers() -> None:
    recorder = Recorder()
    switch = OptimizerSwitch(
        policy="at_step", at_step=4, target="sgdm", target_kwargs={"lr": 0.01}, verbose=False
    )
    module = make_module(manual=True)
    trainer = fit(module, [switch, recorder], 9)
    assert trainer.global_step == 9
    assert [e.step for e in switch.events] == [4]
    seen = module.seen_optimizers
    assert len(seen) == 9
    assert all(isinstance(o, LightningOptimizer) for o in seen)
    assert [type(o.optimizer).__name__ for o in seen] == ["Adam"] * 4 + ["SGD"] * 5
    assert seen[-1].optimizer is unwrap(trainer.optimizers[0])
    # And the steps really were SGD's: the same as plain momentum SGD from step 4's weights.
    expected = sgd_reference(recorder.params[4], 4, 9, 0.01, momentum=0.9)
    assert_bitwise_equal(params_of(module), expected)


class TwoOptimizers(Regression):
    """Manual optimization with one Adam for the first layer and one for the rest, the second
    with a step-wise cosine schedule."""

    def __init__(self) -> None:
        super().__init__(manual=True)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        first, second = self.optimizers()
        self.seen_optimizers.append((first, second))
        for optimizer in (first, second):
            optimizer.zero_grad()
        self.manual_backward(self.loss(batch))
        first.step()
        second.step()
        self.lr_schedulers().step()

    def configure_optimizers(self) -> Any:
        first = torch.optim.Adam(self.net[0].parameters(), lr=self.lr)
        second = torch.optim.Adam(self.net[2:].parameters(), lr=self.lr)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(second, T_max=40)
        return [first, second], [cosine]


def test_optimizer_index_replaces_only_that_optimizer() -> None:
    switch = OptimizerSwitch(
        policy="at_step",
        at_step=6,  # two optimizer steps per batch: after the third batch
        target="sgdm",
        target_kwargs={"lr": 0.01},
        optimizer_index=1,
        verbose=False,
    )
    torch.manual_seed(0)
    module = TwoOptimizers()
    trainer = fit(module, [switch], 10)
    first, second = (unwrap(o) for o in trainer.optimizers)
    assert (type(first), type(second)) == (torch.optim.Adam, torch.optim.SGD)
    assert [e.step for e in switch.events] == [6]
    seen = [
        (type(a.optimizer).__name__, type(b.optimizer).__name__) for a, b in module.seen_optimizers
    ]
    assert seen == [("Adam", "Adam")] * 3 + [("Adam", "SGD")] * 2
    assert all(a.optimizer is first for a, _ in module.seen_optimizers)  # untouched, state kept
    assert int(first.state[module.net[0].weight]["step"]) == 5
    [config] = trainer.lr_scheduler_configs
    assert config.scheduler.optimizer is second
    assert second.param_groups[0]["lr"] / config.scheduler.base_lrs[0] == pytest.approx(
        cosine_factor(5, 40), rel=1e-9
    )


def test_at_epoch_switches_at_the_start_of_the_epoch() -> None:
    recorder = Recorder()
    switch = OptimizerSwitch(policy="at_epoch", at_epoch=1, target="sgd", verbose=False)
    fit(make_module(), [switch, recorder], STEPS_PER_EPOCH + 3)
    [event] = switch.events
    assert (event.step, event.epoch, event.lr) == (STEPS_PER_EPOCH, 1, 3e-3)
    assert event.reason == "reached epoch 1"
    assert recorder.optimizer_names[STEPS_PER_EPOCH] == "Adam"
    assert recorder.optimizer_names[STEPS_PER_EPOCH + 1] == "SGD"


def test_at_epoch_zero_switches_before_the_first_step() -> None:
    recorder = Recorder()
    switch = OptimizerSwitch(policy="at_epoch", at_epoch=0, target="sgd", verbose=False)
    fit(make_module(), [switch, recorder], 3)
    assert [(e.step, e.epoch) for e in switch.events] == [(0, 0)]
    assert set(recorder.optimizer_names.values()) == {"SGD"}


def test_at_step_zero_switches_before_the_first_step() -> None:
    recorder = Recorder()
    switch = OptimizerSwitch(policy="at_step", at_step=0, target="sgd", verbose=False)
    fit(make_module(), [switch, recorder], 3)
    assert [e.step for e in switch.events] == [0]
    assert set(recorder.optimizer_names.values()) == {"SGD"}


# ---------------------------------------------------------------------------- schedulers
def cosine_factor(step: int, total: int) -> float:
    return (1.0 + math.cos(math.pi * step / total)) / 2.0


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_cosine_schedule_continues_on_the_new_optimizer(manual: bool) -> None:
    total = 24
    recorder = Recorder()
    switch = OptimizerSwitch(
        policy="at_step", at_step=8, target="sgdm", target_kwargs={"lr": 0.05}, verbose=False
    )
    module = make_module(scheduler="cosine", total_steps=total, manual=manual)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(module, [switch, recorder], 20)
    # Torch's check that the optimizer stepped before the scheduler keeps working.
    assert [str(w.message) for w in caught if "lr_scheduler" in str(w.message)] == []
    optimizer = unwrap(trainer.optimizers[0])
    [config] = trainer.lr_scheduler_configs
    scheduler = config.scheduler
    # No scheduler left on the old optimizer; initial_lr and base_lrs agree.
    assert scheduler.optimizer is optimizer
    assert type(optimizer) is torch.optim.SGD
    base = scheduler.base_lrs[0]
    assert optimizer.param_groups[0]["initial_lr"] == base
    # Step k runs with the lr the scheduler set after step k - 1: base * c(k - 1). Before the
    # switch that is Adam's 3e-3 * c(k - 1); the switch after step 8 sets the new lr to 0.05
    # and rescales the base so that the same curve continues: lr / base_lr = c(k - 1).
    for k in range(1, 9):
        assert recorder.lrs[k] == pytest.approx(3e-3 * cosine_factor(k - 1, total), rel=1e-12)
    assert recorder.lrs[9] == 0.05
    assert base == pytest.approx(0.05 / cosine_factor(8, total), rel=1e-12)
    for k in range(9, 21):
        assert recorder.lrs[k] / base == pytest.approx(cosine_factor(k - 1, total), rel=1e-9), k
    assert optimizer.param_groups[0]["lr"] / base == pytest.approx(cosine_factor(20, total))
    assert switch.events[0].lr == 0.05
    assert scheduler.last_epoch == 20


class TwoSchedulers(Regression):
    """Adam driven by a step-wise cosine schedule and an epoch-wise ReduceLROnPlateau."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=50)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=100)
        return [optimizer], [
            {"scheduler": cosine, "interval": "step"},
            {"scheduler": plateau, "monitor": "val_loss", "interval": "epoch"},
        ]


def test_every_scheduler_of_the_old_optimizer_is_rebound() -> None:
    torch.manual_seed(0)
    module = TwoSchedulers()
    switch = OptimizerSwitch(policy="at_step", at_step=3, target="sgd", verbose=False)
    trainer = fit(module, [switch], 6)
    optimizer = unwrap(trainer.optimizers[0])
    assert type(optimizer) is torch.optim.SGD
    assert [c.scheduler.optimizer for c in trainer.lr_scheduler_configs] == [optimizer] * 2
    cosine = trainer.lr_scheduler_configs[0].scheduler
    # The cosine schedule continued on the new optimizer: lr / base_lr = c(6).
    assert optimizer.param_groups[0]["lr"] / cosine.base_lrs[0] == pytest.approx(
        cosine_factor(6, 50), rel=1e-9
    )


def test_initial_lr_agrees_with_base_lrs_when_a_plateau_scheduler_is_also_attached() -> None:
    torch.manual_seed(0)
    module = TwoSchedulers()
    switch = OptimizerSwitch(policy="at_step", at_step=3, target="sgd", verbose=False)
    trainer = fit(module, [switch], 6)
    optimizer = unwrap(trainer.optimizers[0])
    cosine = trainer.lr_scheduler_configs[0].scheduler
    assert optimizer.param_groups[0]["initial_lr"] == cosine.base_lrs[0]


# --------------------------------------------------------------------------------- logging
class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


@pytest.mark.parametrize("scheduler", [None, "cosine"])
def test_learning_rate_monitor_logs_the_new_optimizer(scheduler: str | None) -> None:
    logger = MemoryLogger()
    switch = OptimizerSwitch(
        policy="at_step", at_step=4, target="sgdm", target_kwargs={"lr": 0.02}, verbose=False
    )
    module = make_module(scheduler=scheduler, total_steps=1000)
    fit(
        module,
        [switch, LearningRateMonitor(logging_interval="step")],
        8,
        logger=logger,
        log_every_n_steps=1,
    )
    by_step: dict[int, dict[str, float]] = {}
    for step, metrics in logger.metrics:
        assert step is not None
        by_step.setdefault(step, {}).update(metrics)
    # The monitor logs at batch start, with the lr the coming step uses.
    assert by_step[3]["lr-Adam"] == pytest.approx(3e-3, rel=1e-3)
    assert "lr-SGD" not in by_step[3]
    for step in range(4, 8):
        assert "lr-Adam" not in by_step[step]
        assert by_step[step]["lr-SGD"] == pytest.approx(0.02, rel=1e-3)
    assert by_step[4]["optdiag/switch/lr"] == 0.02


def test_every_switch_is_reported_everywhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator

    monkeypatch.setattr(training_doctor_module, "diagnose", lambda observations, thresholds: [])
    doctor = TrainingDoctor(check_every_n_steps=2, window=10, console=False)
    switch = OptimizerSwitch(policy="at_step", at_step=3, target="sgdm", target_kwargs={"lr": 0.01})
    logger = TensorBoardLogger(tmp_path, name="tb", version=0, default_hp_metric=False)
    fit(make_module(), [doctor, switch], 5, logger=logger, log_every_n_steps=1)
    [event] = switch.events
    assert isinstance(event, SwitchEvent)
    message = "step 3: Adam -> sgdm (lr 0.01): reached step 3"
    # Console (rank zero, verbose).
    printed = " ".join(capsys.readouterr().out.split())
    assert f"optdiag · optimizer switch · {message}" in printed
    # TensorBoard text.
    events = EventAccumulator(logger.log_dir, size_guidance={TENSORS: 0})
    events.Reload()
    tags = [t for t in events.PluginTagToContent("text") if t.startswith("optdiag/switch")]
    assert len(tags) == 1
    texts = [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tags[0])]
    assert texts == [(3, message)]
    # The doctor's actions, and its JSON file.
    expected_details = {
        "step": 3,
        "epoch": 0,
        "from_optimizer": "Adam",
        "to_optimizer": "sgdm",
        "lr": 0.01,
        "reason": "reached step 3",
    }
    assert doctor.actions == [
        {"kind": "optimizer_switch", "step": 3, "message": message, "details": expected_details}
    ]
    doctor.to_json(tmp_path / "doctor.json")
    record = json.loads((tmp_path / "doctor.json").read_text())
    assert record["actions"] == doctor.actions


def test_verbose_false_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    switch = OptimizerSwitch(policy="at_step", at_step=1, target="sgd", verbose=False)
    fit(make_module(), [switch], 2)
    assert "optimizer switch" not in capsys.readouterr().out
    assert len(switch.events) == 1


# ------------------------------------------------------------------------- doctor policies
def finding(kind: str) -> Finding:
    return Finding(
        kind=kind,
        severity="warning",
        confidence=0.9,
        evidence={"value": 1.0},
        message=f"{kind} seen",
        recommendation=f"fix {kind}",
    )


def script_doctor(monkeypatch: pytest.MonkeyPatch, schedule: dict[int, set[str]]) -> TrainingDoctor:
    """A real TrainingDoctor whose rules report ``schedule[step]`` at each (per-step) check."""

    def diagnose(observations: Any, thresholds: Any) -> list[Finding]:
        return [finding(kind) for kind in sorted(schedule.get(observations.step, set()))]

    monkeypatch.setattr(training_doctor_module, "diagnose", diagnose)
    return TrainingDoctor(check_every_n_steps=1, window=10, console=False, confirm_checks=1)


def test_plateau_policy_switches_when_the_doctor_reports_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doctor = script_doctor(monkeypatch, {s: {"plateau"} for s in range(6, 12)})
    recorder = Recorder()
    switch = OptimizerSwitch(
        policy="plateau", target="sgdm", target_kwargs={"lr": 0.01}, verbose=False
    )
    fit(make_module(), [doctor, switch, recorder], 10)
    assert [(e.step, e.reason) for e in switch.events] == [(6, "the training loss plateaued")]
    assert recorder.optimizer_names[6] == "Adam"
    assert recorder.optimizer_names[7] == "SGD"
    assert [a["kind"] for a in doctor.actions] == ["optimizer_switch"]


def test_plateau_policy_ignores_other_diagnoses(monkeypatch: pytest.MonkeyPatch) -> None:
    doctor = script_doctor(monkeypatch, {s: {"gradient_noise"} for s in range(2, 9)})
    switch = OptimizerSwitch(policy="plateau", target="sgd", verbose=False)
    fit(make_module(), [doctor, switch], 8)
    assert switch.events == []


def test_gate_on_delays_a_switch_until_the_doctor_reports_the_kind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doctor = script_doctor(
        monkeypatch, {**{s: {"plateau"} for s in range(3, 6)}, 7: {"gradient_noise"}}
    )
    switch = OptimizerSwitch(
        policy="at_step", at_step=2, target="sgd", gate_on=["gradient_noise"], verbose=False
    )
    fit(make_module(), [doctor, switch], 9)
    assert [(e.step, e.reason) for e in switch.events] == [(7, "reached step 2")]


def test_gate_on_reads_the_doctors_active_diagnoses(monkeypatch: pytest.MonkeyPatch) -> None:
    # The doctor's ``active`` replaced: it reports a gradient-noise diagnosis from step 5 on.
    steps: list[int] = []

    class StepDoctor(TrainingDoctor):
        @property
        def active(self) -> list[Any]:
            step = self._trainer.global_step
            steps.append(step)
            return [types.SimpleNamespace(kind="gradient_noise")] if step >= 5 else []

        def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            self._trainer = trainer
            super().on_fit_start(trainer, pl_module)

    doctor = StepDoctor(check_every_n_steps=100, window=10, console=False)
    switch = OptimizerSwitch(
        policy="at_epoch", at_epoch=0, gate_on=["gradient_noise", "plateau"], verbose=False
    )
    # at_epoch=0 is checked at the start of each epoch only: closed at epoch 0 (step 0), open at
    # epoch 1 (step 32).
    fit(make_module(), [doctor, switch], STEPS_PER_EPOCH + 2)
    assert [(e.step, e.epoch) for e in switch.events] == [(STEPS_PER_EPOCH, 1)]
    assert steps[0] == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"policy": "plateau"}, {"policy": "at_step", "at_step": 3, "gate_on": ["plateau"]}],
)
def test_doctor_policies_without_a_doctor_fail_at_fit_start(kwargs: dict[str, Any]) -> None:
    switch = OptimizerSwitch(**kwargs, verbose=False)
    with pytest.raises(ValueError, match="TrainingDoctor") as info:
        fit(make_module(), [switch], 2)
    assert "policy" in str(info.value)


@pytest.mark.parametrize("optimizer", ["sgd", "swats"])
def test_swats_needs_adam(optimizer: str) -> None:
    switch = OptimizerSwitch(policy="swats", verbose=False)
    with pytest.raises(ValueError, match=r"needs torch\.optim\.Adam or AdamW") as info:
        fit(make_module(optimizer=optimizer), [switch], 2)
    name = {"sgd": "SGD", "swats": "SWATS"}[optimizer]
    assert f"got {name}" in str(info.value)
    assert "'swats'" in str(info.value)


def test_optimizer_index_beyond_the_optimizers_fails_at_fit_start() -> None:
    switch = OptimizerSwitch(policy="at_step", at_step=1, optimizer_index=1, verbose=False)
    with pytest.raises(ValueError, match=r"Invalid optimizer_index: 1 \(the trainer has 1"):
        fit(make_module(), [switch], 2)


# ---------------------------------------------------------------------- checkpoint / resume
# Lightning restarts a plain DataLoader from its first batch when it resumes mid-epoch (and,
# from a checkpoint written at an epoch end, replays one batch): the resumed runs would see other
# batches than the uninterrupted one. The module below therefore takes the batch of each step
# from the step number, so that every run trains on the same data and only the callback's and
# Lightning's state decide whether the runs agree.
class StepIndexed(Regression):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        return super().training_step(train_batch(self.global_step), batch_idx)


class SaveAt(Callback):
    """``trainer.save_checkpoint(out_dir / "step=<k>.ckpt")`` after each optimizer step in
    ``steps`` (placed after the switch, so its state for that step is final)."""

    def __init__(self, out_dir: Path, steps: set[int]) -> None:
        self.out_dir = out_dir
        self.steps = steps
        self.batch_step = -1

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batch_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.batch_step and trainer.global_step in self.steps:
            trainer.save_checkpoint(self.out_dir / f"step={trainer.global_step}.ckpt")


RESUME_STEPS = 240  # the uninterrupted run; the switch comes at step 209


def resume_run(
    switch: OptimizerSwitch,
    steps: int,
    save: SaveAt | None = None,
    ckpt_path: Path | None = None,
    **module_kwargs: Any,
) -> tuple[StepIndexed, torch.optim.Optimizer, Trainer]:
    callbacks: list[Callback] = [switch] if save is None else [switch, save]
    torch.manual_seed(99 if ckpt_path else 0)  # resumed: the weights come from the checkpoint
    module = StepIndexed(**module_kwargs)
    trainer = fit(module, callbacks, steps, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return module, unwrap(trainer.optimizers[0]), trainer


def test_resume_before_and_after_the_switch_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    switch = OptimizerSwitch(policy="swats", verbose=False)
    module, optimizer, _ = resume_run(switch, RESUME_STEPS, SaveAt(tmp_path, {200, 215}))
    [event] = switch.events
    assert event.step == 209  # step-indexed data: the same batches as the realistic problem
    assert type(optimizer) is torch.optim.SGD
    expected_params = params_of(module)
    expected_state = optimizer_state_of(optimizer, module)
    after = torch.load(tmp_path / "step=215.ckpt", weights_only=False)
    assert set(after["optimizer_states"][0]["state"][0]) == {"momentum_buffer"}
    before = torch.load(tmp_path / "step=200.ckpt", weights_only=False)
    assert set(before["optimizer_states"][0]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}

    for saved_at in (200, 215):
        resumed = OptimizerSwitch(policy="swats", verbose=False)
        module, optimizer, trainer = resume_run(
            resumed, RESUME_STEPS, ckpt_path=tmp_path / f"step={saved_at}.ckpt"
        )
        assert trainer.global_step == RESUME_STEPS
        assert resumed.events == [event], saved_at
        assert resumed.lambda_estimate == switch.lambda_estimate
        assert type(optimizer) is torch.optim.SGD
        assert optimizer.param_groups[0]["lr"] == event.lr
        assert optimizer.param_groups[0]["momentum"] == BETA1
        assert_bitwise_equal(params_of(module), expected_params)
        assert_bitwise_equal(optimizer_state_of(optimizer, module), expected_state)


def test_resume_after_a_switch_with_a_scheduler(tmp_path: Path) -> None:
    def make() -> OptimizerSwitch:
        return OptimizerSwitch(
            policy="at_step", at_step=10, target="sgdm", target_kwargs={"lr": 0.05}, verbose=False
        )

    options: dict[str, Any] = {"scheduler": "cosine", "total_steps": 80}
    module, optimizer, trainer = resume_run(make(), 40, SaveAt(tmp_path, {20}), **options)
    expected_scheduler = trainer.lr_scheduler_configs[0].scheduler.state_dict()
    resumed_module, resumed_optimizer, resumed_trainer = resume_run(
        make(), 40, ckpt_path=tmp_path / "step=20.ckpt", **options
    )
    assert_bitwise_equal(params_of(resumed_module), params_of(module))
    assert_bitwise_equal(
        optimizer_state_of(resumed_optimizer, resumed_module), optimizer_state_of(optimizer, module)
    )
    [config] = resumed_trainer.lr_scheduler_configs
    assert config.scheduler.optimizer is resumed_optimizer
    assert config.scheduler.state_dict() == expected_scheduler
    for key in ("lr", "initial_lr", "momentum"):
        assert resumed_optimizer.param_groups[0][key] == optimizer.param_groups[0][key], key


# ------------------------------------------------------------------------------------- DDP
class RankDump(Callback):
    """Writes each rank's switch events, per-step parameters and final state to ``out_dir``."""

    def __init__(self, out_dir: str, recorder: Recorder) -> None:
        self.out_dir = out_dir
        self.recorder = recorder
        self.per_step: dict[int, Snapshot] = {}
        self.first_batch: Tensor | None = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.first_batch is None:
            self.first_batch = batch[0].clone()
        self.per_step[trainer.global_step] = params_of(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        switch = next(c for c in trainer.callbacks if isinstance(c, OptimizerSwitch))
        optimizer = unwrap(trainer.optimizers[0])
        record = {
            "events": [(e.step, e.lr, e.to_optimizer) for e in switch.events],
            "lambda": switch.lambda_estimate,
            "per_step": self.per_step,
            "optimizer": type(optimizer).__name__,
            "state": optimizer_state_of(optimizer, pl_module),
            "first_batch": self.first_batch,
            "projections": self.recorder.projections,
            "world_size": trainer.world_size,
        }
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


DDP_STEPS = 130
# Looser than the default, so that the test fires well inside DDP_STEPS whatever the last bits
# of the floating-point sums: what is tested is that both ranks agree, not where.
DDP_THRESHOLD = 2e-2


def run_ddp_scenario(out_dir: str) -> None:
    """Entry point of the subprocess: Adam 3e-3 + SWATS policy on 2 CPU processes, each rank
    reading its own half of the data (Lightning's DistributedSampler)."""
    torch.set_num_threads(1)
    # The spawned ranks take their thread count and their seed (Lightning re-seeds every rank
    # from PL_GLOBAL_SEED) from the environment, which otherwise holds whatever earlier tests
    # in the parent process left there (seed_everything(123) made this run never switch).
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["PL_GLOBAL_SEED"] = "0"
    module = make_module()
    recorder = Recorder()
    switch = OptimizerSwitch(policy="swats", switch_threshold=DDP_THRESHOLD)
    trainer = Trainer(
        strategy="ddp_spawn",
        devices=2,
        max_steps=DDP_STEPS,
        limit_val_batches=0,
        callbacks=[switch, recorder, RankDump(out_dir, recorder)],
        **QUIET,
    )
    trainer.fit(module, train_loader())


@pytest.mark.distributed
def test_ddp_ranks_switch_together_and_stay_identical(tmp_path: Path) -> None:
    output = run_scenario(
        "tests.callbacks.test_optimizer_switch",
        tmp_path,
        timeout=120,
        hang="did the ranks switch at different steps?",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])  # own data
    events = [r["events"] for r in ranks]
    assert len(events[0]) == 1, events
    assert events[0] == events[1]
    step, lr, target = events[0][0]
    assert target == "sgdm"
    assert 10 <= step < DDP_STEPS - 5
    assert ranks[0]["lambda"] == ranks[1]["lambda"]
    # The paper's rule on the projections each rank measured from its own (all-reduced)
    # gradients and parameter snapshots fires at the same step.
    for record in ranks:
        measured = [record["projections"][k] for k in range(1, step + 1)]
        assert paper_switch(measured, threshold=DDP_THRESHOLD) == (
            step,
            pytest.approx(record["lambda"], rel=1e-4),
        )
    assert lr == (1.0 - BETA1) * ranks[0]["lambda"]
    assert [r["optimizer"] for r in ranks] == ["SGD", "SGD"]
    for k in range(step, DDP_STEPS + 1):
        assert_bitwise_equal(ranks[0]["per_step"][k], ranks[1]["per_step"][k])
    assert_bitwise_equal(ranks[0]["state"], ranks[1]["state"])
    # Printed once, by rank zero.
    text = " ".join(output.split())
    assert text.count(f"optdiag · optimizer switch · step {step}: Adam -> sgdm") == 1


# ------------------------------------------------------------------------------------- CLI
def test_lightning_cli_yaml_configures_the_switch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("jsonargparse")
    monkeypatch.setattr(sys, "argv", ["cli"])
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_steps: 7\n"
        "  logger: false\n"
        "  enable_progress_bar: false\n"
        "  enable_model_summary: false\n"
        "  enable_checkpointing: false\n"
        "  accelerator: cpu\n"
        "  devices: 1\n"
        "  limit_val_batches: 0\n"
        "  callbacks:\n"
        "    - class_path: lightning_optdiag.callbacks.OptimizerSwitch\n"
        "      init_args:\n"
        "        policy: at_step\n"
        "        at_step: 5\n"
        "        target: sgdm\n"
        "        target_kwargs:\n"
        "          lr: 0.01\n"
        "        verbose: false\n"
        "model:\n"
        "  lr: 0.003\n"
    )
    cli = LightningCLI(
        Regression,
        run=False,
        args=["--config", str(config)],
        save_config_callback=None,
        seed_everything_default=False,
    )
    [switch] = [c for c in cli.trainer.callbacks if isinstance(c, OptimizerSwitch)]
    assert (switch.policy, switch.at_step, switch.target, switch.target_kwargs) == (
        "at_step",
        5,
        "sgdm",
        {"lr": 0.01},
    )
    assert switch.switch_threshold == 5e-3  # untouched default
    cli.trainer.fit(cli.model, train_loader())
    assert [(e.step, e.to_optimizer, e.lr) for e in switch.events] == [(5, "sgdm", 0.01)]
    optimizer = unwrap(cli.trainer.optimizers[0])
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["momentum"] == 0.9


def test_lightning_cli_rejects_an_unknown_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("jsonargparse")
    monkeypatch.setattr(sys, "argv", ["cli"])
    from lightning.pytorch.cli import LightningCLI

    args = [
        "--trainer.callbacks+=lightning_optdiag.callbacks.OptimizerSwitch",
        "--trainer.callbacks.policy=sometimes",
        "--trainer.logger=false",
    ]
    # ``policy`` is typed ``str``, so jsonargparse accepts the value and the constructor's
    # ValueError surfaces when the callback is instantiated (a ``Literal`` type would make it a
    # usage error): either way the run does not start, and the message names the value.
    with pytest.raises((SystemExit, ValueError)) as info:
        LightningCLI(
            Regression,
            run=False,
            args=args,
            save_config_callback=None,
            seed_everything_default=False,
        )
    if info.type is ValueError:
        assert "Invalid policy: 'sometimes'" in str(info.value)


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"policy": "sometimes"}, ValueError, ["policy", "'sometimes'"]),
        ({"policy": None}, ValueError, ["policy", "None"]),
        ({"target": "adamax"}, ValueError, ["target", "'adamax'"]),
        ({"target": 3}, ValueError, ["target", "3"]),
        ({"target_kwargs": [("lr", 1)]}, TypeError, ["target_kwargs", "[('lr', 1)]"]),
        ({"target_kwargs": {"lr": 0.1}}, ValueError, ["target_kwargs", "lr=0.1", "swats"]),
        ({"policy": "at_step"}, ValueError, ["at_step", "None"]),
        ({"policy": "at_epoch"}, ValueError, ["at_epoch", "None"]),
        ({"policy": "at_step", "at_step": -1}, ValueError, ["at_step", "-1"]),
        ({"policy": "at_step", "at_step": 2.5}, TypeError, ["at_step", "2.5"]),
        ({"policy": "at_epoch", "at_epoch": "1"}, TypeError, ["at_epoch", "'1'"]),
        ({"gate_on": ["plateaus"]}, ValueError, ["gate_on", "'plateaus'"]),
        ({"switch_threshold": 0}, ValueError, ["switch_threshold", "0"]),
        ({"switch_threshold": -1e-3}, ValueError, ["switch_threshold", "-0.001"]),
        ({"switch_threshold": math.nan}, ValueError, ["switch_threshold", "nan"]),
        ({"switch_threshold": "5e-3"}, TypeError, ["switch_threshold", "'5e-3'"]),
        ({"switch_min_steps": 1}, ValueError, ["switch_min_steps", "1"]),
        ({"switch_min_steps": 10.0}, TypeError, ["switch_min_steps", "10.0"]),
        ({"optimizer_index": -1}, ValueError, ["optimizer_index", "-1"]),
        ({"verbose": "yes"}, TypeError, ["verbose", "'yes'"]),
    ],
)
def test_invalid_arguments_are_rejected(
    kwargs: dict[str, Any], error: type[Exception], words: list[str]
) -> None:
    assert_rejected(OptimizerSwitch, kwargs, error, words)


def test_gate_on_as_a_string_is_rejected_naming_the_value() -> None:
    with pytest.raises((TypeError, ValueError), match="'plateau'"):
        OptimizerSwitch(gate_on="plateau")  # type: ignore[arg-type]


def test_valid_arguments_are_normalised() -> None:
    switch = OptimizerSwitch(
        policy="plateau",
        target=" SGDM ",
        target_kwargs={"momentum": 0.8},
        gate_on=["plateau", "gradient_noise"],
        switch_threshold=1,
        switch_min_steps=2,
    )
    assert switch.target == "sgdm"
    assert switch.switch_threshold == 1.0
    assert isinstance(switch.switch_threshold, float)
    assert switch.gate_on == ["plateau", "gradient_noise"]
    assert not switch.switched
    assert switch.lambda_estimate is None
    assert switch.events == []
    # lr in target_kwargs is fine for the other policies.
    assert OptimizerSwitch(
        policy="at_step", at_step=3, target_kwargs={"lr": 0.1}
    ).target_kwargs == {"lr": 0.1}
