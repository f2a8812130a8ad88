"""CurvatureMonitor inside real Lightning runs, against independent dense references.

A recorder callback placed after the monitor snapshots the parameters (and the optimizer state)
right after every check, and a second one keeps its own copy of the first training batches. The
expected eigenvalues are then those of a dense Hessian built here, column by column with
``torch.autograd.grad`` double backward, of a loss written out with ``torch.nn.functional``
(not the module's ``training_step``), at the snapshot parameters on the recorded batches.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch import seed_everything as pl_seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_optdiag.callbacks import CurvatureMonitor, CurvatureRecord
from tests import reference
from tests.callbacks.conftest import assert_rejected
from tests.ddp import run_scenario

pytestmark = [
    # Tiny synthetic runs: Lightning's advice about workers and the logging interval is noise
    # here, and Lightning 2.6 still builds a torch pytree LeafSpec, deprecated by torch 2.13.
    pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
IN_FEATURES = 4
OUT_FEATURES = 2
HIDDEN = 8
BATCH_SIZE = 8
# Linear(4, 8) + Linear(8, 2)
NUM_PARAMS = IN_FEATURES * HIDDEN + HIDDEN + HIDDEN * OUT_FEATURES + OUT_FEATURES
MLP_NAMES = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
QUIET: dict[str, Any] = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "accelerator": "cpu",
    "devices": 1,
    "num_sanity_val_steps": 0,
}
# Full Lanczos (tol=0, every direction): the Ritz values are the exact eigenvalues up to rounding.
EXACT: dict[str, Any] = {"tol": 0.0, "max_hvps": NUM_PARAMS, "max_overhead": None}


# ------------------------------------------------------------------------------------ models
class Net(LightningModule):
    """``Linear -> [BatchNorm1d] -> Tanh -> [Dropout] -> Linear`` trained with an MSE loss.

    Args:
        optimizer: ``"sgd"``, ``"momentum"`` (heavy ball), ``"nesterov"``, ``"adam"`` or
            ``"sgd_groups"`` (the first layer at ``lr``, the second at ``lr / 2``).
        log_metrics: ``training_step`` logs ``train_loss`` (``self.log``) and ``double_loss``
            (``self.log_dict``); every ``self.log`` call is counted in ``log_calls``.
        manual: manual optimization.
        step_sleep: seconds slept in every ``training_step`` (a slow training step).
        dtype: ``"float64"`` or ``"float32"``.
    """

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 0.1,
        batchnorm: bool = False,
        dropout: float = 0.0,
        log_metrics: bool = False,
        manual: bool = False,
        step_sleep: float = 0.0,
        dtype: str = "float64",
        seed: int = 0,
    ) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            layers: list[nn.Module] = [nn.Linear(IN_FEATURES, HIDDEN)]
            if batchnorm:
                layers.append(nn.BatchNorm1d(HIDDEN))
            layers.append(nn.Tanh())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.Linear(HIDDEN, OUT_FEATURES))
            self.net = nn.Sequential(*layers).to(getattr(torch, dtype))
        self.optimizer_name = optimizer
        self.lr = lr
        self.log_metrics = log_metrics
        self.automatic_optimization = not manual
        self.step_sleep = step_sleep
        self.log_calls: list[tuple[str, int]] = []
        self.training_step_calls = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        self.log_calls.append((name, int(self.global_step)))
        super().log(name, value, *args, **kwargs)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        self.training_step_calls += 1
        if self.step_sleep:
            time.sleep(self.step_sleep)
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if self.log_metrics:
            self.log("train_loss", loss, on_step=True, on_epoch=False)
            self.log_dict({"double_loss": 2 * loss}, on_step=True, on_epoch=False)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.optimizer_name == "momentum":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.optimizer_name == "nesterov":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.5, nesterov=True)
        if self.optimizer_name == "sgd_groups":
            first, *_, last = (m for m in self.net if isinstance(m, nn.Linear))
            groups = [
                {"params": first.parameters(), "lr": self.lr},
                {"params": last.parameters(), "lr": self.lr / 2},
            ]
            return torch.optim.SGD(groups, lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_dataset(num: int = 64, seed: int = 0, dtype: torch.dtype = torch.float64) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num, IN_FEATURES, generator=generator, dtype=dtype)
    teacher = torch.randn(IN_FEATURES, OUT_FEATURES, generator=generator, dtype=dtype)
    y = torch.tanh(x @ teacher) + 0.3 * torch.randn(num, OUT_FEATURES, generator=generator)
    return TensorDataset(x, y.to(dtype))


def make_loader(
    num: int = 64,
    seed: int = 0,
    shuffle: bool = False,
    dtype: torch.dtype = torch.float64,
    batch_size: int = BATCH_SIZE,
) -> DataLoader:
    return DataLoader(make_dataset(num, seed, dtype), batch_size=batch_size, shuffle=shuffle)


class DataModule(LightningDataModule):
    def __init__(self, num: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.num = num
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.num, self.seed)


# --------------------------------------------------------------------------- the reference
class AtChecks(Callback):
    """Placed after the monitor: a copy of the first batches of the run and, right after each
    check, the parameters and the optimizer's per-parameter state (keyed by name)."""

    def __init__(self, monitor: CurvatureMonitor, first: int = 2) -> None:
        self.monitor = monitor
        self.first = first
        self.batches: list[tuple[Tensor, Tensor]] = []
        self.params: dict[int, dict[str, Tensor]] = {}
        self.state: dict[int, dict[str, dict[str, Any]]] = {}
        self.current: tuple[Tensor, Tensor] | None = None
        self.check_batches: dict[int, tuple[Tensor, Tensor]] = {}
        self.steps_at_checks: list[int] = []

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.current = (batch[0].detach().clone(), batch[1].detach().clone())
        if len(self.batches) < self.first:
            self.batches.append(self.current)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if len(self.monitor.history) == len(self.steps_at_checks):
            return
        step = trainer.global_step
        self.steps_at_checks.append(step)
        assert self.current is not None
        self.check_batches[step] = self.current
        self.params[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        optimizer = trainer.optimizers[0]
        self.state[step] = {
            name: copy.deepcopy(optimizer.state.get(param, {}))
            for name, param in pl_module.named_parameters()
        }


class RngAtCheck(Callback):
    """Placed before the monitor: the global torch RNG state the monitor starts its check from."""

    def __init__(self) -> None:
        self.states: dict[int, Tensor] = {}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.states[trainer.global_step] = torch.get_rng_state()


def fit(
    model: LightningModule,
    callbacks: list[Callback],
    loader: DataLoader | None = None,
    ckpt_path: Path | None = None,
    **kwargs: Any,
) -> Trainer:
    options = {**QUIET, "max_steps": 6}
    options.update(kwargs)
    trainer = Trainer(callbacks=callbacks, **options)
    trainer.fit(model, loader if loader is not None else make_loader(), ckpt_path=ckpt_path)
    return trainer


def run_monitor(
    monitor: CurvatureMonitor, model: Net | None = None, **kwargs: Any
) -> tuple[AtChecks, Net, Trainer]:
    recorder = AtChecks(monitor)
    model = model if model is not None else Net()
    trainer = fit(model, [monitor, recorder], **kwargs)
    return recorder, model, trainer


def mlp_loss(params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    """The MSE of the tanh MLP, written out with torch.nn.functional."""
    x, y = batch
    hidden = torch.tanh(F.linear(x, params["net.0.weight"], params["net.0.bias"]))
    return F.mse_loss(F.linear(hidden, params["net.2.weight"], params["net.2.bias"]), y)


def dense_hessian(
    loss_of: Callable[[dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    names: list[str] | None = None,
) -> Tensor:
    """The Hessian over ``names`` (default: all), one row per double-backward call.

    Valid through BatchNorm in training mode (unlike torch.func.hessian on torch 2.13).
    """
    names = list(params) if names is None else names
    leaves = {n: p.detach().clone().requires_grad_(n in names) for n, p in params.items()}
    wrt = [leaves[n] for n in names]
    grads = torch.autograd.grad(loss_of(leaves), wrt, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = []
    for i in range(flat.numel()):
        row = torch.autograd.grad(flat[i], wrt, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(w) if r is None else r).reshape(-1)
                    for r, w in zip(row, wrt, strict=True)
                ]
            )
        )
    matrix = torch.stack(rows).double()
    return 0.5 * (matrix + matrix.T)


def flat_gradient(
    loss_of: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor]
) -> Tensor:
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    grads = torch.autograd.grad(loss_of(leaves), list(leaves.values()))
    return torch.cat([g.reshape(-1) for g in grads]).double()


def mlp_gradient(params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    return flat_gradient(lambda p: mlp_loss(p, batch), params)


def eigvalsh(matrix: Tensor) -> np.ndarray:
    return np.linalg.eigvalsh(matrix.numpy())


def assert_extremes_match(record: CurvatureRecord, eigenvalues: np.ndarray, k: int = 1) -> None:
    """The record's ends equal the dense spectrum's, within the Ritz residual (plus rounding)."""
    scale = float(np.abs(eigenvalues).max())
    slack = 1e-9 * scale
    assert record.lambda_max == pytest.approx(
        eigenvalues[-1], abs=record.residual_max + slack, rel=0
    )
    assert record.lambda_min == pytest.approx(
        eigenvalues[0], abs=record.residual_min + slack, rel=0
    )
    np.testing.assert_allclose(record.top_k, eigenvalues[::-1][:k], rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(record.bottom_k, eigenvalues[:k], rtol=0, atol=1e-8 * scale)


# ------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("k", [1, 3])
def test_eigenvalues_equal_the_dense_hessian_of_the_probe_loss(k: int) -> None:
    monitor = CurvatureMonitor(every_n_steps=2, k=k, **EXACT)
    recorder, model, _ = run_monitor(monitor, max_steps=6)
    assert [r.step for r in monitor.history] == [2, 4, 6]
    probe = recorder.batches[0]
    lambdas = []
    for record in monitor.history:
        params = recorder.params[record.step]
        assert list(params) == MLP_NAMES

        def loss_of(p: dict[str, Tensor]) -> Tensor:
            return mlp_loss(p, probe)

        hessian = dense_hessian(loss_of, params)
        # Cross-check of the column-by-column Hessian with torch.func on a copy of the network.
        network = copy.deepcopy(model.net)
        network.load_state_dict({n.removeprefix("net."): v for n, v in params.items()})
        torch.testing.assert_close(
            hessian, reference.dense_hessian(network, reference.mse_loss, probe).double()
        )
        eigenvalues = eigvalsh(hessian)
        assert_extremes_match(record, eigenvalues, k=k)
        assert len(record.top_k) == len(record.bottom_k) == k
        assert record.loss == pytest.approx(float(loss_of(params)), rel=1e-12)
        gradient = flat_gradient(loss_of, params)
        assert record.grad_norm == pytest.approx(float(gradient.norm()), rel=1e-10)
        lambdas.append(record.lambda_max)
    assert len(set(lambdas)) == 3  # the parameters moved between checks


def test_converged_eigenvalues_lie_within_their_residual_bound() -> None:
    monitor = CurvatureMonitor(every_n_steps=3, tol=1e-4, max_hvps=NUM_PARAMS, max_overhead=None)
    recorder, _, _ = run_monitor(monitor, max_steps=6)
    assert len(monitor.history) == 2
    for record in monitor.history:
        eigenvalues = eigvalsh(
            dense_hessian(lambda p: mlp_loss(p, recorder.batches[0]), recorder.params[record.step])
        )
        assert record.converged
        assert record.num_hvps < NUM_PARAMS  # stopped on the residual, not on the budget
        radius = float(np.abs(eigenvalues).max())
        assert record.residual_max <= 1e-4 * radius * 1.01
        # Ritz values lie inside the spectrum and, converged, within their residual of its ends.
        assert eigenvalues[-1] - record.residual_max <= record.lambda_max
        assert record.lambda_max <= eigenvalues[-1] + 1e-12 * radius
        assert record.lambda_min <= eigenvalues[0] + record.residual_min
        assert eigenvalues[0] - 1e-12 * radius <= record.lambda_min


def test_params_restricts_the_hessian_to_a_submodule() -> None:
    monitor = CurvatureMonitor(every_n_steps=3, params="net.2", **EXACT)
    recorder, _, _ = run_monitor(monitor, max_steps=3)
    (record,) = monitor.history
    hessian = dense_hessian(
        lambda p: mlp_loss(p, recorder.batches[0]),
        recorder.params[3],
        names=["net.2.weight", "net.2.bias"],
    )
    assert hessian.shape == (HIDDEN * OUT_FEATURES + OUT_FEATURES,) * 2
    assert_extremes_match(record, eigvalsh(hessian))


def test_probe_of_two_micro_batches_with_accumulation() -> None:
    # With accumulate_grad_batches=2 the first optimizer step sees two micro-batches: both form
    # the probe, whose loss is their mean.
    monitor = CurvatureMonitor(every_n_steps=2, probe_batches=2, **EXACT)
    recorder, _, _ = run_monitor(monitor, max_steps=4, accumulate_grad_batches=2)
    assert [r.step for r in monitor.history] == [2, 4]
    first, second = recorder.batches[:2]
    for record in monitor.history:

        def loss_of(p: dict[str, Tensor]) -> Tensor:
            return 0.5 * (mlp_loss(p, first) + mlp_loss(p, second))

        assert_extremes_match(
            record, eigvalsh(dense_hessian(loss_of, recorder.params[record.step]))
        )


def test_probe_of_two_batches_without_accumulation() -> None:
    monitor = CurvatureMonitor(every_n_steps=2, probe_batches=2, **EXACT)
    recorder, _, _ = run_monitor(monitor, max_steps=2)
    (record,) = monitor.history
    first, second = recorder.batches[:2]
    hessian = dense_hessian(
        lambda p: 0.5 * (mlp_loss(p, first) + mlp_loss(p, second)), recorder.params[2]
    )
    assert_extremes_match(record, eigvalsh(hessian))


def test_eigenvalues_with_batchnorm_and_dropout_in_training_mode() -> None:
    # The probe's forward pass runs in training mode: batch statistics, and a dropout mask
    # drawn from the global RNG as it stands at the check (then restored). The reference
    # replays that forward pass from the same RNG state on a copy of the network.
    model = Net(batchnorm=True, dropout=0.3)
    monitor = CurvatureMonitor(every_n_steps=2, noise_scale=False, **EXACT)
    rng = RngAtCheck()
    recorder = AtChecks(monitor)
    fit(model, [rng, monitor, recorder], max_steps=4)
    assert [r.step for r in monitor.history] == [2, 4]
    network = copy.deepcopy(model.net).train()
    for record in monitor.history:

        def loss_of(p: dict[str, Tensor]) -> Tensor:
            x, y = recorder.batches[0]
            state = {n.removeprefix("net."): v for n, v in p.items()}
            return F.mse_loss(functional_call(network, state, (x,)), y)

        with torch.random.fork_rng():
            torch.set_rng_state(rng.states[record.step])
            hessian = dense_hessian(loss_of, recorder.params[record.step])
        assert hessian.shape == (NUM_PARAMS + 2 * HIDDEN,) * 2
        eigenvalues = eigvalsh(hessian)
        scale = float(np.abs(eigenvalues).max())
        assert record.lambda_max == pytest.approx(eigenvalues[-1], abs=1e-8 * scale)
        assert record.lambda_min == pytest.approx(eigenvalues[0], abs=1e-8 * scale)
        # The mask matters: another one gives another Hessian.
        with torch.random.fork_rng():
            torch.manual_seed(12345)
            other = eigvalsh(dense_hessian(loss_of, recorder.params[record.step]))
        assert abs(other[-1] - eigenvalues[-1]) > 1e-6 * scale


# ------------------------------------------------------------------------ sharpness ratio
def preconditioned_sharpness(hessian: Tensor, inverse_p: Tensor) -> float:
    """``lambda_max(D H)`` for a diagonal ``D``, from the non-symmetric product itself."""
    eigenvalues = np.linalg.eigvals((inverse_p[:, None] * hessian).numpy())
    assert np.abs(eigenvalues.imag).max() <= 1e-8 * np.abs(eigenvalues).max()
    return float(eigenvalues.real.max())


@pytest.mark.parametrize(
    ("optimizer", "lr", "family", "constant"),
    [
        ("sgd", 0.1, "sgd", 2.0),
        ("momentum", 0.05, "heavy_ball", 2.0 * 1.9),
        ("nesterov", 0.05, "nesterov", 2.0 * 1.5 / 2.0),
        ("sgd_groups", 0.1, "sgd", 2.0),
        ("adam", 0.01, "adam", (2.0 + 2.0 * 0.9) / (1.0 - 0.9)),
    ],
)
def test_sharpness_ratio_against_the_optimizer_state(
    optimizer: str, lr: float, family: str, constant: float
) -> None:
    monitor = CurvatureMonitor(every_n_steps=2, **EXACT)
    recorder, _, _ = run_monitor(monitor, Net(optimizer=optimizer, lr=lr), max_steps=4)
    assert [r.step for r in monitor.history] == [2, 4]
    for record in monitor.history:
        params = recorder.params[record.step]
        hessian = dense_hessian(lambda p: mlp_loss(p, recorder.batches[0]), params)
        lambda_max = float(eigvalsh(hessian)[-1])
        if optimizer == "adam":
            state = recorder.state[record.step]
            inverse_p = []
            for name in params:
                step = float(state[name]["step"])
                assert step == record.step
                v_hat = state[name]["exp_avg_sq"] / (1.0 - 0.999**step)
                inverse_p.append((1.0 / (v_hat.sqrt() + 1e-8)).reshape(-1))
            expected = preconditioned_sharpness(hessian, torch.cat(inverse_p).double())
            assert expected > 10 * lambda_max  # the preconditioner matters here
        elif optimizer == "sgd_groups":
            ratios = [1.0 if name.startswith("net.0") else 0.5 for name in params]
            inverse_p = torch.cat(
                [torch.full((params[n].numel(),), r) for n, r in zip(params, ratios, strict=True)]
            ).double()
            expected = preconditioned_sharpness(hessian, inverse_p)
            assert expected < lambda_max - 1e-6
        else:
            expected = lambda_max
        assert record.optimizer_family == family
        assert record.sharpness == pytest.approx(expected, rel=1e-8)
        assert record.stability_threshold == pytest.approx(constant / lr, rel=1e-12)
        assert record.sharpness_ratio == pytest.approx(expected * lr / constant, rel=1e-8)
        assert record.sharpness_ratio == pytest.approx(
            record.sharpness / record.stability_threshold, rel=1e-12
        )


def test_adam_sharpness_over_a_parameter_subset() -> None:
    monitor = CurvatureMonitor(every_n_steps=3, params="net.2", **EXACT)
    recorder, _, _ = run_monitor(monitor, Net(optimizer="adam", lr=0.01), max_steps=3)
    (record,) = monitor.history
    names = ["net.2.weight", "net.2.bias"]
    params, state = recorder.params[3], recorder.state[3]
    hessian = dense_hessian(lambda p: mlp_loss(p, recorder.batches[0]), params, names=names)
    inverse_p = torch.cat(
        [
            (1.0 / ((state[n]["exp_avg_sq"] / (1.0 - 0.999**3)).sqrt() + 1e-8)).reshape(-1)
            for n in names
        ]
    ).double()
    expected = preconditioned_sharpness(hessian, inverse_p)
    assert record.sharpness == pytest.approx(expected, rel=1e-8)
    assert record.sharpness_ratio == pytest.approx(expected * 0.01 / 38.0, rel=1e-8)
    assert_extremes_match(record, eigvalsh(hessian))


def test_sharpness_is_none_for_an_unsupported_optimizer() -> None:
    class RpropNet(Net):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Rprop(self.parameters(), lr=0.01)

    monitor = CurvatureMonitor(every_n_steps=2, max_overhead=None)
    run_monitor(monitor, RpropNet(), max_steps=2)
    (record,) = monitor.history
    assert record.sharpness is None
    assert record.stability_threshold is None
    assert record.sharpness_ratio is None
    assert record.optimizer_family is None
    assert math.isfinite(record.lambda_max)


# -------------------------------------------------------------------- zero observer effect
def final_state(monitor: CurvatureMonitor | None, accumulate: int, logger: Any) -> dict[str, Any]:
    pl_seed_everything(123, verbose=False)
    model = Net(optimizer="adam", lr=0.01, batchnorm=True, dropout=0.3, dtype="float32")
    trainer = fit(
        model,
        [] if monitor is None else [monitor],
        # 16 rows: the noise scale's 8 chunks have 2 rows each, as BatchNorm needs.
        make_loader(num=192, shuffle=True, dtype=torch.float32, batch_size=16),
        max_steps=6,
        accumulate_grad_batches=accumulate,
        logger=logger,
    )
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(legacy=False),  # noqa: NPY002
        "global_step": trainer.global_step,
    }


@pytest.mark.parametrize("accumulate", [1, 2])
def test_zero_observer_effect_bitwise(
    tmp_path: Path, accumulate: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything sets it: undone after
    without = final_state(None, accumulate, TensorBoardLogger(tmp_path, name="without"))
    monitor = CurvatureMonitor(
        every_n_steps=2,
        trace=True,
        trace_hvps=9,
        density=True,
        density_probes=2,
        density_steps=8,
        noise_scale=True,
        max_overhead=None,
    )
    with_monitor = final_state(monitor, accumulate, TensorBoardLogger(tmp_path, name="with"))
    assert [r.step for r in monitor.history] == [2, 4, 6]
    assert all(r.trace is not None and r.noise_scale is not None for r in monitor.history)
    assert monitor.density_estimate is not None
    assert with_monitor["global_step"] == without["global_step"] == 6
    assert without["buffers"]  # BatchNorm statistics, which the probe's forward must not move
    for kind in ("params", "buffers"):
        assert without[kind].keys() == with_monitor[kind].keys()
        for name, value in without[kind].items():
            assert torch.equal(value, with_monitor[kind][name]), (kind, name)
    state, other = without["optimizer"]["state"], with_monitor["optimizer"]["state"]
    assert state.keys() == other.keys()
    for key, fields in state.items():
        for field, value in fields.items():
            assert torch.equal(value, other[key][field]), (key, field)
    assert torch.equal(without["torch_rng"], with_monitor["torch_rng"])
    assert without["python_rng"] == with_monitor["python_rng"]
    assert json.dumps(without["numpy_rng"], default=str) == json.dumps(
        with_monitor["numpy_rng"], default=str
    )


def test_default_noise_scale_on_a_batchnorm_model_with_small_batches() -> None:
    monitor = CurvatureMonitor(every_n_steps=1, max_overhead=None)
    fit(Net(batchnorm=True), [monitor], max_steps=2)
    assert [r.step for r in monitor.history] == [1, 2]


# ------------------------------------------------------------------ the loss that is probed
def read_csv_metrics(logger: CSVLogger) -> dict[str, dict[int, float]]:
    """``{key: {step: value}}`` from metrics.csv; each key at most once per step."""
    metrics: dict[str, dict[int, float]] = defaultdict(dict)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    assert step not in metrics[key], f"{key} logged twice at step {step}"
                    metrics[key][step] = float(value)
    return dict(metrics)


def test_default_loss_is_the_training_step_with_logging_muted(tmp_path: Path) -> None:
    plain = Net(log_metrics=True)
    plain_logger = CSVLogger(tmp_path, name="plain", version=0)
    fit(plain, [], max_steps=6, logger=plain_logger, log_every_n_steps=1)

    model = Net(log_metrics=True)
    logger = CSVLogger(tmp_path, name="monitored", version=0)
    monitor = CurvatureMonitor(every_n_steps=2, noise_scale=True, noise_chunks=4, **EXACT)
    recorder = AtChecks(monitor)
    fit(model, [monitor, recorder], max_steps=6, logger=logger, log_every_n_steps=1)

    assert [r.step for r in monitor.history] == [2, 4, 6]
    assert all(r.noise_scale is not None for r in monitor.history)
    # training_step ran for the checks too (the probe, and 4 noise-scale chunks) ...
    assert model.training_step_calls == 6 + 3 * (1 + 4)
    # ... but only the real training steps logged.
    expected_calls = [(name, s) for s in range(6) for name in ("train_loss", "double_loss")]
    assert model.log_calls == expected_calls
    assert plain.log_calls == expected_calls
    assert "log" not in model.__dict__
    assert "log_dict" not in model.__dict__
    ours, theirs = read_csv_metrics(logger), read_csv_metrics(plain_logger)
    for key in ("train_loss", "double_loss"):
        assert ours[key] == theirs[key]
        assert sorted(ours[key]) == list(range(6))
    assert sorted(ours["optdiag/hessian/lambda_max"]) == [2, 4, 6]
    # It is the training loss that was differentiated.
    for record in monitor.history:
        hessian = dense_hessian(
            lambda p: mlp_loss(p, recorder.batches[0]), recorder.params[record.step]
        )
        assert_extremes_match(record, eigvalsh(hessian))


def quartic_loss(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return ((module(x) - y) ** 4).mean()


def test_loss_fn_override_is_differentiated_instead() -> None:
    model = Net()
    monitor = CurvatureMonitor(every_n_steps=3, loss_fn=quartic_loss, **EXACT)
    recorder, _, _ = run_monitor(monitor, model, max_steps=6)
    assert [r.step for r in monitor.history] == [3, 6]
    assert model.training_step_calls == 6  # the monitor never called training_step
    for record in monitor.history:
        params = recorder.params[record.step]

        def loss_of(p: dict[str, Tensor]) -> Tensor:
            x, y = recorder.batches[0]
            hidden = torch.tanh(F.linear(x, p["net.0.weight"], p["net.0.bias"]))
            return ((F.linear(hidden, p["net.2.weight"], p["net.2.bias"]) - y) ** 4).mean()

        quartic = eigvalsh(dense_hessian(loss_of, params))
        assert_extremes_match(record, quartic)
        assert record.loss == pytest.approx(float(loss_of(params)), rel=1e-12)
        mse = eigvalsh(dense_hessian(lambda p: mlp_loss(p, recorder.batches[0]), params))
        assert abs(mse[-1] - quartic[-1]) > 1e-3 * abs(quartic[-1])


def test_training_step_without_a_loss_tensor_is_reported() -> None:
    class NoLoss(Net):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            return {"loss": loss, "other": 1} if self.training_step_calls <= 2 else {"x": 1}

    # The real steps return the loss only in the first two calls; Lightning would skip the
    # rest. The monitor's probe (the third call) finds no loss and says what to do.
    monitor = CurvatureMonitor(every_n_steps=2, max_overhead=None)
    with pytest.raises(TypeError, match="loss_fn"):
        fit(NoLoss(), [monitor], max_steps=4)


# ---------------------------------------------------------------------- manual optimization
def test_manual_optimization_without_loss_fn_is_rejected_at_fit_start() -> None:
    model = Net(manual=True)
    with pytest.raises(ValueError, match="loss_fn") as info:
        fit(model, [CurvatureMonitor(every_n_steps=1)], max_steps=2)
    assert "manual optimization" in str(info.value)
    assert model.training_step_calls == 0


def test_manual_optimization_with_loss_fn() -> None:
    model = Net(manual=True)
    monitor = CurvatureMonitor(
        every_n_steps=2, loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]), **EXACT
    )
    recorder, _, _ = run_monitor(monitor, model, max_steps=4)
    assert [r.step for r in monitor.history] == [2, 4]
    assert model.training_step_calls == 4
    for record in monitor.history:
        hessian = dense_hessian(
            lambda p: mlp_loss(p, recorder.batches[0]), recorder.params[record.step]
        )
        assert_extremes_match(record, eigvalsh(hessian))
        assert record.optimizer_family == "sgd"


def test_optimizer_index_beyond_the_optimizers_is_rejected_at_fit_start() -> None:
    with pytest.raises(ValueError, match="optimizer_index: 1"):
        fit(Net(), [CurvatureMonitor(optimizer_index=1)], max_steps=1)


# ------------------------------------------------------------------------------ overhead
class StepTimer(Callback):
    """Wall time of the training batches (start to end of each batch, checks excluded), and
    its running total after every optimizer step."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.total_at_step: dict[int, float] = {}
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self.seconds += time.perf_counter() - self._start
        self.total_at_step[trainer.global_step] = self.seconds


def slow_loss(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    time.sleep(0.03)
    return F.mse_loss(module(batch[0]), batch[1])


@pytest.mark.slow
def test_max_overhead_defers_checks_to_stay_within_the_budget() -> None:
    steps, budget = 80, 0.25
    monitor = CurvatureMonitor(
        every_n_steps=1,
        loss_fn=slow_loss,
        noise_scale=False,
        max_hvps=4,
        noise_chunks=2,
        max_overhead=budget,
    )
    timer = StepTimer()
    # Training steps of about 10 ms against checks of about 30 ms: a check at every step
    # would cost 300% overhead; the budget allows one every ~12 steps.
    fit(Net(step_sleep=0.01), [timer, monitor], make_loader(num=8 * steps), max_steps=steps)
    checks = [r.step for r in monitor.history]
    assert 2 <= len(checks) <= steps // 5, checks
    assert checks[0] > monitor.every_n_steps  # even the first check waits for its budget
    # Up to every check, the checks took about max_overhead of the training time so far.
    spent = 0.0
    for record in monitor.history:
        spent += record.seconds
        share = spent / timer.total_at_step[record.step]
        assert share < 1.5 * budget, (share, checks)
    share = spent / timer.seconds
    assert budget / 3 < share < 1.5 * budget, (share, checks)
    # Compared with no budget: a check at every step, at several times the training time.
    unlimited = CurvatureMonitor(
        every_n_steps=1, loss_fn=slow_loss, noise_scale=False, max_hvps=4, max_overhead=None
    )
    timer = StepTimer()
    fit(Net(step_sleep=0.01), [timer, unlimited], max_steps=8)
    assert [r.step for r in unlimited.history] == list(range(1, 9))
    assert sum(r.seconds for r in unlimited.history) > 1.5 * timer.seconds


def test_max_overhead_none_keeps_every_n_steps() -> None:
    monitor = CurvatureMonitor(
        every_n_steps=3, loss_fn=slow_loss, noise_scale=False, max_overhead=None
    )
    fit(Net(), [monitor], max_steps=12)
    assert [r.step for r in monitor.history] == [3, 6, 9, 12]
    assert monitor.interval == 3


# ------------------------------------------------------------------------------ warm start
def test_warm_start_flags_follow_cold_start_every_and_save_products() -> None:
    monitor = CurvatureMonitor(
        every_n_steps=1, tol=1e-3, max_hvps=NUM_PARAMS, max_overhead=None, cold_start_every=3
    )
    recorder, _, _ = run_monitor(monitor, Net(lr=0.002), max_steps=9)
    flags = [r.warm_start for r in monitor.history]
    assert flags == [False, True, True] * 3
    cold = [r.num_hvps for r in monitor.history if not r.warm_start]
    warm = [r.num_hvps for r in monitor.history if r.warm_start]
    assert np.mean(warm) <= np.mean(cold), (cold, warm)
    # Warm starts keep the accuracy.
    for record in monitor.history:
        assert record.converged
        eigenvalues = eigvalsh(
            dense_hessian(lambda p: mlp_loss(p, recorder.batches[0]), recorder.params[record.step])
        )
        radius = float(np.abs(eigenvalues).max())
        assert abs(record.lambda_max - eigenvalues[-1]) <= 2e-3 * radius
        assert abs(record.lambda_min - eigenvalues[0]) <= 2e-3 * radius


def test_cold_start_every_one_never_warm_starts() -> None:
    monitor = CurvatureMonitor(every_n_steps=1, max_overhead=None, cold_start_every=1)
    run_monitor(monitor, max_steps=4)
    assert [r.warm_start for r in monitor.history] == [False] * 4


# -------------------------------------------------------------------------------- logging
KEYS = ("lambda_max", "lambda_min", "sharpness_ratio", "stability_threshold", "trace")


def test_csv_logger_gets_the_curvature_at_the_check_steps(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv", version=0)
    monitor = CurvatureMonitor(every_n_steps=2, trace=True, trace_hvps=9, max_overhead=None)
    fit(Net(optimizer="momentum", lr=0.05), [monitor], max_steps=6, logger=logger)
    metrics = read_csv_metrics(logger)
    for key in (*KEYS, "noise_scale", "sharpness", "num_hvps"):
        values = metrics[f"optdiag/hessian/{key}"]
        assert sorted(values) == [2, 4, 6], key
        for record in monitor.history:
            expected = getattr(record, key)
            assert values[record.step] == pytest.approx(expected, rel=1e-6), key


def test_trace_is_not_logged_without_trace(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv", version=0)
    monitor = CurvatureMonitor(every_n_steps=2, max_overhead=None)
    fit(Net(), [monitor], max_steps=4, logger=logger)
    metrics = read_csv_metrics(logger)
    assert "optdiag/hessian/trace" not in metrics
    assert sorted(metrics["optdiag/hessian/lambda_max"]) == [2, 4]
    assert all(r.trace is None for r in monitor.history)


def test_tensorboard_scalars_and_density_histogram(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    monitor = CurvatureMonitor(
        every_n_steps=2,
        trace=True,
        trace_hvps=9,
        density=True,
        density_probes=2,
        density_steps=10,
        max_overhead=None,
    )
    fit(Net(), [monitor], max_steps=6, logger=logger)
    logger.experiment.flush()
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    for key in (*KEYS, "noise_scale"):
        events = accumulator.Scalars(f"optdiag/hessian/{key}")
        assert [e.step for e in events] == [2, 4, 6], key
        for event, record in zip(events, monitor.history, strict=True):
            assert event.value == pytest.approx(getattr(record, key), rel=1e-6), key
    assert "optdiag/hessian/density" in tags["histograms"]
    histograms = accumulator.Histograms("optdiag/hessian/density")
    assert [h.step for h in histograms] == [2, 4, 6]
    last = histograms[-1].histogram_value
    assert last.num == NUM_PARAMS
    assert sum(last.bucket) == pytest.approx(NUM_PARAMS, rel=0.05)
    # The density spans the spectrum found by Lanczos.
    record = monitor.history[-1]
    span = record.lambda_max - record.lambda_min
    assert last.min <= record.lambda_min + 0.05 * span
    assert last.max >= record.lambda_max - 0.05 * span


def test_density_without_a_logger() -> None:
    monitor = CurvatureMonitor(every_n_steps=1, density=True, density_steps=5, max_overhead=None)
    fit(Net(), [monitor], max_steps=2)
    assert [r.step for r in monitor.history] == [1, 2]
    assert monitor.density_estimate is not None
    assert monitor.density_estimate.size == NUM_PARAMS


# ---------------------------------------------------------------------------- noise scale
class LinearRegression(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.layer = nn.Linear(3, 1).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x).squeeze(-1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def regression_loader(num: int = 64, batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(num, 3, generator=generator, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.7
    y = y + 0.5 * torch.randn(num, generator=generator, dtype=torch.float64)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def mean_example_gradient(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Gradient of the mean squared error, as the mean of closed-form per-example gradients
    ``2 r_i (x_i, 1)`` with residual ``r_i = w . x_i + b - y_i``."""
    residual = x @ weight.reshape(-1) + bias - y
    per_example = 2.0 * residual[:, None] * torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    return per_example.mean(dim=0)


def chunk_estimate(
    weight: Tensor, bias: Tensor, batch: tuple[Tensor, Tensor], count: int
) -> tuple[float, float, int]:
    """``(mean |g_chunk|^2, |mean g_chunk|^2, chunk size)`` over ``count`` equal chunks of
    ``batch`` (leftover rows dropped), from the closed-form gradients."""
    x, y = batch
    size = x.shape[0] // count
    grads = [
        mean_example_gradient(
            weight, bias, x[j * size : (j + 1) * size], y[j * size : (j + 1) * size]
        )
        for j in range(count)
    ]
    small = float(np.mean([float(g @ g) for g in grads]))
    mean = torch.stack(grads).mean(dim=0)
    return small, float(mean @ mean), size


class NoiseReference:
    """McCandlish et al. (2018), appendix A.1, at batch sizes ``b`` and ``B``, each term
    smoothed by a bias-corrected exponential moving average (decay 0.9)."""

    def __init__(self) -> None:
        self.gradient_sq = self.noise_trace = self.weight = 0.0

    def update(self, small: float, b: float, big: float, big_b: float) -> float:
        g2 = (big_b * big - b * small) / (big_b - b)
        trace = (small - big) / (1 / b - 1 / big_b)
        self.gradient_sq = 0.9 * self.gradient_sq + 0.1 * g2
        self.noise_trace = 0.9 * self.noise_trace + 0.1 * trace
        self.weight = 0.9 * self.weight + 0.1
        return max(self.noise_trace / self.weight, 0.0) / (self.gradient_sq / self.weight)


@pytest.mark.parametrize(("with_loss_fn", "batch_size"), [(False, 8), (True, 8), (False, 10)])
def test_noise_scale_equals_the_estimator_on_closed_form_gradients(
    with_loss_fn: bool, batch_size: int
) -> None:
    # At each check the current training batch is cut into noise_chunks equal chunks (rows
    # that do not fill a chunk are dropped): the chunks' gradients against their mean.
    loss_fn = (lambda m, b: F.mse_loss(m(b[0]), b[1])) if with_loss_fn else None
    monitor = CurvatureMonitor(every_n_steps=1, loss_fn=loss_fn, noise_chunks=4, max_overhead=None)
    recorder = AtChecks(monitor)
    loader = regression_loader(batch_size=batch_size)
    fit(LinearRegression(), [monitor, recorder], loader, max_steps=4)
    assert [r.step for r in monitor.history] == [1, 2, 3, 4]
    reference = NoiseReference()
    batches = set()
    for record in monitor.history:
        params = recorder.params[record.step]
        w, b = params["layer.weight"], params["layer.bias"]
        batch = recorder.check_batches[record.step]
        batches.add(float(batch[0].sum()))
        small, big, size = chunk_estimate(w, b, batch, count=4)
        assert size == 2
        expected = reference.update(small, size, big, 4 * size)
        assert record.noise_scale == pytest.approx(expected, rel=1e-9)
        assert record.noise_to_signal == pytest.approx(expected / (4 * size), rel=1e-9)
        # The curvature itself stays on the fixed probe (the first batch).
        x, y = recorder.batches[0]
        full = mean_example_gradient(w, b, x, y)
        assert record.grad_norm == pytest.approx(float(full.norm()), rel=1e-10)
    assert len(batches) == 4  # a fresh batch at every check
    assert monitor.noise is not None
    assert monitor.noise.measurements == 4
    assert monitor.noise.batch_size == 8
    assert monitor.noise.simple_noise_scale == pytest.approx(
        monitor.history[-1].noise_scale, rel=1e-12
    )


def test_noise_scale_is_skipped_when_the_batch_has_fewer_rows_than_chunks() -> None:
    monitor = CurvatureMonitor(every_n_steps=1, noise_chunks=4, max_overhead=None)
    fit(LinearRegression(), [monitor], regression_loader(num=21, batch_size=3), max_steps=2)
    assert [r.step for r in monitor.history] == [1, 2]
    assert all(r.noise_scale is None and r.noise_to_signal is None for r in monitor.history)
    assert monitor.noise is None


def test_noise_scale_false_measures_nothing() -> None:
    monitor = CurvatureMonitor(every_n_steps=1, noise_scale=False, max_overhead=None)
    model = Net()
    fit(model, [monitor], max_steps=2)
    assert all(r.noise_scale is None for r in monitor.history)
    assert model.training_step_calls == 2 + 2  # one probe loss per check, no halves


# ---------------------------------------------------------------------------- checkpoints
def six_step_checkpoint(path: Path) -> CurvatureMonitor:
    first = CurvatureMonitor(**RESUME_ARGS)
    trainer = fit(Net(), [first], make_loader(num=160), max_steps=6)
    assert [r.step for r in first.history] == [2, 4, 6]
    trainer.save_checkpoint(path)
    return first


RESUME_ARGS: dict[str, Any] = {"every_n_steps": 2, "max_overhead": None, "cold_start_every": 10}


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before")
def test_checkpoint_resume_restores_the_history(tmp_path: Path) -> None:
    path = tmp_path / "six.ckpt"
    first = six_step_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if "CurvatureMonitor" in k]
    assert len(state["history"]) == 3

    second = CurvatureMonitor(**RESUME_ARGS)
    fit(Net(), [second], make_loader(num=160), max_steps=10, ckpt_path=path)
    assert len(second.history) >= 3
    for restored, original in zip(second.history[:3], first.history, strict=False):
        assert asdict(restored) == asdict(original)
    assert second.noise is not None
    assert second.noise.measurements >= 3


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before")
def test_checks_continue_after_a_checkpoint_resume(tmp_path: Path) -> None:
    path = tmp_path / "six.ckpt"
    six_step_checkpoint(path)
    second = CurvatureMonitor(**RESUME_ARGS)
    recorder = AtChecks(second)
    fit(Net(), [second, recorder], make_loader(num=160), max_steps=10, ckpt_path=path)
    assert [r.step for r in second.history] == [2, 4, 6, 8, 10]
    for record in second.history[3:]:
        hessian = dense_hessian(
            lambda p: mlp_loss(p, recorder.batches[0]), recorder.params[record.step]
        )
        eigenvalues = eigvalsh(hessian)
        assert abs(record.lambda_max - eigenvalues[-1]) <= 1e-2 * abs(eigenvalues).max()


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before")
def test_checkpoint_resume_restores_a_deferred_schedule(tmp_path: Path) -> None:
    def very_slow_loss(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        time.sleep(0.05)
        return F.mse_loss(module(batch[0]), batch[1])

    args: dict[str, Any] = {
        "every_n_steps": 1,
        "loss_fn": very_slow_loss,
        "noise_scale": False,
        "max_hvps": 2,
        "noise_chunks": 2,
        "max_overhead": 0.1,
    }
    first = CurvatureMonitor(**args)
    # The first check (predicted at the cost of about six steps) waits for ~60 steps of
    # training, the next (predicted at its measured 50 ms, far more than a step) much longer.
    trainer = fit(Net(), [first], make_loader(num=8 * 70), max_steps=70)
    assert len(first.history) == 1
    assert first.interval > 10
    trainer.save_checkpoint(tmp_path / "resume.ckpt")

    class ScheduleAtStart(Callback):
        def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            self.interval = second.interval
            self.history = list(second.history)

    second = CurvatureMonitor(**args)
    probe = ScheduleAtStart()
    path = tmp_path / "resume.ckpt"
    fit(Net(), [second, probe], make_loader(num=8 * 70), max_steps=71, ckpt_path=path)
    assert probe.interval == first.interval
    assert [asdict(r) for r in probe.history] == [asdict(r) for r in first.history]


def test_two_monitors_keep_their_own_state_through_a_checkpoint(tmp_path: Path) -> None:
    def pair() -> list[CurvatureMonitor]:
        return [
            CurvatureMonitor(every_n_steps=2, params=name, max_overhead=None)
            for name in ("net.0", "net.2")
        ]

    first = pair()
    trainer = fit(Net(), list(first), max_steps=4)
    assert first[0].history[0].lambda_max != first[1].history[0].lambda_max
    trainer.save_checkpoint(tmp_path / "four.ckpt")
    second = pair()
    fit(Net(), list(second), max_steps=4, ckpt_path=tmp_path / "four.ckpt")
    for restored, original in zip(second, first, strict=True):
        assert [asdict(r) for r in restored.history] == [asdict(r) for r in original.history]


def test_first_check_after_load_state_dict_is_reported_cold() -> None:
    first = CurvatureMonitor(**RESUME_ARGS)
    fit(Net(), [first], max_steps=2)
    assert [r.warm_start for r in first.history] == [False]
    second = CurvatureMonitor(**RESUME_ARGS)
    second.load_state_dict(first.state_dict())  # no Ritz vectors: the next run starts cold
    fit(Net(), [second], max_steps=4)
    assert [r.step for r in second.history] == [2, 4]
    assert second.history[-1].warm_start is False


def test_state_dict_round_trip() -> None:
    monitor = CurvatureMonitor(every_n_steps=1, max_overhead=None)
    fit(Net(), [monitor], max_steps=3)
    state = monitor.state_dict()
    restored = CurvatureMonitor(every_n_steps=1, max_overhead=None)
    restored.load_state_dict(copy.deepcopy(state))
    assert restored.state_dict() == state
    assert restored.history == monitor.history
    assert restored.interval == monitor.interval
    assert restored.latest == monitor.latest
    assert restored.noise == monitor.noise


def test_train_steps_count_optimizer_steps_with_accumulation() -> None:
    monitor = CurvatureMonitor(every_n_steps=100, max_overhead=None)
    fit(Net(), [monitor], max_steps=4, accumulate_grad_batches=2)
    assert monitor.state_dict()["train_steps"] == 4


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"every_n_steps": 0}, ValueError, ["every_n_steps", "0"]),
        ({"every_n_steps": -2}, ValueError, ["every_n_steps", "-2"]),
        ({"every_n_steps": 1.5}, TypeError, ["every_n_steps", "1.5"]),
        ({"every_n_steps": True}, TypeError, ["every_n_steps", "True"]),
        ({"probe_batches": 0}, ValueError, ["probe_batches", "0"]),
        ({"probe_batches": "1"}, TypeError, ["probe_batches", "'1'"]),
        ({"k": 0}, ValueError, ["k: 0"]),
        ({"k": 2.0}, TypeError, ["k: 2.0"]),
        ({"tol": -1}, ValueError, ["tol", "-1"]),
        ({"tol": math.nan}, ValueError, ["tol", "nan"]),
        ({"tol": math.inf}, ValueError, ["tol", "inf"]),
        ({"tol": "0.1"}, TypeError, ["tol", "'0.1'"]),
        ({"max_hvps": 1}, ValueError, ["max_hvps", "1"]),
        ({"max_hvps": 3, "k": 4}, ValueError, ["max_hvps", "3"]),
        ({"max_hvps": 10.0}, TypeError, ["max_hvps", "10.0"]),
        ({"trace": "yes"}, TypeError, ["trace", "'yes'"]),
        ({"trace": 1}, TypeError, ["trace", "1"]),
        ({"density": None}, TypeError, ["density", "None"]),
        ({"noise_scale": "false"}, TypeError, ["noise_scale", "'false'"]),
        ({"noise_chunks": 1}, ValueError, ["noise_chunks", "1"]),
        ({"noise_chunks": 2.5}, TypeError, ["noise_chunks", "2.5"]),
        ({"trace_hvps": 5}, ValueError, ["trace_hvps", "5"]),
        ({"density_probes": 0}, ValueError, ["density_probes", "0"]),
        ({"density_steps": 1}, ValueError, ["density_steps", "1"]),
        ({"loss_fn": 3}, TypeError, ["loss_fn", "3"]),
        ({"loss_fn": "mse"}, TypeError, ["loss_fn", "'mse'"]),
        ({"params": 5}, TypeError, ["params", "5"]),
        ({"params": ["net.0"]}, TypeError, ["params", "['net.0']"]),
        ({"max_overhead": 1.5}, ValueError, ["max_overhead", "1.5"]),
        ({"max_overhead": 1.0}, ValueError, ["max_overhead", "1.0"]),
        ({"max_overhead": 0}, ValueError, ["max_overhead", "0"]),
        ({"max_overhead": -0.1}, ValueError, ["max_overhead", "-0.1"]),
        ({"max_overhead": math.nan}, ValueError, ["max_overhead", "nan"]),
        ({"max_overhead": "0.1"}, TypeError, ["max_overhead", "'0.1'"]),
        ({"max_overhead": True}, TypeError, ["max_overhead", "True"]),
        ({"cold_start_every": 0}, ValueError, ["cold_start_every", "0"]),
        ({"optimizer_index": -1}, ValueError, ["optimizer_index", "-1"]),
        ({"seed": 1.5}, TypeError, ["seed", "1.5"]),
        ({"seed": None}, TypeError, ["seed", "None"]),
    ],
)
def test_invalid_arguments_are_rejected(
    kwargs: dict[str, Any], error: type[Exception], words: list[str]
) -> None:
    assert_rejected(CurvatureMonitor, kwargs, error, words)


