"""TrainingDoctor on real Lightning runs whose problem is known by construction.

Every scenario is a tiny seeded run (the demo's scenarios, and the ones built here for the kinds
the demo does not cover) and the doctor must report exactly the expected set of diagnoses; each
run that should raise a diagnosis has a twin differing in the one relevant factor (the learning
rate, the label noise, a warm-up, a layer's scale, a NaN) that must not. Key evidence is checked
against independent computations: dense Hessians from ``torch.func.hessian`` and losses recorded
by the module itself. The lifecycle (reported once, cleared once, debounced) is driven by scripted
findings, and the outputs (TensorBoard events, JSON, console) are read back.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch import seed_everything as pl_seed_everything
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.func import functional_call, hessian
from torch.utils.data import DataLoader, TensorDataset

import lightning_optdiag.callbacks.training_doctor as training_doctor
from lightning_optdiag.callbacks import (
    CurvatureMonitor,
    GradientMonitor,
    NonFiniteGuard,
    TrainingDoctor,
)
from lightning_optdiag.demo import SCENARIOS, make_module, run_demo
from lightning_optdiag.diagnosis import KINDS, Diagnosis, Finding, Thresholds
from lightning_optdiag.report.record import RECORD_TAG, decode_record
from tests.callbacks.conftest import assert_rejected
from tests.ddp import run_scenario

pytestmark = [
    # Tiny synthetic runs: Lightning's advice about workers and the logging interval is noise
    # here, and Lightning 2.6 still builds a torch pytree LeafSpec, deprecated by torch 2.13.
    pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings(
        "ignore:You defined a `validation_step` but have no `val_dataloader`"
    ),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
QUIET: dict[str, Any] = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "accelerator": "cpu",
    "devices": 1,
    "num_sanity_val_steps": 0,
    "max_epochs": -1,
}


# ------------------------------------------------------------------------------------ helpers
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Regression(LightningModule):
    """MSE regression with any network and optimizer.

    Args:
        net: the network.
        optimizer: builds the optimizer from the network's parameters.
        warmup_steps: a linear warm-up (``LinearLR`` from 1% of the learning rate, stepped
            every optimizer step) over this many steps; 0: none.
        nan_steps: global steps at which NaN is added to the loss.
        manual: manual optimization (``step_every`` batches per optimizer step).
        return_loss: under manual optimization, whether ``training_step`` returns the loss.
        log_train_loss: ``self.log("train_loss", ...)`` in ``training_step``.

    ``self.losses`` collects ``(global_step, batch_idx, loss)`` of every training batch: the
    first ``training_step`` call after ``on_train_batch_start`` (the curvature monitor's probe
    calls come later, from callback hooks, and are not recorded).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        warmup_steps: int = 0,
        nan_steps: Iterable[int] = (),
        manual: bool = False,
        step_every: int = 1,
        return_loss: bool = True,
        log_train_loss: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.nan_steps = set(nan_steps)
        self.automatic_optimization = not manual
        self.step_every = step_every
        self.return_loss = return_loss
        self.log_train_loss = log_train_loss
        self.losses: list[tuple[int, int, float]] = []
        self._fresh = False

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._fresh = True

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if self.global_step in self.nan_steps:
            loss = loss + math.nan
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        loss = self.compute_loss(batch)
        if self._fresh:
            self.losses.append((self.global_step, batch_idx, float(loss.detach())))
            self._fresh = False
        if self.log_train_loss:
            self.log("train_loss", loss)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        self.manual_backward(loss / self.step_every)
        if (batch_idx + 1) % self.step_every == 0:
            optimizer.step()  # type: ignore[union-attr]
            optimizer.zero_grad()  # type: ignore[union-attr]
        return loss if self.return_loss else None

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.net.parameters())
        if not self.warmup_steps:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=0.01, total_iters=self.warmup_steps
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def step_losses(self, upto: int) -> list[float]:
        """The loss of each optimizer step ``0 .. upto - 1`` (one batch per step)."""
        per_step = {step: loss for step, _, loss in self.losses}
        return [per_step[step] for step in range(upto)]


def standardised_regression(
    seed: int, samples: int, features: int = 8, scale: float = 1.0, noise: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Standardised features, a linear target ``x @ w`` (``w ~ scale * N(0, 1)``) plus noise."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator)
    x = (x - x.mean(0)) / x.std(0)
    w = scale * torch.randn(features, 1, generator=generator)
    return x, x @ w + noise * torch.randn(samples, 1, generator=generator)


def make_loader(x: Tensor, y: Tensor, batch_size: int, seed: int = 0) -> DataLoader[Any]:
    shuffle = batch_size < len(x)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    dataset = TensorDataset(x, y)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def linear_hessian(x: Tensor) -> Tensor:
    """Dense Hessian (float64) of ``mse(x @ w + b, y)`` in ``(w, b)``; constant in both."""
    x = x.double()
    features = x.shape[1]
    y = torch.zeros(len(x), 1, dtype=torch.float64)

    def loss(theta: Tensor) -> Tensor:
        return F.mse_loss(x @ theta[:features, None] + theta[features], y)

    return hessian(loss)(torch.zeros(features + 1, dtype=torch.float64))


def sgd_at(ratio: float, x: Tensor) -> OptimizerFactory:
    """Plain SGD at ``ratio`` times the stability threshold ``2 / lambda_max`` of a linear
    model's MSE Hessian on the full data ``x``."""
    lam = float(torch.linalg.eigvalsh(linear_hessian(x))[-1])
    lr = ratio * 2.0 / lam
    return lambda params: torch.optim.SGD(params, lr=lr)


def monitors(curvature_every: int = 10, **gradient: Any) -> list[Callback]:
    """GradientMonitor, NonFiniteGuard (skip) and CurvatureMonitor, on a fixed schedule (no
    time budget, which would make the check steps depend on the machine's speed)."""
    return [
        GradientMonitor(**gradient),
        NonFiniteGuard(action="skip"),
        CurvatureMonitor(every_n_steps=curvature_every, max_overhead=None),
    ]


def fit(
    module: LightningModule,
    train: DataLoader[Any],
    callbacks: list[Callback],
    max_steps: int,
    val: DataLoader[Any] | None = None,
    seed: int = 0,
    ckpt_path: str | None = None,
    **trainer: Any,
) -> Trainer:
    pl_seed_everything(seed, verbose=False)
    options = {**QUIET, "max_steps": max_steps, "callbacks": callbacks, **trainer}
    if val is None:
        options["limit_val_batches"] = 0
    trainer_ = Trainer(**options)
    trainer_.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer_


def kinds(doctor: TrainingDoctor) -> set[str]:
    return {diagnosis.kind for diagnosis in doctor.diagnoses}


def one(doctor: TrainingDoctor, kind: str) -> Diagnosis:
    (diagnosis,) = [d for d in doctor.diagnoses if d.kind == kind]
    return diagnosis


# ------------------------------------------------------------------------ demo scenarios


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [name for name in SCENARIOS],
)
def test_demo_scenario_reports_exactly_the_expected_kinds(name: str, tmp_path: Path) -> None:
    result = run_demo(name, logdir=tmp_path)
    assert kinds(result.doctor) == set(SCENARIOS[name].expected)
    # Reported once each, never repeated while the condition holds.
    assert len(result.doctor.diagnoses) == len(kinds(result.doctor))


