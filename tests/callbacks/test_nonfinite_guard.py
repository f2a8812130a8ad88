"""NonFiniteGuard on real Lightning runs with NaN/inf injected at known steps.

Every scenario plants its fault deterministically (a NaN input element, an ``inf`` forward output,
an infinite gradient through a custom autograd Function, a NaN constant added to the loss, a
corrupted parameter or Adam moment) at a known batch, and checks what the guard recorded against
an independent reference: a recorder callback placed before the guard that snapshots parameters,
optimizer state and gradient finiteness with plain ``torch.isfinite``, a pure-PyTorch training
loop, or a second run of the same seeded scenario.
"""

from __future__ import annotations

import copy
import io
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optdiag.callbacks import (
    GradientMonitor,
    NonFiniteError,
    NonFiniteEvent,
    NonFiniteGuard,
)
from tests.callbacks.conftest import assert_rejected
from tests.ddp import run_scenario

REPO_ROOT = Path(__file__).resolve().parents[2]
BATCH_SIZE = 4
QUIET: dict[str, Any] = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "accelerator": "cpu",
    "num_sanity_val_steps": 0,
}
PARAM_NAMES = [
    "net.0.weight",
    "net.0.bias",
    "net.1.weight",
    "net.1.bias",
    "net.5.weight",
    "net.5.bias",
]

Snapshot = dict[str, Tensor]


# ---------------------------------------------------------------------------------- the model
class _InfGrad(torch.autograd.Function):
    """Identity forward; the backward returns +inf everywhere (a finite loss, infinite grads)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return torch.full_like(grad, math.inf)


class Fault(nn.Module):
    """Identity, except that while ``active`` its output holds an ``inf``."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        out = x.clone()
        out[0, 0] = math.inf
        return out