def test_boundary_arguments_are_accepted() -> None:
    monitor = CurvatureMonitor(
        every_n_steps=1,
        probe_batches=1,
        k=2,
        tol=0,
        max_hvps=2,
        trace_hvps=6,
        density_probes=1,
        density_steps=2,
        noise_chunks=2,
        max_overhead=None,
        cold_start_every=1,
        optimizer_index=0,
        seed=0,
    )
    assert (monitor.tol, monitor.max_overhead, monitor.max_hvps) == (0.0, None, 2)
    assert isinstance(monitor.tol, float)
    assert CurvatureMonitor(max_overhead=0.999).max_overhead == 0.999
    assert monitor.latest is None
    assert monitor.interval == 1
    assert monitor.noise is None


def test_measure_before_the_probe_is_known_returns_none() -> None:
    monitor = CurvatureMonitor()
    trainer = Trainer(**QUIET)
    assert monitor.measure(trainer, Net()) is None
    assert monitor.history == []


# -------------------------------------------------------------------------------------- CLI
@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")
def test_lightning_cli_configures_and_runs_the_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["cli"])  # only ``args`` count, not pytest's arguments
    cli = LightningCLI(
        Net,
        DataModule,
        args=[
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.max_steps=6",
            "--trainer.callbacks+=lightning_optdiag.callbacks.CurvatureMonitor",
            "--trainer.callbacks.every_n_steps=3",
            "--trainer.callbacks.k=2",
            "--trainer.callbacks.tol=0.001",
            "--trainer.callbacks.trace=true",
            "--trainer.callbacks.params=net.0",
            "--trainer.callbacks.max_overhead=null",
        ],
        run=False,
        save_config_callback=None,
        seed_everything_default=False,
    )
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, CurvatureMonitor)]
    assert (monitor.every_n_steps, monitor.k, monitor.tol) == (3, 2, 0.001)
    assert (monitor.trace, monitor.params, monitor.max_overhead) == (True, "net.0", None)
    assert monitor.cold_start_every == CurvatureMonitor().cold_start_every  # untouched default
    cli.trainer.fit(cli.model, cli.datamodule)
    assert [r.step for r in monitor.history] == [3, 6]
    assert all(len(r.top_k) == 2 and r.trace is not None for r in monitor.history)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")