def test_oscillation_sharpness_ratio_is_one_and_a_half(tmp_path: Path) -> None:
    result = run_demo("oscillation", logdir=tmp_path)
    evidence = one(result.doctor, "lr_too_high").evidence
    spec = SCENARIOS["oscillation"]
    train, _ = spec.data(0)
    x, _ = train.dataset.tensors  # full batch: the probe is the whole data set
    # The MSE Hessian of a linear model is constant: dense, in float64, independently of the
    # demo's own eigen-decomposition of 2 X^T X / N.
    lam = float(torch.linalg.eigvalsh(linear_hessian(x))[-1])
    lr = spec.optimizer(nn.Linear(8, 1), train).param_groups[0]["lr"]
    assert evidence["sharpness"] == pytest.approx(lam, rel=1e-4)
    assert evidence["stability_threshold"] == pytest.approx(2.0 / lr, rel=1e-6)
    assert evidence["sharpness_ratio"] == pytest.approx(lam * lr / 2.0, rel=1e-4)
    assert evidence["sharpness_ratio"] == pytest.approx(1.5, rel=1e-4)
    assert evidence["grad_norm_fraction_of_peak"] >= Thresholds().large_grad_ratio
    assert all(r.sharpness_ratio == pytest.approx(1.5, rel=1e-4) for r in result.curvature.history)


def test_saddle_eigenvalues_are_plus_and_minus_twice_the_cross_covariance(
    tmp_path: Path,
) -> None:
    """At zero, the Hessian of ``E (w2^T W1 x - y)^2`` has only the cross block
    ``d2L / dw2_k dW1_ij = -2 E[y x_j] delta_ki``, i.e. ``-2 (I kron c^T)`` with ``c = E[y x]``,
    whose singular values are all ``2 |c|``: the eigenvalues are ``+-2 |c|`` and zeros."""
    result = run_demo("saddle", logdir=tmp_path)
    evidence = one(result.doctor, "saddle_point").evidence
    train, _ = SCENARIOS["saddle"].data(0)
    x, y = next(iter(train))  # the first batch of the run: the curvature monitor's probe
    assert result.curvature.history[0].loss == pytest.approx(float(y.pow(2).mean()), rel=1e-5)
    c = (y.double() * x.double()).mean(dim=0)
    expected = 2.0 * float(c.norm())

    net = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 1, bias=False)).double()
    zeros = {name: torch.zeros_like(p) for name, p in net.named_parameters()}
    shapes = {name: p.shape for name, p in zeros.items()}

    def loss(flat: Tensor) -> Tensor:
        params, offset = {}, 0
        for name, shape in shapes.items():
            params[name] = flat[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return F.mse_loss(functional_call(net, params, (x.double(),)), y.double())

    flat = torch.cat([p.reshape(-1) for p in zeros.values()])
    eigenvalues = torch.linalg.eigvalsh(hessian(loss)(flat))
    assert float(eigenvalues[-1]) == pytest.approx(expected, rel=1e-9)
    assert float(eigenvalues[0]) == pytest.approx(-expected, rel=1e-9)
    assert evidence["lambda_max"] == pytest.approx(expected, rel=1e-4)
    assert evidence["lambda_min"] == pytest.approx(-expected, rel=1e-4)
    assert evidence["negative_ratio"] == pytest.approx(-1.0, rel=1e-4)
    assert evidence["grad_norm_fraction_of_peak"] == 0.0  # every gradient is exactly zero


def test_nan_evidence_lists_the_guards_events(tmp_path: Path) -> None:
    result = run_demo("nan", logdir=tmp_path)
    diagnosis = one(result.doctor, "nonfinite")
    # Reported right after the first event, its evidence then kept current to the last
    # evaluation (the one on the way out, when the guard stopped the run): every event.
    steps = [e.step for e in result.guard.events]
    assert diagnosis.step == steps[0] + 1
    assert steps[-1] - Thresholds().event_window < steps[0]  # all inside the event window
    assert diagnosis.severity == "error"
    assert diagnosis.evidence["steps"] == steps
    assert diagnosis.evidence["count"] == len(steps)
    assert f"first {steps[0]}, latest {steps[-1]}" in diagnosis.message


def test_exploding_evidence_matches_the_gradient_monitors_spike(tmp_path: Path) -> None:
    result = run_demo("exploding", logdir=tmp_path)
    diagnosis = one(result.doctor, "exploding_gradients")
    spikes = {e.step: e for e in result.monitor.events if e.kind == "spike"}
    assert sorted(spikes) == [60, 120, 180]  # the outlier batches, and only those
    first = spikes[60]
    assert diagnosis.step == 61  # at once: right after the spike's optimizer step
    # One episode (the default event window, 200 steps, spans all three), its evidence kept
    # current: every spike, and the largest ratio among them.
    assert diagnosis.evidence["steps"] == [60, 120, 180]
    assert diagnosis.evidence["max_ratio_to_median"] == pytest.approx(
        max(e.value / e.reference for e in spikes.values()), rel=1e-6
    )
    assert first.value / first.reference <= diagnosis.evidence["max_ratio_to_median"]


def test_plateau_is_a_minimum_of_the_probe_with_the_best_linear_fits_loss(tmp_path: Path) -> None:
    result = run_demo("plateau", logdir=tmp_path)
    minimum = one(result.doctor, "local_minimum").evidence
    bias = one(result.doctor, "model_bias").evidence
    train, _ = SCENARIOS["plateau"].data(0)
    x, _ = next(iter(train))  # the probe batch
    eigenvalues = torch.linalg.eigvalsh(linear_hessian(x))
    assert minimum["lambda_max"] == pytest.approx(float(eigenvalues[-1]), rel=1e-3)
    assert minimum["lambda_min"] == pytest.approx(float(eigenvalues[0]), rel=1e-3)
    assert minimum["loss_is_high"] is True
    # The loss it stalled at is that of the best linear fit (least squares on all the data).
    inputs, targets = train.dataset.tensors
    design = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, targets.double()).solution
    best = float((design @ solution - targets.double()).pow(2).mean())
    assert bias["loss"] == pytest.approx(best, rel=0.1)
    assert bias["loss"] > Thresholds().high_loss_fraction * bias["initial_loss"]


# -------------------------------------------------------------------- no false alarms
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_demo_raises_no_alarm(seed: int, tmp_path: Path) -> None:
    result = run_demo("healthy", logdir=tmp_path, seed=seed)
    assert result.doctor.diagnoses == []
    # Not vacuous: the doctor had a full window of losses and fresh curvature to judge from.
    assert len(result.doctor.state_dict()["losses"]) == result.doctor.window
    assert len(result.curvature.history) >= 4
    assert result.monitor.events == []