class Toy(LightningModule):
    """Linear -> BatchNorm -> Fault -> ReLU -> Dropout -> Linear, with faults at chosen batches.

    Fault kinds: ``"input"`` (a NaN input element: every forward output after it is NaN),
    ``"forward"`` (``net.2`` outputs inf: ``net.0``/``net.1`` stay finite), ``"backward"``
    (finite forward and loss, +inf gradient on ``net.5.bias`` only), ``"nan_constant"`` (NaN
    added to the loss: the gradients stay finite), ``"huge"`` (the loss times 1e30: finite in
    float32, overflows float16 gradients).
    """

    def __init__(
        self,
        faults: dict[int, str] | None = None,
        fault_every: str | None = None,
        fault_rank: int | None = None,
        optimizer: str = "sgd",
        lr: float = 0.05,
        dropout: float = 0.0,
        log_metrics: bool = False,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 8),
            nn.BatchNorm1d(8),
            Fault(),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(8, 1),
        )
        self.faults = dict(faults or {})
        self.fault_every = fault_every
        self.fault_rank = fault_rank
        self.optimizer_name = optimizer
        self.lr = lr
        self.log_metrics = log_metrics
        self.log_calls = 0

    def log(self, *args: Any, **kwargs: Any) -> None:  # counts the real (unmuted) calls
        self.log_calls += 1
        super().log(*args, **kwargs)

    def fault_at(self, batch_idx: int) -> str | None:
        if self.fault_rank is not None and self.global_rank != self.fault_rank:
            return None
        if self.fault_every is not None:
            return self.fault_every
        return self.faults.get(batch_idx)

    def compute_loss(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        fault = self.fault_at(batch_idx)
        if fault == "input":
            x = x.clone()
            x[0, 0] = math.nan
        self.net[2].active = fault == "forward"
        try:
            out = self.net(x)
        finally:
            self.net[2].active = False
        loss = F.mse_loss(out.float(), y)
        if fault == "backward":
            loss = loss + (_InfGrad.apply(self.net[5].bias) * 0).sum()
        elif fault == "nan_constant":
            loss = loss + math.nan
        elif fault == "huge":
            loss = loss * 1e30
        if self.log_metrics:
            self.log("train_loss", loss)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.compute_loss(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ManualToy(Toy):
    """The same model trained with manual optimization."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = self.compute_loss(batch, batch_idx)
        self.manual_backward(loss)
        optimizer.step()


def make_model(cls: type[Toy] = Toy, seed: int = 0, **kwargs: Any) -> Toy:
    torch.manual_seed(seed)
    return cls(**kwargs)


def make_loader(batches: int) -> DataLoader:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(batches * BATCH_SIZE, 4, generator=generator)
    y = x[:, :1] - 0.5 * x[:, 1:2] + 0.1 * torch.randn(batches * BATCH_SIZE, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=False)


def fit(
    model: LightningModule,
    callbacks: list[Callback],
    steps: int = 6,
    batches: int | None = None,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> tuple[Trainer, list[str]]:
    """Fit ``model`` for ``steps`` optimizer steps; returns the trainer and the guard's warnings."""
    accumulate = trainer_kwargs.get("accumulate_grad_batches", 1)
    options = {**QUIET, "devices": 1, **trainer_kwargs}
    trainer = Trainer(max_steps=steps, callbacks=callbacks, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, make_loader(batches or steps * accumulate), ckpt_path=ckpt_path)
    return trainer, [str(w.message) for w in caught if "NonFiniteGuard" in str(w.message)]


# ------------------------------------------------------------------------------- references
def params_of(module: nn.Module) -> Snapshot:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def buffers_of(module: nn.Module) -> Snapshot:
    return {name: b.detach().clone() for name, b in module.named_buffers()}


def optimizer_state_of(trainer: Trainer, module: nn.Module) -> Snapshot:
    names = {id(p): n for n, p in module.named_parameters()}
    return {
        f"{names[id(param)]}[{key}]": value.detach().clone()
        for optimizer in trainer.optimizers
        for param, state in optimizer.state.items()
        for key, value in state.items()
        if isinstance(value, Tensor)
    }


def nonfinite(snapshot: Snapshot) -> list[str]:
    return [name for name, t in snapshot.items() if not bool(torch.isfinite(t).all())]


def assert_bitwise_equal(actual: Snapshot, expected: Snapshot) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


class Recorder(Callback):
    """Independent record of each step: put it before the guard in the callback list."""

    def __init__(self) -> None:
        self.before: dict[int, Snapshot] = {}
        self.state_before: dict[int, Snapshot] = {}
        self.after: dict[int, Snapshot] = {}
        self.state_after: dict[int, Snapshot] = {}
        self.bad_grads: dict[int, list[str]] = {}
        self.lrs: dict[int, list[float]] = {}
        self.scales: dict[int, float] = {}
        self.batch_idx: dict[int, int] = {}
        self.batches = 0

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self.batch_idx.setdefault(step, batch_idx)
        if step not in self.before:  # the first micro-batch of the step
            self.before[step] = params_of(pl_module)
            self.state_before[step] = optimizer_state_of(trainer, pl_module)

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.bad_grads[trainer.global_step] = [
            name
            for name, p in pl_module.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.scales[trainer.global_step] = float(scaler.get_scale())

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batches += 1
        step = trainer.global_step - 1
        self.after[step] = params_of(pl_module)
        self.state_after[step] = optimizer_state_of(trainer, pl_module)
        self.lrs[step] = [group["lr"] for group in trainer.optimizers[0].param_groups]


class AtStep(Callback):
    """Runs ``action(trainer, module)`` in ``on_train_batch_end`` of optimizer step ``step``."""

    def __init__(self, step: int, action: Callable[[Trainer, LightningModule], None]) -> None:
        self.step = step
        self.action = action
        self.corrupted: list[str] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step - 1 == self.step:
            self.action(trainer, pl_module)


def corrupt_parameter(name: str) -> Callable[[Trainer, LightningModule], None]:
    def action(trainer: Trainer, module: LightningModule) -> None:
        with torch.no_grad():
            module.get_parameter(name).view(-1)[0] = math.inf

    return action


def corrupt_state(name: str, key: str) -> Callable[[Trainer, LightningModule], None]:
    def action(trainer: Trainer, module: LightningModule) -> None:
        state = trainer.optimizers[0].state[module.get_parameter(name)]
        state[key].view(-1)[0] = math.inf

    return action


def fp16_plugin(init_scale: float = 1024.0) -> MixedPrecision:
    # Trainer(precision="16-mixed", accelerator="cpu") silently falls back to bf16-mixed in
    # Lightning 2.6; the plugin given explicitly runs real float16 autocast with a GradScaler.
    return MixedPrecision(
        "16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale)
    )


# ------------------------------------------------------------------------------------ healthy
@pytest.mark.parametrize("action", ["warn", "skip", "raise"])
def test_healthy_run_records_nothing(action: str) -> None:
    guard = NonFiniteGuard(action=action, locate=True, check_state_every_n_steps=1)
    recorder = Recorder()
    model = make_model(optimizer="adam", dropout=0.3)
    _, caught = fit(model, [recorder, guard], steps=6)
    assert recorder.batches == 6
    assert all(not names for names in recorder.bad_grads.values())
    assert guard.events == []
    assert caught == []
    assert (guard.skipped_steps, guard.scaler_skips) == (0, 0)
    # The healthy steps were not skipped: every step moved the parameters.
    for step in range(6):
        assert recorder.after[step]["net.5.weight"].ne(recorder.before[step]["net.5.weight"]).any()


# ---------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("bad_step", [0, 3])
def test_nan_loss_is_one_loss_event_naming_the_nonfinite_gradients(bad_step: int) -> None:
    guard = NonFiniteGuard(action="skip")
    recorder = Recorder()
    _, caught = fit(make_model(faults={bad_step: "input"}), [recorder, guard], steps=6)
    expected = recorder.bad_grads[bad_step]
    assert expected  # the NaN input reaches every gradient
    assert [(e.step, e.kind, e.parameters) for e in guard.events] == [(bad_step, "loss", expected)]
    assert guard.events[0].action == "skipped"
    assert guard.events[0].module is None  # locate=False
    assert guard.skipped_steps == 1
    assert len(caught) == 1
    assert f"step {bad_step}" in caught[0]
    assert all(not names for step, names in recorder.bad_grads.items() if step != bad_step)


def test_nan_loss_with_finite_gradients_is_a_loss_event_without_parameters() -> None:
    guard = NonFiniteGuard(action="skip")
    recorder = Recorder()
    fit(make_model(faults={2: "nan_constant"}), [recorder, guard], steps=4)
    assert recorder.bad_grads[2] == []
    assert [(e.step, e.kind, e.parameters) for e in guard.events] == [(2, "loss", [])]
    assert_bitwise_equal(recorder.after[2], recorder.before[2])


def test_infinite_gradient_with_finite_loss_is_a_gradient_event() -> None:
    guard = NonFiniteGuard(action="skip")
    recorder = Recorder()
    _, caught = fit(make_model(faults={2: "backward"}), [recorder, guard], steps=5)
    assert recorder.bad_grads[2] == ["net.5.bias"]
    assert [(e.step, e.kind, e.parameters) for e in guard.events] == [
        (2, "gradient", recorder.bad_grads[2])
    ]
    assert len(caught) == 1
    assert "step 2" in caught[0]
    assert "net.5.bias" in caught[0]


def test_guard_and_gradient_monitor_share_one_reading_in_either_order() -> None:
    for monitor_first in (True, False):
        guard = NonFiniteGuard(action="skip")
        monitor = GradientMonitor(log_every_n_steps=1)
        recorder = Recorder()
        callbacks = [recorder, monitor, guard] if monitor_first else [recorder, guard, monitor]
        fit(make_model(faults={1: "input", 3: "backward"}), callbacks, steps=5)
        assert [(e.step, e.kind, e.parameters) for e in guard.events] == [
            (1, "loss", recorder.bad_grads[1]),
            (3, "gradient", recorder.bad_grads[3]),
        ], f"monitor_first={monitor_first}"


# ----------------------------------------------------------------------------------- locate
def test_locate_names_the_first_module_with_a_nonfinite_forward_output() -> None:
    guard = NonFiniteGuard(action="skip", locate=True)
    recorder = Recorder()
    fit(make_model(faults={1: "forward", 3: "input"}), [recorder, guard], steps=5)
    assert [(e.step, e.kind, e.module) for e in guard.events] == [
        (1, "loss", "net.2"),  # the Fault module: Linear and BatchNorm before it were finite
        (3, "loss", "net.0"),  # a NaN input: the first Linear's output is already NaN
    ]
    assert [e.parameters for e in guard.events] == [recorder.bad_grads[1], recorder.bad_grads[3]]
    assert "net.2" in guard.events[0].detail


def test_locate_gives_no_module_when_only_the_backward_is_nonfinite() -> None:
    guard = NonFiniteGuard(action="skip", locate=True)
    fit(make_model(faults={2: "backward"}), [guard], steps=4)
    assert [(e.step, e.kind, e.module) for e in guard.events] == [(2, "gradient", None)]


def _run_for_replay_check(
    tmp_path: Path, locate: bool
) -> tuple[Toy, Snapshot, Snapshot, Tensor, str, Recorder]:
    model = make_model(optimizer="adam", dropout=0.5, log_metrics=True, faults={2: "forward"})
    guard = NonFiniteGuard(action="skip", locate=locate)
    recorder = Recorder()
    logger = CSVLogger(tmp_path / f"locate_{locate}", name="", version="")
    fit(model, [recorder, guard], steps=5, logger=logger, log_every_n_steps=1)
    assert [(e.step, e.module) for e in guard.events] == [(2, "net.2" if locate else None)]
    csv = (Path(logger.log_dir) / "metrics.csv").read_text()
    return model, params_of(model), buffers_of(model), torch.get_rng_state(), csv, recorder


def test_locate_replay_leaves_training_and_logging_unchanged(tmp_path: Path) -> None:
    located = _run_for_replay_check(tmp_path, locate=True)
    plain = _run_for_replay_check(tmp_path, locate=False)
    model, params, buffers, rng, csv, recorder = located
    assert_bitwise_equal(params, plain[1])  # dropout masks, BN statistics: untouched
    assert_bitwise_equal(buffers, plain[2])
    assert torch.equal(rng, plain[3])
    assert csv == plain[4]
    assert csv.count("\n") == plain[4].count("\n") > 1
    # self.log ran once per training_step Lightning made, none during the replay.
    assert model.log_calls == recorder.batches == 5
    # The mute is undone: `log` is the class method again.
    assert "log" not in vars(model)


def test_locate_is_inert_under_manual_optimization() -> None:
    guard = NonFiniteGuard(action="skip", locate=True)
    fit(make_model(ManualToy, faults={1: "forward"}), [guard], steps=3)
    assert [(e.step, e.kind, e.module) for e in guard.events] == [(1, "loss", None)]


def test_locate_with_accumulation_names_the_module_of_the_offending_micro_batch() -> None:
    # Optimizer step 1 is made of batches 2 and 3; batch 2 holds the inf forward output.
    guard = NonFiniteGuard(action="skip", locate=True)
    fit(make_model(faults={2: "forward"}), [guard], steps=3, accumulate_grad_batches=2)
    assert [(e.step, e.kind) for e in guard.events] == [(1, "loss")]
    assert guard.events[0].module == "net.2"


# ------------------------------------------------------------------------------------- skip
def test_skip_leaves_parameters_and_adam_state_bitwise_unchanged() -> None:
    bad = 2
    guard = NonFiniteGuard(action="skip", check_state_every_n_steps=1)
    recorder = Recorder()
    model = make_model(optimizer="adam", lr=0.01, faults={bad: "input"})
    trainer, caught = fit(model, [recorder, guard], steps=6)
    assert trainer.global_step == 6  # the skipped step still counts
    assert_bitwise_equal(recorder.after[bad], recorder.before[bad])
    assert_bitwise_equal(recorder.state_after[bad], recorder.state_before[bad])
    assert set(recorder.state_before[bad]) >= {"net.0.weight[exp_avg_sq]", "net.0.weight[step]"}
    for step in (bad - 1, bad + 1):  # the neighbouring steps did update
        assert recorder.after[step]["net.0.weight"].ne(recorder.before[step]["net.0.weight"]).any()
    assert nonfinite(params_of(model)) == []
    assert guard.skipped_steps == 1
    assert [(e.step, e.action) for e in guard.events] == [(bad, "skipped")]
    assert len(caught) == 1
    assert "skipped" in caught[0]

    # Independent reference: plain PyTorch, forward/backward on every batch, no optimizer step
    # on the bad one (its forward still runs, as it did under Lightning, so BatchNorm matches).
    reference = make_model(optimizer="adam", lr=0.01, faults={bad: "input"})
    optimizer = reference.configure_optimizers()
    reference.train()
    for batch_idx, batch in enumerate(make_loader(6)):
        optimizer.zero_grad()
        reference.compute_loss(batch, batch_idx).backward()
        if batch_idx != bad:
            optimizer.step()
    assert_bitwise_equal(params_of(model), params_of(reference))
    assert int(optimizer.state[reference.net[0].weight]["step"]) == 5
    adam = trainer.optimizers[0]
    assert int(adam.state[model.net[0].weight]["step"]) == 5


def test_max_consecutive_skips_raises_naming_the_step() -> None:
    guard = NonFiniteGuard(action="skip", max_consecutive_skips=3)
    recorder = Recorder()
    model = make_model(fault_every="input")
    initial = params_of(model)
    with pytest.raises(NonFiniteError, match="3 consecutive") as info:
        fit(model, [recorder, guard], steps=10)
    assert "step 2" in str(info.value)
    assert guard.skipped_steps == 3
    assert [e.step for e in guard.events] == [0, 1, 2]
    assert_bitwise_equal(params_of(model), initial)


def test_consecutive_skips_reset_after_a_healthy_step() -> None:
    guard = NonFiniteGuard(action="skip", max_consecutive_skips=2)
    fit(make_model(faults={0: "input", 2: "input", 4: "input"}), [guard], steps=6)
    assert [e.step for e in guard.events] == [0, 2, 4]
    assert guard.skipped_steps == 3


def _expected_lrs(lr: float, bad: set[int], steps: int, factor: float, after: int) -> list[float]:
    """The learning rate after each step, from the documented rule."""
    rates, streak = [], 0
    for step in range(steps):
        streak = streak + 1 if step in bad else 0
        if streak and streak % after == 0:
            lr *= factor
        rates.append(lr)
    return rates


def test_lr_backoff_after_consecutive_skips() -> None:
    bad = {0, 1, 2, 3, 4, 6}
    guard = NonFiniteGuard(action="skip", lr_backoff=0.5, backoff_after=2)
    recorder = Recorder()
    model = make_model(lr=0.1, faults=dict.fromkeys(bad, "input"))
    trainer, caught = fit(model, [recorder, guard], steps=8)
    expected = _expected_lrs(0.1, bad, 8, 0.5, 2)
    assert expected[-1] < 0.1  # the scenario does back off
    assert [recorder.lrs[step][0] for step in range(8)] == pytest.approx(expected, rel=1e-12)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected[-1])
    assert sum("learning rate lowered" in message for message in caught) == 2


# ------------------------------------------------------------------------------------ raise
def test_raise_stops_at_the_step_with_kind_and_parameter() -> None:
    guard = NonFiniteGuard(action="raise")
    recorder = Recorder()
    with pytest.raises(NonFiniteError) as info:
        fit(make_model(faults={3: "input"}), [recorder, guard], steps=6)
    message = str(info.value)
    assert "step 3" in message
    assert "loss" in message
    assert recorder.bad_grads[3][0] in message
    assert 3 not in recorder.after  # training stopped inside step 3
    assert [(e.step, e.kind, e.action) for e in guard.events] == [(3, "loss", "raised")]


def test_raise_on_gradient_names_the_parameter() -> None:
    guard = NonFiniteGuard(action="raise")
    with pytest.raises(NonFiniteError, match=r"step 1.*net\.5\.bias"):
        fit(make_model(faults={1: "backward"}), [guard], steps=4)
    assert [(e.step, e.kind, e.parameters) for e in guard.events] == [
        (1, "gradient", ["net.5.bias"])
    ]


def _saved_checkpoints(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.ckpt"))


def _assert_finite_checkpoints(paths: list[Path]) -> None:
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert bad == [], f"{path.name} carries non-finite {bad}"


def test_raise_writes_no_checkpoint_with_nonfinite_weights_after_a_nan_loss(
    tmp_path: Path,
) -> None:
    guard = NonFiniteGuard(action="raise")
    recorder = Recorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(NonFiniteError):
        fit(
            make_model(faults={3: "input"}),
            [recorder, guard, checkpoint],
            steps=6,
            enable_checkpointing=True,
        )
    paths = _saved_checkpoints(tmp_path)
    assert len(paths) == len(recorder.after) == 3
    _assert_finite_checkpoints(paths)


def test_raise_aborts_the_checkpoint_of_corrupted_parameters(tmp_path: Path) -> None:
    guard = NonFiniteGuard(action="raise")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    corrupter = AtStep(2, corrupt_parameter("net.5.weight"))
    with pytest.raises(NonFiniteError, match=r"parameters after step 2: net\.5\.weight"):
        fit(make_model(), [corrupter, guard, checkpoint], steps=6, enable_checkpointing=True)
    paths = _saved_checkpoints(tmp_path)
    assert [p.name for p in paths] == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]
    _assert_finite_checkpoints(paths)
    assert [(e.step, e.kind, e.parameters) for e in guard.events] == [
        (2, "parameter", ["net.5.weight"])
    ]


# ------------------------------------------------------------------------------------- warn
def test_warn_reports_each_kind_once_while_the_failure_persists() -> None:
    # A NaN loss at step 2 is applied (warn does not skip): every parameter turns NaN, so
    # every later step fails too. The loss is reported at step 2, the parameters once after.
    guard = NonFiniteGuard(action="warn")
    recorder = Recorder()
    _, caught = fit(make_model(faults={2: "input"}), [recorder, guard], steps=7)
    assert all(nonfinite(recorder.after[step]) for step in range(2, 7))  # it does persist
    assert [(e.step, e.kind, e.action) for e in guard.events] == [
        (2, "loss", "warned"),
        (2, "parameter", "warned"),
    ]
    assert guard.events[0].parameters == recorder.bad_grads[2]
    assert guard.events[1].parameters == nonfinite(recorder.after[2])
    assert len(caught) == 2
    assert all(message.startswith("NonFiniteGuard") for message in caught)
    assert "step 2" in caught[0]
    assert guard.skipped_steps == 0


def test_warn_reports_a_new_failure_after_recovery() -> None:
    guard = NonFiniteGuard(action="warn")
    _, caught = fit(make_model(faults={1: "nan_constant", 3: "nan_constant"}), [guard], steps=5)
    # The gradients stay finite, so the parameters do too: two separate loss failures.
    assert [(e.step, e.kind) for e in guard.events] == [(1, "loss"), (3, "loss")]
    assert len(caught) == 2


def test_huge_learning_rate_is_reported_as_one_parameter_event() -> None:
    guard = NonFiniteGuard(action="warn")
    recorder = Recorder()
    fit(make_model(lr=1e36), [recorder, guard], steps=6)
    bad_after = [step for step in range(6) if nonfinite(recorder.after[step])]
    assert bad_after  # the weights overflow and stay non-finite
    assert all(step in bad_after for step in range(bad_after[0], 6))
    parameter_events = [e for e in guard.events if e.kind == "parameter"]
    assert len(parameter_events) == 1
    assert parameter_events[0].step == bad_after[0]
    assert parameter_events[0].parameters == nonfinite(recorder.after[bad_after[0]])
    assert len({e.kind for e in guard.events}) == len(guard.events)  # each kind at most once


# ------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("action", ["warn", "skip"])
def test_corrupted_parameters_are_found_at_the_next_step(action: str) -> None:
    guard = NonFiniteGuard(action=action)
    corrupter = AtStep(2, corrupt_parameter("net.5.weight"))
    recorder = Recorder()
    _, caught = fit(make_model(), [corrupter, recorder, guard], steps=5)
    assert nonfinite(recorder.after[2]) == ["net.5.weight"]
    assert [(e.step, e.kind, e.parameters) for e in guard.events] == [
        (2, "parameter", ["net.5.weight"])
    ]
    assert guard.events[0].action == "warned"  # cannot be undone, whatever the action
    # With "skip", every later step would only spread the damage: they are dropped and counted
    # (towards max_consecutive_skips), not silently stalled.
    assert guard.skipped_steps == (2 if action == "skip" else 0)
    assert len(caught) == 1
    assert ("cannot be undone" in caught[0]) == (action == "skip")


def test_corrupted_parameters_at_the_last_step_are_found_at_train_end() -> None:
    guard = NonFiniteGuard(action="warn")
    corrupter = AtStep(3, corrupt_parameter("net.1.bias"))
    _, caught = fit(make_model(), [corrupter, guard], steps=4)
    assert [(e.step, e.kind, e.parameters) for e in guard.events] == [
        (3, "parameter", ["net.1.bias"])
    ]
    assert len(caught) == 1


# -------------------------------------------------------------------------- optimizer state
@pytest.mark.parametrize("name", ["net.0.weight", "net.5.bias"])
def test_nonfinite_adam_state_is_an_optimizer_state_event(name: str) -> None:
    # Corrupted after the last optimizer step: read at train end, so exactly one check sees it.
    # net.5.bias has a single element (Linear(8, 1)), so does its exp_avg_sq.
    guard = NonFiniteGuard(check_state_every_n_steps=1)
    corrupter = AtStep(3, corrupt_state(name, "exp_avg_sq"))
    recorder = Recorder()
    _, caught = fit(make_model(optimizer="adam"), [recorder, corrupter, guard], steps=4)
    assert nonfinite(recorder.state_after[2]) == []
    assert [(e.step, e.kind, e.parameters) for e in guard.events] == [
        (3, "optimizer_state", [f"{name}[exp_avg_sq]"])
    ]
    assert len(caught) == 1


def test_persistent_nonfinite_adam_state_is_reported_once() -> None:
    # exp_avg_sq = beta2 * inf + ... stays inf; Adam's updates stay finite (zero), so every
    # later step looks healthy to the gradient check while the state is still broken.
    guard = NonFiniteGuard(check_state_every_n_steps=1)
    recorder = Recorder()
    corrupter = AtStep(1, corrupt_state("net.0.weight", "exp_avg_sq"))
    _, caught = fit(make_model(optimizer="adam"), [corrupter, recorder, guard], steps=6)
    assert all(
        nonfinite(recorder.state_after[step]) == ["net.0.weight[exp_avg_sq]"]
        for step in range(1, 6)
    )
    assert [(e.step, e.kind, e.parameters) for e in guard.events] == [
        (1, "optimizer_state", ["net.0.weight[exp_avg_sq]"])
    ]
    assert len(caught) == 1


# -------------------------------------------------------------------------- mixed precision
def test_fp16_occasional_overflows_are_counted_not_reported() -> None:
    # Overflows at steps 1, 3, 5: never two in a row, so max_scaler_skips=2 is never reached.
    guard = NonFiniteGuard(action="raise", max_scaler_skips=2)
    recorder = Recorder()
    model = make_model(faults={1: "huge", 3: "huge", 5: "huge"})
    trainer, caught = fit(model, [recorder, guard], steps=7, plugins=[fp16_plugin()])
    overflowed = sorted(step for step, names in recorder.bad_grads.items() if names)
    assert overflowed == [1, 3, 5]
    assert guard.scaler_skips == len(overflowed)
    assert guard.events == []
    assert caught == []
    assert guard.skipped_steps == 0
    # The scaler itself skipped those steps and halved its scale once per overflow.
    assert trainer.precision_plugin.scaler.get_scale() == 1024.0 * 0.5 ** len(overflowed)
    for step in overflowed:
        assert_bitwise_equal(recorder.after[step], recorder.before[step])


def test_fp16_persistent_overflow_is_one_scaler_event() -> None:
    guard = NonFiniteGuard(action="warn", max_scaler_skips=3)
    recorder = Recorder()
    _, caught = fit(
        make_model(fault_every="huge"), [recorder, guard], steps=6, plugins=[fp16_plugin()]
    )
    assert all(recorder.bad_grads[step] for step in range(6))
    assert guard.scaler_skips == 6
    assert [(e.step, e.kind) for e in guard.events] == [(2, "scaler")]
    assert "3 steps in a row" in guard.events[0].detail
    assert len(caught) == 1


def test_fp16_collapsed_loss_scale_is_a_scaler_event() -> None:
    # Scale 1024 -> 512 after step 0, -> 256 after step 1: below min_loss_scale=300 at step 1.
    guard = NonFiniteGuard(action="raise", max_scaler_skips=100, min_loss_scale=300.0)
    recorder = Recorder()
    with pytest.raises(NonFiniteError, match="GradScaler"):
        fit(make_model(fault_every="huge"), [recorder, guard], steps=6, plugins=[fp16_plugin()])
    assert recorder.scales == {0: 1024.0, 1: 512.0}
    assert [(e.step, e.kind) for e in guard.events] == [(1, "scaler")]
    assert guard.scaler_skips == 2


def test_fp16_nan_loss_is_a_failure_not_a_scaler_skip() -> None:
    guard = NonFiniteGuard(action="skip")
    recorder = Recorder()
    fit(make_model(faults={2: "input"}), [recorder, guard], steps=4, plugins=[fp16_plugin()])
    assert [(e.step, e.kind, e.parameters) for e in guard.events] == [
        (2, "loss", recorder.bad_grads[2])
    ]
    assert guard.scaler_skips == 0


def test_bf16_nonfinite_values_are_failures() -> None:
    guard = NonFiniteGuard(action="skip")
    recorder = Recorder()
    trainer, caught = fit(
        make_model(faults={1: "backward", 3: "input"}),
        [recorder, guard],
        steps=5,
        precision="bf16-mixed",
    )
    assert getattr(trainer.precision_plugin, "scaler", None) is None
    assert [(e.step, e.kind, e.parameters) for e in guard.events] == [
        (1, "gradient", ["net.5.bias"]),
        (3, "loss", recorder.bad_grads[3]),
    ]
    assert guard.scaler_skips == 0
    assert len(caught) == 2


# ------------------------------------------------------------------- manual / accumulation
def test_manual_optimization_nan_loss() -> None:
    guard = NonFiniteGuard(action="skip")
    recorder = Recorder()
    model = make_model(ManualToy, faults={2: "input"})
    trainer, _ = fit(model, [recorder, guard], steps=4)
    assert trainer.global_step == 4
    assert [(e.step, e.kind, e.parameters) for e in guard.events] == [
        (2, "loss", recorder.bad_grads[2])
    ]
    assert_bitwise_equal(recorder.after[2], recorder.before[2])
    assert nonfinite(params_of(model)) == []


def test_accumulation_nan_in_first_micro_batch_is_at_that_optimizer_step() -> None:
    # accumulate_grad_batches=2: optimizer step 1 is made of batches 2 and 3.
    guard = NonFiniteGuard(action="skip")
    recorder = Recorder()
    model = make_model(faults={2: "input"})
    trainer, _ = fit(model, [recorder, guard], steps=3, accumulate_grad_batches=2)
    assert trainer.global_step == 3
    assert recorder.batches == 6
    assert recorder.bad_grads[1]
    assert [(e.step, e.kind, e.parameters) for e in guard.events] == [
        (1, "loss", recorder.bad_grads[1])
    ]
    assert_bitwise_equal(recorder.after[1], recorder.before[1])
    assert nonfinite(params_of(model)) == []


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradients_are_checked_before_clipping(algorithm: str) -> None:
    # Clipping by value turns the +inf bias gradient into a finite 0.01: only a check made
    # before clipping sees it.
    guard = NonFiniteGuard(action="skip")
    recorder = Recorder()
    fit(
        make_model(faults={2: "backward"}),
        [recorder, guard],
        steps=4,
        gradient_clip_val=0.01,
        gradient_clip_algorithm=algorithm,
    )
    assert [(e.step, e.kind, e.parameters) for e in guard.events] == [
        (2, "gradient", ["net.5.bias"])
    ]
    assert_bitwise_equal(recorder.after[2], recorder.before[2])


# --------------------------------------------------------------------- zero observer effect
def test_guard_on_a_healthy_run_leaves_training_bitwise_unchanged() -> None:
    def run(callbacks: list[Callback]) -> tuple[Snapshot, Snapshot, Tensor]:
        model = make_model(optimizer="adam", dropout=0.5)
        fit(model, callbacks, steps=6)
        return params_of(model), buffers_of(model), torch.get_rng_state()

    guard = NonFiniteGuard(action="warn", locate=True, check_state_every_n_steps=1)
    with_guard = run([guard])
    without = run([])
    assert guard.events == []
    assert_bitwise_equal(with_guard[0], without[0])
    assert_bitwise_equal(with_guard[1], without[1])
    assert torch.equal(with_guard[2], without[2])


# ------------------------------------------------------------------------- state / resume
def test_state_dict_round_trip() -> None:
    guard = NonFiniteGuard(action="skip", lr_backoff=0.5, backoff_after=5)
    fit(make_model(faults={1: "input", 2: "backward", 4: "nan_constant"}), [guard], steps=5)
    assert len(guard.events) == 3
    state = torch.load(_saved(guard.state_dict()), weights_only=True)
    restored = NonFiniteGuard(action="skip")
    restored.load_state_dict(state)
    assert [asdict(e) for e in restored.events] == [asdict(e) for e in guard.events]
    assert all(isinstance(e, NonFiniteEvent) for e in restored.events)
    assert restored.skipped_steps == guard.skipped_steps == 3
    assert restored.scaler_skips == guard.scaler_skips
    assert restored.state_dict() == guard.state_dict()
    assert restored.events is not guard.events


def _saved(state: dict[str, Any]) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_checkpoint_resume_keeps_events_and_counters(tmp_path: Path) -> None:
    # Three batches per epoch, a NaN in batch 1 of every epoch.
    first = NonFiniteGuard(action="skip")
    model = make_model(faults={1: "input"})
    trainer, _ = fit(model, [first], steps=3, batches=3)
    path = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(path)
    assert [e.step for e in first.events] == [1]

    second = NonFiniteGuard(action="skip")
    recorder = Recorder()
    resumed = make_model(faults={1: "input"}, seed=99)
    fit(resumed, [recorder, second], steps=6, batches=3, ckpt_path=str(path))
    assert sorted(recorder.after) == [3, 4, 5]
    # Lightning decides which batch each resumed step gets; the recorder says which was bad.
    bad_after_resume = [step for step, index in recorder.batch_idx.items() if index == 1]
    assert len(bad_after_resume) == 1
    assert [asdict(e) for e in second.events[:1]] == [asdict(e) for e in first.events]
    assert [(e.step, e.kind) for e in second.events] == [(1, "loss"), (bad_after_resume[0], "loss")]
    assert second.skipped_steps == 2


# ------------------------------------------------------------------------------------- DDP
class RankDump(Callback):
    """Writes each rank's parameters (per step and final) and guard record to ``out_dir``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.per_step: dict[int, Snapshot] = {}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.per_step[trainer.global_step - 1] = params_of(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
        record = {
            "params": params_of(pl_module),
            "per_step": self.per_step,
            "events": [(e.step, e.action) for e in guard.events],
            "skipped": guard.skipped_steps,
            "world_size": trainer.world_size,
        }
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def run_ddp_scenario(out_dir: str) -> None:
    """Entry point of the subprocess: rank 1 alone gets a NaN-constant loss at step 1 (its
    gradients stay finite, so only the reduced decision can make rank 0 skip) and a NaN input
    at step 2 (spread to rank 0 by the gradient all-reduce)."""
    torch.set_num_threads(1)
    model = make_model(optimizer="adam", lr=0.01, faults={1: "nan_constant", 2: "input"})
    model.fault_rank = 1
    trainer = Trainer(
        strategy="ddp_spawn",
        devices=2,
        max_steps=4,
        callbacks=[NonFiniteGuard(action="skip"), RankDump(out_dir)],
        **QUIET,
    )
    trainer.fit(model, make_loader(8))


@pytest.mark.distributed
def test_ddp_both_ranks_skip_the_same_steps(tmp_path: Path) -> None:
    run_scenario(
        "tests.callbacks.test_nonfinite_guard",
        tmp_path,
        timeout=90,
        hang="ranks did not take the same decision?",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for record in ranks:
        assert record["events"] == [(1, "skipped"), (2, "skipped")]
        assert record["skipped"] == 2
        assert nonfinite(record["params"]) == []
        per_step = record["per_step"]
        assert sorted(per_step) == [0, 1, 2, 3]
        assert_bitwise_equal(per_step[1], per_step[0])
        assert_bitwise_equal(per_step[2], per_step[0])
        assert per_step[3]["net.0.weight"].ne(per_step[2]["net.0.weight"]).any()
    assert_bitwise_equal(ranks[0]["params"], ranks[1]["params"])


# ------------------------------------------------------------------------------------- CLI
def test_lightning_cli_configures_the_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("jsonargparse")
    monkeypatch.setattr(sys, "argv", ["cli"])
    from lightning.pytorch.cli import LightningCLI

    args = [
        "--trainer.callbacks+=lightning_optdiag.callbacks.NonFiniteGuard",
        "--trainer.callbacks.action=skip",
        "--trainer.callbacks.locate=true",
        "--trainer.callbacks.max_consecutive_skips=4",
        "--trainer.max_steps=4",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
    ]
    cli = LightningCLI(
        Toy, run=False, args=args, save_config_callback=None, seed_everything_default=False
    )
    guards = [c for c in cli.trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert len(guards) == 1
    guard = guards[0]
    assert (guard.action, guard.locate, guard.max_consecutive_skips) == ("skip", True, 4)
    assert guard.check_state_every_n_steps == 50  # untouched defaults
    cli.trainer.fit(make_model(faults={1: "forward"}), make_loader(4))
    assert [(e.step, e.action, e.module) for e in guard.events] == [(1, "skipped", "net.2")]


def test_lightning_cli_rejects_an_invalid_action(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("jsonargparse")
    monkeypatch.setattr(sys, "argv", ["cli"])
    from lightning.pytorch.cli import LightningCLI

    args = [
        "--trainer.callbacks+=lightning_optdiag.callbacks.NonFiniteGuard",
        "--trainer.callbacks.action=ignore",
        "--trainer.logger=false",
    ]
    with pytest.raises(SystemExit):
        LightningCLI(
            Toy, run=False, args=args, save_config_callback=None, seed_everything_default=False
        )


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"action": "ignore"}, ValueError, ["action", "'ignore'"]),
        ({"action": None}, ValueError, ["action", "None"]),
        ({"locate": "yes"}, TypeError, ["locate", "'yes'"]),
        ({"locate": 1}, TypeError, ["locate", "1"]),
        ({"action": "skip", "lr_backoff": 0}, ValueError, ["lr_backoff", "0"]),
        ({"action": "skip", "lr_backoff": 1.5}, ValueError, ["lr_backoff", "1.5"]),
        ({"action": "skip", "lr_backoff": -0.5}, ValueError, ["lr_backoff", "-0.5"]),
        ({"action": "skip", "lr_backoff": math.nan}, ValueError, ["lr_backoff", "nan"]),
        ({"action": "skip", "lr_backoff": "0.5"}, TypeError, ["lr_backoff", "'0.5'"]),
        ({"action": "warn", "lr_backoff": 0.5}, ValueError, ["lr_backoff", "0.5", "warn"]),
        ({"action": "raise", "lr_backoff": 0.5}, ValueError, ["lr_backoff", "0.5", "raise"]),
        ({"lr_backoff": 0.5}, ValueError, ["lr_backoff", "0.5", "warn"]),
        ({"backoff_after": 0}, ValueError, ["backoff_after", "0"]),
        ({"backoff_after": 2.5}, TypeError, ["backoff_after", "2.5"]),
        ({"backoff_after": True}, TypeError, ["backoff_after", "True"]),
        ({"max_consecutive_skips": 0}, ValueError, ["max_consecutive_skips", "0"]),
        ({"max_consecutive_skips": -3}, ValueError, ["max_consecutive_skips", "-3"]),
        ({"check_state_every_n_steps": 0}, ValueError, ["check_state_every_n_steps", "0"]),
        ({"check_state_every_n_steps": "5"}, TypeError, ["check_state_every_n_steps", "'5'"]),
        ({"max_scaler_skips": 0}, ValueError, ["max_scaler_skips", "0"]),
        ({"min_loss_scale": -1}, ValueError, ["min_loss_scale", "-1"]),
        ({"min_loss_scale": math.inf}, ValueError, ["min_loss_scale", "inf"]),
        ({"min_loss_scale": None}, TypeError, ["min_loss_scale", "None"]),
    ],
)
def test_invalid_arguments_are_rejected(
    kwargs: dict[str, Any], error: type[Exception], words: list[str]
) -> None:
    assert_rejected(NonFiniteGuard, kwargs, error, words)


def test_valid_boundary_arguments_are_accepted() -> None:
    guard = NonFiniteGuard(
        action="skip",
        locate=True,
        lr_backoff=1,
        backoff_after=1,
        max_consecutive_skips=1,
        check_state_every_n_steps=1,
        max_scaler_skips=1,
        min_loss_scale=0,
    )
    assert (guard.lr_backoff, guard.min_loss_scale) == (1.0, 0.0)
    assert isinstance(guard.lr_backoff, float)
    assert (guard.backoff_after, guard.max_consecutive_skips, guard.max_scaler_skips) == (1, 1, 1)
    assert copy.deepcopy(guard).state_dict() == guard.state_dict()


class BufferRecorder(Callback):
    """Buffers before the first micro-batch of each step and after the step."""

    def __init__(self) -> None:
        self.before: dict[int, Snapshot] = {}
        self.after: dict[int, Snapshot] = {}

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.before.setdefault(trainer.global_step, buffers_of(pl_module))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The first batch end after a step is the step's last micro-batch.
        self.after.setdefault(trainer.global_step - 1, buffers_of(pl_module))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_skip_puts_batchnorm_statistics_back(accumulate: int) -> None:
    # A NaN batch writes NaN into the BatchNorm running statistics during its forward pass;
    # dropping the step must drop that too, or eval-mode outputs would be NaN ever after.
    guard = NonFiniteGuard(action="skip")
    buffers = BufferRecorder()
    bad_batch = 2 * accumulate  # the first micro-batch of step 2
    model = make_model(faults={bad_batch: "input"})
    fit(model, [buffers, guard], steps=4, accumulate_grad_batches=accumulate)
    assert [(e.step, e.action) for e in guard.events] == [(2, "skipped")]
    for name, value in buffers.after[2].items():
        assert torch.equal(value, buffers.before[2][name]), name
    assert all(bool(torch.isfinite(b).all()) for b in model.buffers())
    healthy_step = buffers.after[1]
    assert any(not torch.equal(v, buffers.before[1][n]) for n, v in healthy_step.items())


class NoBuffers(LightningModule):
    """A model without any buffer (no BatchNorm): there is nothing for a skip to put back."""

    def __init__(self, bad_batch: int) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.bad_batch = bad_batch

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        return loss + math.nan if batch_idx == self.bad_batch else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_skip_works_on_a_model_without_buffers() -> None:
    guard = NonFiniteGuard(action="skip")
    recorder = Recorder()
    torch.manual_seed(0)
    model = NoBuffers(bad_batch=2)
    fit(model, [recorder, guard], steps=4)
    assert [(e.step, e.action) for e in guard.events] == [(2, "skipped")]
    assert_bitwise_equal(recorder.after[2], recorder.before[2])
    assert not torch.equal(recorder.after[3]["layer.weight"], recorder.before[3]["layer.weight"])