def test_lightning_cli_fit_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["cli"])
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  accelerator: cpu\n"
        "  devices: 1\n"
        "  max_steps: 4\n"
        "  logger: false\n"
        "  enable_progress_bar: false\n"
        "  enable_checkpointing: false\n"
        "  enable_model_summary: false\n"
        f"  default_root_dir: {tmp_path}\n"
        "  callbacks:\n"
        "    - class_path: lightning_optdiag.callbacks.CurvatureMonitor\n"
        "      init_args:\n"
        "        every_n_steps: 2\n"
        "        noise_scale: false\n"
        "        max_overhead: null\n"
        "model:\n"
        "  optimizer: adam\n"
        "  lr: 0.01\n"
    )
    cli = LightningCLI(
        Net,
        DataModule,
        args=["fit", "--config", str(config)],
        seed_everything_default=False,
        save_config_kwargs={"overwrite": True},
    )
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, CurvatureMonitor)]
    assert cli.trainer.global_step == 4
    assert [r.step for r in monitor.history] == [2, 4]
    assert all(r.optimizer_family == "adam" for r in monitor.history)
    assert all(r.noise_scale is None for r in monitor.history)


# ------------------------------------------------------------------------------------- DDP
class DdpDump(Callback):
    """Placed after the monitor: each rank writes its first batch, its parameters after every
    check and the monitor's history."""

    def __init__(self, monitor: CurvatureMonitor, out_dir: str) -> None:
        self.monitor = monitor
        self.out_dir = out_dir
        self.first_batch: tuple[Tensor, Tensor] | None = None
        self.current: tuple[Tensor, Tensor] | None = None
        self.check_batches: dict[int, tuple[Tensor, Tensor]] = {}
        self.params: dict[int, dict[str, Tensor]] = {}

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.current = (batch[0].detach().clone(), batch[1].detach().clone())
        if self.first_batch is None:
            self.first_batch = self.current

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        latest = self.monitor.latest
        if latest is not None and latest.step == trainer.global_step:
            self.params.setdefault(
                latest.step, {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            )
            assert self.current is not None
            self.check_batches.setdefault(latest.step, self.current)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        record = {
            "first_batch": self.first_batch,
            "params": self.params,
            "check_batches": self.check_batches,
            "history": [asdict(r) for r in self.monitor.history],
            "interval": self.monitor.interval,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
        }
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


DDP_CHUNKS = 4


def run_ddp_scenario(out_dir: str) -> None:
    """Entry point of the subprocess: two CPU processes, different data on each."""
    torch.set_num_threads(1)
    monitor = CurvatureMonitor(
        every_n_steps=2,
        k=2,
        tol=0.0,
        max_hvps=NUM_PARAMS,
        noise_chunks=DDP_CHUNKS,
        max_overhead=None,
    )
    trainer = Trainer(
        callbacks=[monitor, DdpDump(monitor, out_dir)],
        **{**QUIET, "devices": 2, "strategy": "ddp_spawn", "max_steps": 6},
    )
    trainer.fit(Net(), make_loader(num=128))


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_eigenvalues_are_those_of_the_global_probe(tmp_path: Path) -> None:
    run_scenario(
        "tests.callbacks.test_curvature_monitor",
        tmp_path,
        timeout=120,
        hang="the ranks' checks fell out of lock-step?",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [6, 6]
    # Different data on each rank ...
    assert not torch.equal(ranks[0]["first_batch"][0], ranks[1]["first_batch"][0])
    # ... the same checks on both ...
    steps = [[h["step"] for h in r["history"]] for r in ranks]
    assert steps == [[2, 4, 6], [2, 4, 6]]
    assert ranks[0]["interval"] == ranks[1]["interval"]
    batches = [r["first_batch"] for r in ranks]
    noise = NoiseReference()
    for index, step in enumerate(steps[0]):
        params = ranks[0]["params"][step]
        for name, value in params.items():
            assert torch.equal(value, ranks[1]["params"][step][name])

        def global_loss(p: dict[str, Tensor]) -> Tensor:
            return 0.5 * (mlp_loss(p, batches[0]) + mlp_loss(p, batches[1]))

        # ... measuring the Hessian of the loss averaged over both ranks' probes.
        eigenvalues = eigvalsh(dense_hessian(global_loss, params))
        local = eigvalsh(dense_hessian(lambda p: mlp_loss(p, batches[0]), params))
        assert abs(local[-1] - eigenvalues[-1]) > 1e-6 * abs(eigenvalues[-1])
        for rank in ranks:
            record = CurvatureRecord(**rank["history"][index])
            assert_extremes_match(record, eigenvalues, k=2)
        # The probe gradient is local to each rank.
        g0, g1 = (mlp_gradient(params, batch) for batch in batches)
        assert ranks[0]["history"][index]["grad_norm"] == pytest.approx(float(g0.norm()), rel=1e-9)
        assert ranks[1]["history"][index]["grad_norm"] == pytest.approx(float(g1.norm()), rel=1e-9)
        # The noise scale: every rank's chunks of its current batch against their mean over
        # chunks and ranks, the same on both ranks.
        squares, means = [], []
        for rank in ranks:
            x, y = rank["check_batches"][step]
            size = x.shape[0] // DDP_CHUNKS
            chunk_grads = [
                mlp_gradient(params, (x[j * size : (j + 1) * size], y[j * size : (j + 1) * size]))
                for j in range(DDP_CHUNKS)
            ]
            squares.append(np.mean([float(g @ g) for g in chunk_grads]))
            means.append(torch.stack(chunk_grads).mean(dim=0))
        mean = torch.stack(means).mean(dim=0)
        expected = noise.update(
            float(np.mean(squares)), size, float(mean @ mean), 2 * DDP_CHUNKS * size
        )
        for rank in ranks:
            assert rank["history"][index]["noise_scale"] == pytest.approx(expected, rel=1e-7)
    for rank in ranks:
        assert all(h["noise_scale"] is not None for h in rank["history"])


class PoisonWeights(Callback):
    """Sets one weight to NaN after optimizer step ``at``: every later loss is NaN."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = math.nan


def test_checks_at_a_non_finite_loss_are_skipped_with_one_warning() -> None:
    monitor = CurvatureMonitor(every_n_steps=1, **EXACT)
    # The poison comes after the monitor's own hook at step 3, so step 3 is measured.
    with pytest.warns(UserWarning, match="loss is not finite at step 4") as caught:
        trainer = fit(Net(), [monitor, PoisonWeights(at=3)], max_steps=6)
    assert trainer.global_step == 6
    assert [record.step for record in monitor.history] == [1, 2, 3]
    assert all(math.isfinite(record.lambda_max) for record in monitor.history)
    assert monitor.skipped_checks == 3  # steps 4, 5, 6
    assert sum("CurvatureMonitor" in str(w.message) for w in caught) == 1


class _MetricsSink:
    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((dict(metrics), step))


@pytest.mark.parametrize(("noise_scale", "logged"), [(math.inf, False), (123.0, True)])
def test_an_infinite_noise_scale_is_recorded_but_not_logged(
    noise_scale: float, logged: bool
) -> None:
    record = CurvatureRecord(
        step=7,
        lambda_max=2.0,
        lambda_min=-0.1,
        top_k=[2.0],
        bottom_k=[-0.1],
        residual_max=0.0,
        residual_min=0.0,
        converged=True,
        loss=1.0,
        grad_norm=0.5,
        noise_scale=noise_scale,
    )
    sink = _MetricsSink()
    trainer = SimpleNamespace(is_global_zero=True, loggers=[sink])
    CurvatureMonitor()._log(trainer, record)  # type: ignore[arg-type]
    ((metrics, step),) = sink.logged
    assert step == 7
    assert metrics["optdiag/hessian/lambda_max"] == 2.0
    assert ("optdiag/hessian/noise_scale" in metrics) is logged
    assert all(math.isfinite(value) for value in metrics.values())


def test_a_run_too_short_for_a_check_says_so(caplog: pytest.LogCaptureFixture) -> None:
    monitor = CurvatureMonitor(every_n_steps=100, max_overhead=None)
    with caplog.at_level("INFO"):
        fit(Net(), [monitor], max_steps=6)
    assert monitor.history == []
    (message,) = [r.getMessage() for r in caplog.records if "CurvatureMonitor" in r.getMessage()]
    assert message == (
        "CurvatureMonitor: no curvature check in 6 steps: the first check is due at step 100 "
        "(every_n_steps)"
    )


def test_a_run_with_checks_says_nothing_more(caplog: pytest.LogCaptureFixture) -> None:
    monitor = CurvatureMonitor(every_n_steps=2, max_overhead=None)
    with caplog.at_level("INFO"):
        fit(Net(), [monitor], max_steps=6)
    assert len(monitor.history) == 3
    assert not [r for r in caplog.records if "CurvatureMonitor" in r.getMessage()]