def linear_target_data(samples: int) -> tuple[Tensor, Tensor]:
    """16 features, ``y = x @ w + 0.1 noise`` with ``|w| = 2``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 16, generator=generator)
    w = torch.randn(16, 1, generator=generator)
    w = 2.0 * w / w.norm()
    return x, x @ w + 0.1 * torch.randn(samples, 1, generator=generator)


class ValRecorder(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.values.append(float(trainer.callback_metrics["val_loss"]))


def test_healthy_sgd_momentum_mlp_with_validation_raises_no_alarm() -> None:
    x, y = linear_target_data(1536)
    train = make_loader(x[:1024], y[:1024], batch_size=32)
    val = make_loader(x[1024:], y[1024:], batch_size=512)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    module = Regression(net, lambda p: torch.optim.SGD(p, lr=3e-3, momentum=0.9))
    doctor = TrainingDoctor(check_every_n_steps=16, window=64, console=False)
    recorder = ValRecorder()
    fit(module, train, [*monitors(curvature_every=32), doctor, recorder], 192, val=val)
    assert len(recorder.values) == 6
    assert all(b < a for a, b in zip(recorder.values, recorder.values[1:], strict=False))
    assert doctor.diagnoses == []
    state = doctor.state_dict()
    assert state["val_losses"] == pytest.approx(recorder.values)
    assert len(state["losses"]) == 64


# --------------------------------------------------- scenarios the demo does not cover
@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        (1e-4, {"lr_too_small"}),  # 0.04% of the excess loss per step: 2% per window
        (1e-3, set()),  # still timid, but progressing more than slow_progress per window
        (0.1, set()),  # converges to the noise floor
    ],
)
def test_lr_too_small(ratio: float, expected: set[str]) -> None:
    x, y = standardised_regression(0, 256, scale=3.0, noise=0.1)
    optimizer = sgd_at(ratio, x)
    torch.manual_seed(0)
    module = Regression(nn.Linear(8, 1), optimizer)
    doctor = TrainingDoctor(check_every_n_steps=10, window=50, console=False)
    fit(module, make_loader(x, y, batch_size=256), [*monitors(), doctor], 120)
    assert kinds(doctor) == expected
    if expected:
        evidence = one(doctor, "lr_too_small").evidence
        # The Hessian is constant: the ratio is lambda_max * lr / 2 exactly.
        assert evidence["sharpness_ratio"] == pytest.approx(ratio, rel=1e-3)
        assert -Thresholds().slow_progress < evidence["relative_change"] < 0
        assert evidence["noise_to_signal"] < 1.0  # a strong gradient signal


@pytest.mark.parametrize(("noise", "expected"), [
    (1.0, {"plateau", "local_minimum", "gradient_noise"}),
    (0.0, set()),
])  # fmt: skip
def test_gradient_noise(noise: float, expected: set[str]) -> None:
    """Linear regression with small batches near its optimum. With label noise, the loss sits at
    the noise floor (1/18 of the initial loss) and the mini-batch gradients are pure noise: a
    minimum, reached, where only a smaller step or a bigger batch helps. Without it the problem
    interpolates: every per-example gradient vanishes at the optimum, so the noise shrinks with
    the signal and the loss keeps falling geometrically."""
    x, y = standardised_regression(0, 512, scale=1.5, noise=noise)
    optimizer = sgd_at(0.2, x)
    torch.manual_seed(0)
    module = Regression(nn.Linear(8, 1), optimizer)
    doctor = TrainingDoctor(check_every_n_steps=10, window=50, console=False)
    fit(module, make_loader(x, y, batch_size=8), [*monitors(), doctor], 100)
    assert kinds(doctor) == expected
    if expected:
        evidence = one(doctor, "gradient_noise").evidence
        assert evidence["batch_size"] == 8
        assert evidence["noise_to_signal"] >= Thresholds().noise_dominance
        assert one(doctor, "local_minimum").evidence["lambda_min"] > 0  # convex


def mlp(depth: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    features = 8
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    return nn.Sequential(*layers, nn.Linear(features, 1))


def adam_start(warmup_steps: int, **gradient: Any) -> tuple[Regression, TrainingDoctor]:
    """Adam at lr 0.03 (beta2 0.99: a warm-up horizon of 200 steps) on a deep ReLU MLP: without
    warm-up the loss jumps fivefold over the first steps."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=generator)
    y = x @ torch.randn(8, 1, generator=generator) / 3
    torch.manual_seed(0)
    module = Regression(
        mlp(4, 128),
        lambda p: torch.optim.Adam(p, lr=0.03, betas=(0.9, 0.99)),
        warmup_steps=warmup_steps,
    )
    doctor = TrainingDoctor(check_every_n_steps=10, window=50, console=False)
    fit(module, make_loader(x, y, batch_size=32), [*monitors(20, **gradient), doctor], 100)
    return module, doctor


def test_needs_warmup_from_early_gradient_spikes() -> None:
    # A GradientMonitor that may flag spikes from the second step on sees the start blow up.
    module, doctor = adam_start(warmup_steps=0, min_history=1)
    losses = module.step_losses(3)
    assert losses[2] > 5 * losses[0]
    assert kinds(doctor) == {"needs_warmup", "exploding_gradients"}
    evidence = one(doctor, "needs_warmup").evidence
    assert evidence["warmup_horizon"] == 200
    assert evidence["early_spike_steps"] == one(doctor, "exploding_gradients").evidence["steps"]
    assert "total_iters=200" in one(doctor, "needs_warmup").recommendation


def test_no_needs_warmup_with_a_linear_warmup() -> None:
    module, doctor = adam_start(warmup_steps=200, min_history=1)
    losses = module.step_losses(10)
    assert max(losses) < 1.5 * losses[0]
    assert kinds(doctor) == set()


def test_needs_warmup_when_the_early_loss_blows_up() -> None:
    module, doctor = adam_start(warmup_steps=0)
    losses = module.step_losses(5)
    assert losses[1] > 2 * losses[0]
    assert losses[2] > 5 * losses[0]
    # The rolling median of the first three losses is already above twice the first loss.
    assert sorted(losses[:3])[1] > (1 + Thresholds().warmup_loss_rise) * losses[0]
    assert "needs_warmup" in kinds(doctor)


def test_no_needs_warmup_when_the_loss_only_falls() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    y = torch.sin(x @ torch.randn(8, 1, generator=generator) / 2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    module = Regression(net, lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.99)))
    doctor = TrainingDoctor(check_every_n_steps=10, window=50, console=False)
    fit(module, make_loader(x, y, batch_size=256), [*monitors(20), doctor], 60)
    losses = module.step_losses(20)
    assert all(loss < losses[0] for loss in losses[1:])  # never above the first loss
    assert "needs_warmup" not in kinds(doctor)


class Branches(nn.Module):
    """``head(encoder(x)) + scale * side(x)``: the side branch's gradient is ``scale`` times
    what it would be."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 1)
        self.side = nn.Linear(8, 1)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x)) + self.scale * self.side(x)


@pytest.mark.parametrize(("scale", "expected"), [(1e-6, {"vanishing_gradients"}), (1.0, set())])
def test_vanishing_gradients(scale: float, expected: set[str]) -> None:
    x, y = standardised_regression(0, 512, noise=0.1)
    torch.manual_seed(0)
    module = Regression(Branches(scale), lambda p: torch.optim.SGD(p, lr=0.02))
    doctor = TrainingDoctor(check_every_n_steps=10, window=50, console=False)
    gradients, guard, curvature = monitors()
    fit(module, make_loader(x, y, batch_size=32), [gradients, guard, curvature, doctor], 60)
    assert kinds(doctor) == expected
    if expected:
        diagnosis = one(doctor, "vanishing_gradients")
        assert diagnosis.evidence["layers"] == ["net.side"]
        assert diagnosis.active
        # The monitor flags it after 5 steps (its patience); the doctor treats it as an event,
        # reported at the first check that sees it.
        assert [(e.kind, e.step) for e in gradients.events] == [("vanishing", 4)]
        assert diagnosis.step == 10


@pytest.mark.filterwarnings("ignore:NonFiniteGuard. non-finite loss at step 15")
@pytest.mark.parametrize(("nan_steps", "expected"), [((15,), {"nonfinite"}), ((), set())])
def test_nonfinite(nan_steps: tuple[int, ...], expected: set[str]) -> None:
    x, y = standardised_regression(0, 512, noise=0.1)
    torch.manual_seed(0)
    module = Regression(nn.Linear(8, 1), lambda p: torch.optim.SGD(p, lr=0.02), nan_steps=nan_steps)
    doctor = TrainingDoctor(check_every_n_steps=10, window=50, console=False)
    gradients, guard, curvature = monitors()
    fit(module, make_loader(x, y, batch_size=32), [gradients, guard, curvature, doctor], 60)
    assert kinds(doctor) == expected
    assert [e.step for e in guard.events] == list(nan_steps)
    if expected:
        diagnosis = one(doctor, "nonfinite")
        # An event: judged at once, right after optimizer step 15 (global step 16), not at the
        # next regular check (20).
        assert (diagnosis.step, diagnosis.severity) == (16, "error")
        assert diagnosis.evidence["steps"] == [15]
        assert diagnosis.active  # within event_window (200) of step 15


@pytest.mark.filterwarnings("ignore:NonFiniteGuard. non-finite loss at step")
def test_a_burst_of_nans_is_one_diagnosis_with_current_evidence() -> None:
    x, y = standardised_regression(0, 512, noise=0.1)
    torch.manual_seed(0)
    module = Regression(
        nn.Linear(8, 1), lambda p: torch.optim.SGD(p, lr=0.02), nan_steps=(15, 16, 17)
    )
    doctor = TrainingDoctor(check_every_n_steps=10, window=50, console=False)
    callbacks = [GradientMonitor(), NonFiniteGuard(action="skip"), doctor]
    fit(module, make_loader(x, y, batch_size=32), callbacks, 30)
    nonfinite = one(doctor, "nonfinite")
    assert nonfinite.step == 16  # appeared right after the first bad step ...
    assert nonfinite.evidence["steps"] == [15, 16, 17]  # ... and kept count of the burst
    assert nonfinite.evidence["count"] == 3
    assert "at 3 step(s), first 15, latest 17" in nonfinite.message


def test_a_run_stopped_by_the_guard_is_diagnosed_recorded_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NonFiniteGuard(action="raise") ends fit before the next check: the doctor judges the
    run in on_exception, and the record says what stopped it."""
    from lightning_optdiag.callbacks import NonFiniteError
    from lightning_optdiag.report.logdir import read_run

    x, y = standardised_regression(0, 512, noise=0.1)
    torch.manual_seed(0)
    module = Regression(nn.Linear(8, 1), lambda p: torch.optim.SGD(p, lr=0.02), nan_steps=(15,))
    doctor = TrainingDoctor(check_every_n_steps=10, window=50)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0, default_hp_metric=False)
    callbacks = [GradientMonitor(), NonFiniteGuard(action="raise"), doctor]
    with pytest.raises(NonFiniteError, match="non-finite loss at step 15"):
        fit(module, make_loader(x, y, batch_size=32), callbacks, 60, logger=logger)
    nonfinite = one(doctor, "nonfinite")
    assert (nonfinite.step, nonfinite.evidence["steps"]) == (15, [15])
    assert "nonfinite" in capsys.readouterr().out  # the report is printed on the way out
    logger.experiment.flush()
    run = read_run(logger.log_dir)
    assert run.record is not None
    assert run.record.final is False
    assert run.record.stopped is not None
    assert run.record.stopped.startswith(
        "NonFiniteError: NonFiniteGuard: non-finite loss at step 15"
    )
    assert run.record.diagnoses == doctor.diagnoses


# ------------------------------------------------------------------ reporting lifecycle
def test_exploding_diagnosis_appears_once_and_clears_once() -> None:
    """The demo's exploding scenario with a short event window: the spike at step 60 is
    reported at once (global step 61) and cleared at the first check it has aged out of."""
    spec = SCENARIOS["exploding"]
    pl_seed_everything(0, verbose=False)
    train, _ = spec.data(0)
    doctor = TrainingDoctor(
        check_every_n_steps=20, window=100, console=False, thresholds=Thresholds(event_window=30)
    )
    gradients = GradientMonitor(log_every_n_steps=10)
    callbacks = [gradients, NonFiniteGuard(action="skip"), doctor]
    fit(make_module(spec, 0, train), train, callbacks, 240, **spec.trainer)
    assert [e.step for e in gradients.events if e.kind == "spike"] == [60, 120, 180]
    episodes = [(d.kind, d.step, d.cleared_step) for d in doctor.diagnoses]
    # The spike in optimizer step 60 is judged right after it (global step 61), stays in the
    # event window at the check at 80 (60 > 80 - 30) and is out of it at 100 (60 <= 100 - 30);
    # the same for the one at 120.
    assert episodes[:2] == [
        ("exploding_gradients", 61, 100),
        ("exploding_gradients", 121, 160),
    ]
    assert doctor.diagnoses[0].evidence["steps"] == [60]
    assert doctor.diagnoses[1].evidence["steps"] == [120]
    assert doctor.active == []


def test_evidence_grows_with_new_spikes_and_does_not_shrink_as_old_ones_age_out() -> None:
    spec = SCENARIOS["exploding"]
    pl_seed_everything(0, verbose=False)
    train, _ = spec.data(0)
    doctor = TrainingDoctor(
        check_every_n_steps=20, window=100, console=False, thresholds=Thresholds(event_window=80)
    )
    callbacks = [GradientMonitor(log_every_n_steps=10), NonFiniteGuard(action="skip"), doctor]
    fit(make_module(spec, 0, train), train, callbacks, 240, **spec.trainer)
    # Spikes at 60, 120 and 180, each within 80 steps of the last: one episode, still active at
    # 240 (180 + 80 > 240). The evidence is the window at the latest spike (181: the spikes at
    # 120 and 180). By the checks at 220 and 240 the spike at 120 has aged out of the window
    # (120 <= 220 - 80) and the rule sees only 180, but no new event came: the evidence stays.
    (episode,) = doctor.diagnoses
    assert (episode.kind, episode.step, episode.cleared_step) == ("exploding_gradients", 61, None)
    assert episode.evidence["steps"] == [120, 180]
    assert episode.evidence["count"] == 2
    assert episode.message.startswith("2 gradient-norm spike(s)")


def test_every_outlier_batch_of_the_exploding_scenario_is_an_episode() -> None:
    spec = SCENARIOS["exploding"]
    pl_seed_everything(0, verbose=False)
    train, _ = spec.data(0)
    doctor = TrainingDoctor(
        check_every_n_steps=20, window=100, console=False, thresholds=Thresholds(event_window=30)
    )
    callbacks = [GradientMonitor(log_every_n_steps=10), NonFiniteGuard(action="skip"), doctor]
    fit(make_module(spec, 0, train), train, callbacks, 240, **spec.trainer)
    assert [(d.step, d.cleared_step) for d in doctor.diagnoses] == [
        (61, 100),
        (121, 160),
        (181, 220),
    ]


def test_an_outlier_spike_does_not_make_later_gradients_stationary(tmp_path: Path) -> None:
    result = run_demo("exploding", logdir=tmp_path, seed=1)
    assert "exploding_gradients" in kinds(result.doctor)
    assert not {"saddle_point", "local_minimum"} & kinds(result.doctor)


def finding(kind: str, **evidence: Any) -> Finding:
    return Finding(
        kind=kind,
        severity="error" if kind == "nonfinite" else "warning",
        confidence=0.9,
        evidence=evidence or {"value": 1.0},
        message=f"{kind} seen",
        recommendation=f"fix {kind}",
    )


class Scripted:
    """Stands in for ``diagnose``: the findings of each check, by step."""

    def __init__(self, schedule: dict[int, set[str]]) -> None:
        self.schedule = schedule
        self.steps: list[int] = []

    def __call__(self, observations: Any, thresholds: Any) -> list[Finding]:
        self.steps.append(observations.step)
        return [finding(kind) for kind in sorted(self.schedule.get(observations.step, set()))]


def tiny_loader(batches: int = 4) -> DataLoader[Any]:
    x, y = standardised_regression(0, 8 * batches, noise=0.1)
    return make_loader(x, y, batch_size=8)


def scripted_run(
    monkeypatch: pytest.MonkeyPatch,
    schedule: dict[int, set[str]],
    steps: int,
    val: DataLoader[Any] | None = None,
    **doctor: Any,
) -> tuple[TrainingDoctor, Scripted, Trainer]:
    script = Scripted(schedule)
    monkeypatch.setattr(training_doctor, "diagnose", script)
    options: dict[str, Any] = {"check_every_n_steps": 1, "window": 10, "console": False}
    doctor_ = TrainingDoctor(**{**options, **doctor})
    torch.manual_seed(0)
    module = Regression(nn.Linear(8, 1), lambda p: torch.optim.SGD(p, lr=0.01))
    trainer = fit(module, tiny_loader(), [doctor_], steps, val=val)
    return doctor_, script, trainer


def history(doctor: TrainingDoctor) -> list[tuple[str, int, int | None]]:
    return [(d.kind, d.step, d.cleared_step) for d in doctor.diagnoses]


@pytest.mark.parametrize(("confirm", "expected"), [
    (2, []),
    (1, [("plateau", 3, 4)]),
])  # fmt: skip
def test_a_state_seen_at_one_check_only_is_debounced(
    monkeypatch: pytest.MonkeyPatch, confirm: int, expected: list[Any]
) -> None:
    doctor, script, _ = scripted_run(monkeypatch, {3: {"plateau"}}, 6, confirm_checks=confirm)
    assert script.steps == [1, 2, 3, 4, 5, 6]  # one check per step, none repeated at the end
    assert history(doctor) == expected


def test_a_state_is_reported_once_and_cleared_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Held at checks 2-4, missing at 5 (one miss does not clear), back at 6, gone from 7.
    schedule = {step: {"plateau"} for step in (2, 3, 4, 6)}
    doctor, _, _ = scripted_run(monkeypatch, schedule, 10, confirm_checks=2)
    assert history(doctor) == [("plateau", 3, 8)]
    assert doctor.active == []
    assert doctor.diagnoses[0].message == "plateau seen"


def test_a_state_that_returns_after_clearing_is_a_new_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    schedule = {step: {"saddle_point"} for step in (1, 2, 3, 7, 8, 9, 10)}
    doctor, _, _ = scripted_run(monkeypatch, schedule, 10, confirm_checks=2)
    assert history(doctor) == [("saddle_point", 2, 5), ("saddle_point", 8, None)]
    assert [d.kind for d in doctor.active] == ["saddle_point"]
    assert doctor.active[0] is doctor.diagnoses[1]


def test_the_validation_check_at_a_check_step_does_not_confirm_a_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doctor, script, _ = scripted_run(
        monkeypatch, {4: {"plateau"}}, 12, val=tiny_loader(1), check_every_n_steps=4
    )
    assert script.steps == [4, 4, 8, 8, 12, 12]  # four steps per epoch, validation each epoch
    assert history(doctor) == []


def test_events_are_reported_and_cleared_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = {3: {"exploding_gradients", "nonfinite"}, 4: {"nonfinite"}}
    doctor, _, _ = scripted_run(monkeypatch, schedule, 6, confirm_checks=3)
    assert sorted(history(doctor)) == [("exploding_gradients", 3, 4), ("nonfinite", 3, 5)]


def test_needs_warmup_is_sticky(monkeypatch: pytest.MonkeyPatch) -> None:
    doctor, _, _ = scripted_run(monkeypatch, {2: {"needs_warmup"}}, 8)
    assert history(doctor) == [("needs_warmup", 2, None)]
    assert [d.kind for d in doctor.active] == ["needs_warmup"]


# ------------------------------------------------------------------------------- outputs
def tensorboard_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[TrainingDoctor, Any]:
    """Plateau at checks 2-3, NaN at check 3 (confirm_checks=1), 6 steps, read back."""
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        TENSORS,
        EventAccumulator,
    )

    logger = TensorBoardLogger(tmp_path, name="tb", version=0, default_hp_metric=False)
    monkeypatch.setattr(
        training_doctor, "diagnose", Scripted({2: {"plateau"}, 3: {"plateau", "nonfinite"}})
    )
    doctor = TrainingDoctor(check_every_n_steps=1, window=10, console=False, confirm_checks=1)
    torch.manual_seed(0)
    module = Regression(nn.Linear(8, 1), lambda p: torch.optim.SGD(p, lr=0.01))
    fit(module, tiny_loader(), [doctor], 6, logger=logger, log_every_n_steps=1)
    assert history(doctor) == [("plateau", 2, 4), ("nonfinite", 3, 4)]
    events = EventAccumulator(logger.log_dir, size_guidance={TENSORS: 0, SCALARS: 0})
    events.Reload()
    return doctor, events


def test_tensorboard_layout_text_and_per_kind_scalars(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, events = tensorboard_run(monkeypatch, tmp_path)
    # The custom-scalars layout, once.
    layouts = events.Tensors("custom_scalars__config__")
    assert len(layouts) == 1
    assert "custom_scalars__config__" in events.PluginTagToContent("custom_scalars")
    layout = layout_pb2.Layout.FromString(layouts[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for c in layout.category for chart in c.chart}
    assert charts["active diagnoses"] == [r"optdiag/diagnosis/.*"]
    # One scalar per kind and check: 1 while active.
    for kind in KINDS:
        points = {p.step: p.value for p in events.Scalars(f"optdiag/diagnosis/{kind}")}
        active_steps = {"plateau": {2, 3}, "nonfinite": {3}}.get(kind, set())
        assert points == {step: float(step in active_steps) for step in range(1, 7)}, kind
    # The diagnoses as Markdown, whenever something appeared or cleared.
    (tag,) = [t for t in events.PluginTagToContent("text") if t.startswith("optdiag/diagnoses")]
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)}
    assert {2, 3, 4} <= set(texts)
    assert "| plateau | since step 2 |" in texts[2]
    assert "nonfinite" not in texts[2]
    assert "| plateau | since step 2 |" in texts[3]
    assert "| nonfinite | since step 3 |" in texts[3]
    assert "| plateau | steps 2–4 |" in texts[4]
    assert "| nonfinite | steps 3–4 |" in texts[4]
    assert texts[max(texts)] == texts[4]


def test_the_learning_rate_is_logged_with_every_evaluation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _, events = tensorboard_run(monkeypatch, tmp_path)
    logged = events.Scalars("optdiag/lr")
    assert [e.step for e in logged] == [1, 2, 3, 4, 5, 6]  # check_every_n_steps=1
    assert all(e.value == pytest.approx(0.01) for e in logged)  # the module's SGD lr


def test_tensorboard_text_is_written_when_something_changed_and_at_the_end(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    doctor, events = tensorboard_run(monkeypatch, tmp_path)
    (tag,) = [t for t in events.PluginTagToContent("text") if t.startswith("optdiag/diagnoses")]
    assert [e.step for e in events.Tensors(tag)] == [2, 3, 4, 6]
    (record_tag,) = [t for t in events.PluginTagToContent("text") if t.startswith(RECORD_TAG)]
    texts = events.Tensors(record_tag)
    assert [e.step for e in texts] == [2, 3, 4, 6]
    records = [decode_record(e.tensor_proto.string_val[0].decode()) for e in texts]
    assert [r.final for r in records] == [False, False, False, True]
    assert [(d.kind, d.step, d.cleared_step) for d in records[1].diagnoses] == [
        ("plateau", 2, None),
        ("nonfinite", 3, None),
    ]
    assert records[-1].diagnoses == doctor.diagnoses


def test_to_json_writes_strict_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Infinite(Scripted):
        def __call__(self, observations: Any, thresholds: Any) -> list[Finding]:
            self.steps.append(observations.step)
            if observations.step < 3:
                return []
            ratio = math.inf if observations.step == 3 else 2.0
            return [finding("lr_too_high", sharpness_ratio=ratio, curve=[1.0, math.nan])]

    monkeypatch.setattr(training_doctor, "diagnose", Infinite({}))
    thresholds = Thresholds(saddle_tau=0.03, target_loss=0.05)
    doctor = TrainingDoctor(
        check_every_n_steps=1, window=10, console=False, confirm_checks=1, thresholds=thresholds
    )
    torch.manual_seed(0)
    module = Regression(nn.Linear(8, 1), lambda p: torch.optim.SGD(p, lr=0.01))
    fit(module, tiny_loader(), [doctor], 5)
    path = tmp_path / "diagnoses.json"
    doctor.to_json(path)

    def reject(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    record = json.loads(path.read_text(), parse_constant=reject)
    assert set(record) == {"diagnoses", "active", "actions", "vocabulary", "thresholds"}
    assert record["vocabulary"] == KINDS
    assert record["thresholds"] == asdict(thresholds)
    assert record["active"] == ["lr_too_high"]
    (diagnosis,) = record["diagnoses"]
    assert (diagnosis["kind"], diagnosis["step"], diagnosis["cleared_step"]) == (
        "lr_too_high",
        3,
        None,
    )
    assert diagnosis["evidence"] == {"sharpness_ratio": None, "curve": [1.0, None]}
    assert Diagnosis.from_dict(diagnosis).message == "lr_too_high seen"


@pytest.fixture
def plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "JUPYTER_COLUMNS"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("plain_terminal")
def test_console_prints_the_final_report_as_plain_text(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    doctor, _, _ = scripted_run(monkeypatch, {3: {"plateau"}}, 5, confirm_checks=1, console=True)
    assert history(doctor) == [("plateau", 3, 4)]
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # stdout is not a terminal: no ANSI escape codes
    assert out.count("optdiag report") == 1
    for text in ("plateau", "plateau seen", "fix plateau"):
        assert text in out
    assert "steps 3–4" in out


@pytest.mark.usefixtures("plain_terminal")
def test_console_quiet_when_disabled(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted_run(monkeypatch, {3: {"plateau"}}, 5, confirm_checks=1, console=False)
    assert "optdiag" not in capsys.readouterr().out


@pytest.mark.usefixtures("plain_terminal")
def test_console_panel_after_a_validation_epoch_with_changes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Four steps per epoch, validation after each: the plateau appears in epoch 1 (steps 5-8)
    # and clears at step 9; epoch 0 changes nothing.
    schedule = {step: {"plateau"} for step in (5, 6, 7, 8)}
    val = tiny_loader(1)
    doctor, _, _ = scripted_run(monkeypatch, schedule, 12, val=val, confirm_checks=1, console=True)
    assert history(doctor) == [("plateau", 5, 9)]
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    panels = out.split("optdiag · epoch")[1:]
    assert len(panels) == 2
    assert panels[0].startswith(" 1 · step 8")
    assert "+ plateau (step 5): plateau seen" in panels[0]
    assert panels[1].startswith(" 2 · step 12")
    assert "- plateau cleared at step 9 (steps 5–9)" in panels[1]
    assert out.index("optdiag · epoch 2") < out.index("optdiag report")


class ConsoleSpy(Callback):
    """Wraps the RichProgressBar console's ``print`` once the bar has created it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.console: Any = None
        self.printed: list[Any] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        progress = trainer.progress_bar_callback
        assert isinstance(progress, RichProgressBar)
        self.console = progress._console
        original = self.console.print

        def spy(*objects: Any, **kwargs: Any) -> None:
            self.printed.extend(objects)
            original(*objects, **kwargs)

        self.monkeypatch.setattr(self.console, "print", spy)


def render(renderable: Any) -> str:
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


@pytest.mark.usefixtures("plain_terminal")
def test_console_output_goes_through_the_rich_progress_bar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("rich")
    spy = ConsoleSpy(monkeypatch)
    schedule = {step: {"plateau"} for step in (5, 6, 7, 8)}
    script = Scripted(schedule)
    monkeypatch.setattr(training_doctor, "diagnose", script)
    doctor = TrainingDoctor(check_every_n_steps=1, window=10, console=True, confirm_checks=1)
    torch.manual_seed(0)
    module = Regression(nn.Linear(8, 1), lambda p: torch.optim.SGD(p, lr=0.01))
    progress = RichProgressBar()
    fit(
        module,
        tiny_loader(),
        [progress, doctor, spy],
        12,
        val=tiny_loader(1),
        enable_progress_bar=True,
    )
    assert spy.console is not None
    assert spy.console is progress._console
    texts = [render(item) for item in spy.printed]
    assert sum("optdiag · epoch" in text for text in texts) == 2  # the two change panels
    assert sum("optdiag report" in text for text in texts) == 1
    assert any("plateau seen" in text for text in texts)


# ---------------------------------------------------------------------------- loss reading
def reference_step_losses(
    module: Regression, reduce: Callable[[list[float]], float]
) -> list[float]:
    per_step: dict[int, list[float]] = {}
    for step, _, loss in module.losses:
        per_step.setdefault(step, []).append(loss)
    return [reduce(per_step[step]) for step in sorted(per_step)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_gradient_accumulation_records_the_mean_of_the_micro_batches() -> None:
    doctor = TrainingDoctor(check_every_n_steps=3, window=50, console=False)
    torch.manual_seed(0)
    module = Regression(nn.Linear(8, 1), lambda p: torch.optim.SGD(p, lr=0.01))
    x, y = standardised_regression(0, 128, noise=0.1)
    fit(module, make_loader(x, y, batch_size=8), [doctor], 12, accumulate_grad_batches=2)
    expected = reference_step_losses(module, mean)
    assert len(expected) == 12
    assert all(len(parts) == 2 for parts in _parts(module).values())
    assert doctor.state_dict()["losses"] == pytest.approx(expected, rel=1e-6)


def _parts(module: Regression) -> dict[int, list[float]]:
    per_step: dict[int, list[float]] = {}
    for step, _, loss in module.losses:
        per_step.setdefault(step, []).append(loss)
    return per_step


@pytest.mark.parametrize("step_every", [1, 2])
def test_manual_optimization_returning_the_loss(step_every: int) -> None:
    doctor = TrainingDoctor(check_every_n_steps=3, window=50, console=False)
    torch.manual_seed(0)
    module = Regression(
        nn.Linear(8, 1), lambda p: torch.optim.SGD(p, lr=0.01), manual=True, step_every=step_every
    )
    x, y = standardised_regression(0, 128, noise=0.1)
    fit(module, make_loader(x, y, batch_size=8), [doctor], 8)
    expected = reference_step_losses(module, mean)
    assert len(expected) == 8
    assert doctor.state_dict()["losses"] == pytest.approx(expected, rel=1e-6)


def test_manual_optimization_with_a_logged_train_loss() -> None:
    doctor = TrainingDoctor(
        check_every_n_steps=3, window=50, console=False, train_loss_key="train_loss"
    )
    torch.manual_seed(0)
    module = Regression(
        nn.Linear(8, 1),
        lambda p: torch.optim.SGD(p, lr=0.01),
        manual=True,
        return_loss=False,
        log_train_loss=True,
    )
    x, y = standardised_regression(0, 128, noise=0.1)
    fit(module, make_loader(x, y, batch_size=8), [doctor], 8)
    expected = reference_step_losses(module, mean)
    assert doctor.state_dict()["losses"] == pytest.approx(expected, rel=1e-6)


def test_manual_optimization_without_a_loss_records_nothing() -> None:
    doctor = TrainingDoctor(check_every_n_steps=3, window=50, console=False)
    torch.manual_seed(0)
    module = Regression(
        nn.Linear(8, 1), lambda p: torch.optim.SGD(p, lr=0.01), manual=True, return_loss=False
    )
    x, y = standardised_regression(0, 128, noise=0.1)
    fit(module, make_loader(x, y, batch_size=8), [doctor], 8)
    assert doctor.state_dict()["losses"] == []
    assert doctor.diagnoses == []


class StateDictAt(Callback):
    """Asks ``doctor.state_dict()`` (what a checkpoint does) at the end of one batch."""

    def __init__(self, doctor: TrainingDoctor, batch_idx: int) -> None:
        self.doctor = doctor
        self.batch_idx = batch_idx

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.batch_idx:
            self.doctor.state_dict()


def test_a_checkpoint_between_checks_keeps_manual_accumulation_means() -> None:
    doctor = TrainingDoctor(check_every_n_steps=50, window=50, console=False)
    torch.manual_seed(0)
    module = Regression(
        nn.Linear(8, 1), lambda p: torch.optim.SGD(p, lr=0.01), manual=True, step_every=2
    )
    x, y = standardised_regression(0, 128, noise=0.1)
    fit(module, make_loader(x, y, batch_size=8), [doctor, StateDictAt(doctor, 3)], 6)
    expected = reference_step_losses(module, mean)
    assert doctor.state_dict()["losses"] == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------- checkpoint / resume
class FindingsSpy:
    """Wraps ``diagnose``: the kinds found at each check."""

    def __init__(self) -> None:
        self.found: list[tuple[int, set[str]]] = []
        self.diagnose = training_doctor.diagnose

    def __call__(self, observations: Any, thresholds: Any) -> list[Finding]:
        findings = self.diagnose(observations, thresholds)
        self.found.append((observations.step, {f.kind for f in findings}))
        return findings


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch")
def test_checkpoint_resume_restores_diagnoses_and_history(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    x, y = standardised_regression(0, 512, noise=0.1)
    train = make_loader(x, y, batch_size=32)

    def run(max_steps: int, ckpt: str | None) -> tuple[TrainingDoctor, Regression, Trainer]:
        doctor = TrainingDoctor(check_every_n_steps=10, window=50, console=False)
        torch.manual_seed(0)
        module = Regression(Branches(1e-6), lambda p: torch.optim.SGD(p, lr=0.02))
        trainer = fit(module, train, [*monitors(), doctor], max_steps, ckpt_path=ckpt)
        return doctor, module, trainer

    before, first, trainer = run(30, None)
    assert history(before) == [("vanishing_gradients", 10, None)]
    path = tmp_path / "doctor.ckpt"
    trainer.save_checkpoint(path)
    saved = before.state_dict()

    spy = FindingsSpy()
    monkeypatch.setattr(training_doctor, "diagnose", spy)
    after, second, _ = run(60, str(path))
    # Still vanishing at every check after the resume ...
    assert spy.found == [(step, {"vanishing_gradients"}) for step in (40, 50, 60)]
    # ... yet not reported again: the record from before the save is the active one.
    assert history(after) == [("vanishing_gradients", 10, None)]
    assert after.diagnoses[0].to_dict() == before.diagnoses[0].to_dict()
    assert after.active == [after.diagnoses[0]]
    # The loss history continues where it stopped.
    losses = first.step_losses(30) + reference_step_losses(second, lambda parts: parts[0])
    assert len(losses) == 60
    assert after.state_dict()["losses"] == pytest.approx(losses[-50:], rel=1e-6)
    state = after.state_dict()
    assert state["initial"] == saved["initial"]
    assert state["peak_grad"] >= saved["peak_grad"]


def test_state_dict_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = {step: {"plateau"} for step in (2, 3, 4, 5, 6)} | {4: {"plateau", "nonfinite"}}
    doctor, _, _ = scripted_run(monkeypatch, schedule, 8, confirm_checks=2)
    state = doctor.state_dict()
    json.dumps(state, allow_nan=False)  # plain data, fit for any checkpoint format
    restored = TrainingDoctor(check_every_n_steps=1, window=10, console=False)
    restored.load_state_dict(state)
    assert [d.to_dict() for d in restored.diagnoses] == [d.to_dict() for d in doctor.diagnoses]
    assert [d.kind for d in restored.active] == [d.kind for d in doctor.active]
    assert all(any(a is d for d in restored.diagnoses) for a in restored.active)
    assert restored.state_dict() == state


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"check_every_n_steps": 0}, ValueError, ["check_every_n_steps", "0"]),
        ({"check_every_n_steps": 2.5}, TypeError, ["check_every_n_steps", "2.5"]),
        ({"check_every_n_steps": True}, TypeError, ["check_every_n_steps", "True"]),
        ({"window": 5}, ValueError, ["window", "5"]),
        ({"window": "200"}, TypeError, ["window", "'200'"]),
        ({"thresholds": {}}, TypeError, ["thresholds", "{}"]),
        ({"thresholds": {"saddle_tau": 0.03}}, TypeError, ["thresholds", "saddle_tau"]),
        ({"val_loss_key": 3}, TypeError, ["val_loss_key", "3"]),
        ({"train_loss_key": b"loss"}, TypeError, ["train_loss_key", "b'loss'"]),
        ({"measure_on_plateau": 1}, TypeError, ["measure_on_plateau", "1"]),
        ({"console": "yes"}, TypeError, ["console", "'yes'"]),
        ({"tensorboard": None}, TypeError, ["tensorboard", "None"]),
        ({"confirm_checks": 0}, ValueError, ["confirm_checks", "0"]),
        ({"confirm_checks": -1}, ValueError, ["confirm_checks", "-1"]),
    ],
)
def test_invalid_arguments_are_rejected(
    kwargs: dict[str, Any], error: type[Exception], words: list[str]
) -> None:
    assert_rejected(TrainingDoctor, kwargs, error, words)


def test_boundary_arguments_are_accepted() -> None:
    doctor = TrainingDoctor(
        check_every_n_steps=1, window=10, val_loss_key=None, train_loss_key="loss", confirm_checks=1
    )
    assert (doctor.check_every_n_steps, doctor.window, doctor.confirm_checks) == (1, 10, 1)
    assert doctor.thresholds == Thresholds()


# ------------------------------------------------------------------------------------- CLI
class CliRegression(Regression):
    def __init__(self, lr: float = 0.02) -> None:
        super().__init__(nn.Linear(8, 1), lambda params: torch.optim.SGD(params, lr=lr))


class CliData(LightningDataModule):
    def __init__(self, samples: int = 256, batch_size: int = 16) -> None:
        super().__init__()
        self.samples = samples
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader[Any]:
        x, y = standardised_regression(0, self.samples, noise=0.1)
        return make_loader(x, y, batch_size=self.batch_size)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")
def test_lightning_cli_with_nested_thresholds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["cli"])  # only ``args`` count, not pytest's arguments
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  accelerator: cpu\n"
        "  devices: 1\n"
        "  max_steps: 20\n"
        "  logger: false\n"
        "  enable_progress_bar: false\n"
        "  enable_checkpointing: false\n"
        "  enable_model_summary: false\n"
        f"  default_root_dir: {tmp_path}\n"
        "  callbacks:\n"
        "    - class_path: lightning_optdiag.callbacks.GradientMonitor\n"
        "    - class_path: lightning_optdiag.callbacks.TrainingDoctor\n"
        "      init_args:\n"
        "        check_every_n_steps: 5\n"
        "        window: 30\n"
        "        console: false\n"
        "        thresholds:\n"
        "          saddle_tau: 0.03\n"
        "          target_loss: 0.05\n"
        "          event_window: 50\n"
    )
    cli = LightningCLI(
        CliRegression,
        CliData,
        args=["fit", "--config", str(config)],
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
    )
    (doctor,) = [c for c in cli.trainer.callbacks if isinstance(c, TrainingDoctor)]
    assert doctor.thresholds == Thresholds(saddle_tau=0.03, target_loss=0.05, event_window=50)
    assert (doctor.check_every_n_steps, doctor.window, doctor.console) == (5, 30, False)
    assert cli.trainer.global_step == 20
    assert len(doctor.state_dict()["losses"]) == 20
    assert doctor.diagnoses == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")
def test_lightning_cli_rejects_an_invalid_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["cli"])
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  logger: false\n"
        "  callbacks:\n"
        "    - class_path: lightning_optdiag.callbacks.TrainingDoctor\n"
        "      init_args:\n"
        "        thresholds:\n"
        "          saddle_tau: 2.0\n"
    )
    # jsonargparse builds the dataclass (running its checks) when it instantiates the callbacks,
    # after parsing: a ValueError naming the field, not a usage error.
    with pytest.raises(ValueError, match=r"Invalid saddle_tau: 2\.0"):
        LightningCLI(
            CliRegression,
            CliData,
            args=["--config", str(config)],
            run=False,
            seed_everything_default=False,
        )


# ------------------------------------------------------------------------------------- DDP
class SplitRanks(LightningModule):
    """Linear regression without bias, two ranks with different data: rank 0's inputs are
    zero, so its loss is ``mean(y^2)`` whatever the weights; rank 1 learns a linear target at a
    negligible rate. Both losses are flat, at different levels. Module-level and lambda-free:
    ``ddp_spawn`` pickles it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 1, bias=False)
        with torch.no_grad():
            self.net.weight.zero_()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.global_rank == 0:
            x = torch.zeros_like(x)
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-6)


class RecordingDoctor(TrainingDoctor):
    """Keeps the kinds found at every evaluation (reported or not)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.found: list[tuple[int, list[str]]] = []

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> list[Finding]:
        findings = super().evaluate(trainer, pl_module)
        self.found.append((trainer.global_step, sorted(f.kind for f in findings)))
        return findings


class RankDump(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        curvature = next(c for c in trainer.callbacks if isinstance(c, CurvatureMonitor))
        doctor = next(c for c in trainer.callbacks if isinstance(c, RecordingDoctor))
        record = {
            "found": doctor.found,
            "world_size": trainer.world_size,
            "checks": [r.step for r in curvature.history],
            "lambda_max": [r.lambda_max for r in curvature.history],
            "kinds": sorted(kinds(doctor)),
            "losses": doctor.state_dict()["losses"],
        }
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run_ddp_scenario(out_dir: str) -> None:
    """Entry point of the subprocess (see the test below)."""
    torch.set_num_threads(1)
    pl_seed_everything(0, verbose=False)
    x, y = standardised_regression(0, 2048, scale=2.0, noise=0.1)
    trainer = Trainer(
        **{
            **QUIET,
            "strategy": "ddp_spawn",
            "devices": 2,
            "max_steps": 40,
            "limit_val_batches": 0,
            "callbacks": [
                # No scheduled checks: every check is one the doctor asked for.
                CurvatureMonitor(every_n_steps=10_000, max_overhead=None),
                RecordingDoctor(
                    check_every_n_steps=10,
                    window=20,
                    console=False,
                    # Pure noise in a 20-step window: its fitted slope is large by chance, so
                    # the "steep but noisy descent is progress" override stays out of the way.
                    thresholds=Thresholds(plateau_max_decrease=10.0),
                ),
                RankDump(out_dir),
            ],
        }
    )
    trainer.fit(SplitRanks(), DataLoader(TensorDataset(x, y), batch_size=16))


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_ranks_share_losses_diagnoses_and_curvature_checks(tmp_path: Path) -> None:
    run_scenario(
        "tests.callbacks.test_training_doctor",
        tmp_path,
        timeout=120,
        hang="only one rank measured the curvature?",
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # The doctor averages the losses over the processes: both ranks see the same losses (the
    # mean of two different flat curves), find the same things at the same steps, ...
    assert ranks[0]["losses"] == ranks[1]["losses"]
    steps = [step for step, _ in ranks[0]["found"]]
    assert steps == [10, 20, 30, 40]
    assert ranks[0]["found"] == ranks[1]["found"]
    plateaus = [("plateau" in kinds) for _, kinds in ranks[0]["found"]]
    assert plateaus[0] is False  # before a full window
    assert plateaus[-2:] == [True, True]
    assert "plateau" in ranks[0]["kinds"]
    # ... and measured, at the same steps, the same (all-reduced) Hessian on request.
    assert ranks[0]["checks"] == ranks[1]["checks"]
    assert len(ranks[0]["checks"]) >= 2
    assert ranks[0]["lambda_max"] == pytest.approx(ranks[1]["lambda_max"], rel=1e-6)
