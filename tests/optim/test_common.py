"""Contract every bundled optimizer keeps: resume, foreach, dtypes, sparse, closure, Lightning."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_optdiag.optim import (
    LAMB,
    LARS,
    SGDW,
    SWATS,
    AdaBound,
    AMSBound,
    Lookahead,
    create_optimizer,
)
from tests.optim.cases import (
    CASES,
    Case,
    loss_at,
    optimizer_tensors,
    round_trip,
    tiny_model,
    train,
)

OptimizerClass = Callable[..., Optimizer]
ADAPTIVE: list[OptimizerClass] = [SWATS, AdaBound, AMSBound, LAMB]  # take ``betas`` and ``eps``
ALL_CLASSES: list[OptimizerClass] = [SWATS, AdaBound, AMSBound, SGDW, LARS, LAMB]


def _class_name(cls: OptimizerClass) -> str:
    return getattr(cls, "__name__", str(cls))


def _parameters(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_bitwise_equal(actual: list[Tensor], expected: list[Tensor]) -> None:
    assert len(actual) == len(expected)
    for index, (a, b) in enumerate(zip(actual, expected, strict=True)):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), index
        assert torch.equal(a, b), f"tensor {index} differs by {(a - b).abs().max().item()}"


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_resume_at_step_7_equals_14_uninterrupted_steps(case: Case, foreach: bool) -> None:
    uninterrupted_model = tiny_model()
    uninterrupted = case.build(uninterrupted_model, foreach)
    train(uninterrupted_model, uninterrupted, range(14))

    first_model = tiny_model()
    first = case.build(first_model, foreach)
    train(first_model, first, range(7))
    model_checkpoint = round_trip(first_model.state_dict())
    optimizer_checkpoint = round_trip(first.state_dict())
    # Different initial values: everything must come from the checkpoint.
    resumed_model = tiny_model(seed=123)
    resumed_model.load_state_dict(model_checkpoint)
    resumed = case.build(resumed_model, foreach)
    resumed.load_state_dict(optimizer_checkpoint)
    train(resumed_model, resumed, range(7, 14))

    _assert_bitwise_equal(_parameters(resumed_model), _parameters(uninterrupted_model))
    _assert_bitwise_equal(optimizer_tensors(resumed), optimizer_tensors(uninterrupted))
    if isinstance(uninterrupted, SWATS):
        assert isinstance(resumed, SWATS)
        assert resumed.switch_status() == uninterrupted.switch_status()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_foreach_path_matches_the_for_loop_reference_bitwise(case: Case) -> None:
    results = {}
    for foreach in (True, False):
        model = tiny_model(torch.float64)
        optimizer = case.build(model, foreach)
        train(model, optimizer, range(12))
        results[foreach] = (_parameters(model), optimizer_tensors(optimizer))
    _assert_bitwise_equal(results[True][0], results[False][0])
    _assert_bitwise_equal(results[True][1], results[False][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_runs_in_each_dtype_and_stays_finite(case: Case, dtype: torch.dtype) -> None:
    model = tiny_model(dtype)
    before = _parameters(model)
    optimizer = case.build(model, None)
    train(model, optimizer, range(6))
    after = _parameters(model)
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert all(t.dtype == dtype for t in optimizer_tensors(optimizer) if t.dim() > 0)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sparse_gradients_are_refused_with_a_clear_error(case: Case) -> None:
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    optimizer = case.build(model, None)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert model[0].weight.grad is not None
    assert model[0].weight.grad.is_sparse
    before = _parameters(model)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()
    if case.bundled is not Lookahead:  # the base (torch's Adam, SGDW) owns the message there
        with pytest.raises(RuntimeError, match=rf"{case.bundled.__name__} does not support sparse"):
            optimizer.step()
    # Refused before anything moved.
    _assert_bitwise_equal(_parameters(model), before)


def _closure(optimizer: Optimizer, model: nn.Module, step: int) -> Callable[[], Any]:
    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_at(model, step)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("case", CASES, ids=str)
def test_step_with_closure_returns_its_loss_and_takes_the_same_step(case: Case) -> None:
    plain_model, closure_model = tiny_model(), tiny_model()
    plain, with_closure = case.build(plain_model, None), case.build(closure_model, None)
    for step in range(4):
        plain.zero_grad()
        expected_loss = loss_at(plain_model, step)
        expected_loss.backward()
        assert plain.step() is None

        closure = _closure(with_closure, closure_model, step)
        loss = with_closure.step(closure)
        assert isinstance(loss, Tensor)
        assert torch.equal(loss, expected_loss.detach())
    _assert_bitwise_equal(_parameters(closure_model), _parameters(plain_model))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_is_a_torch_optimizer_with_working_hooks(case: Case) -> None:
    model = tiny_model()
    optimizer = case.build(model, None)
    assert isinstance(optimizer, Optimizer)
    calls: list[str] = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    train(model, optimizer, range(1))
    assert calls == ["pre", "post"]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_steps_without_gradients_change_nothing(case: Case) -> None:
    model = tiny_model()
    before = _parameters(model)
    optimizer = case.build(model, None)
    for _ in range(3):  # never a gradient
        optimizer.step()
    _assert_bitwise_equal(_parameters(model), before)


class _TinyModule(LightningModule):
    def __init__(self, optimizer_name: str, **optimizer_kwargs: object) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.optimizer_name = optimizer_name
        self.optimizer_kwargs = optimizer_kwargs
        self.losses: list[float] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.net(inputs), targets)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> Optimizer:
        return create_optimizer(self.optimizer_name, self.parameters(), **self.optimizer_kwargs)


LIGHTNING_CONFIGS = [
    ("swats", {"lr": 1e-2}),
    ("lookahead", {"base": "adam", "lr": 1e-2, "k": 2}),
    ("adabound", {"lr": 1e-2, "final_lr": 0.05}),
    ("amsbound", {"lr": 1e-2, "final_lr": 0.05}),
    ("sgdw", {"lr": 0.05, "momentum": 0.9}),
    ("lars", {"lr": 5.0, "trust_coefficient": 0.01}),
    ("lamb", {"lr": 1e-2}),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "kwargs"), LIGHTNING_CONFIGS, ids=[c[0] for c in LIGHTNING_CONFIGS]
)
def test_trains_as_the_optimizer_of_a_lightning_module(
    name: str, kwargs: dict[str, object]
) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 4, generator=generator)
    targets = inputs.sum(dim=1, keepdim=True).sin()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, targets), batch_size=16
    )
    module = _TinyModule(name, **kwargs)
    before = _parameters(module)
    trainer = Trainer(
        max_steps=12,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    assert trainer.global_step == 12
    assert len(module.losses) == 12
    assert all(math.isfinite(x) for x in module.losses)
    assert any(not torch.equal(a, b) for a, b in zip(_parameters(module), before, strict=True))
    optimizer = trainer.optimizers[0]
    assert type(optimizer).__name__.lower() == name


# --- argument validation (hypothesis) -------------------------------------------------------


def _params() -> list[Tensor]:
    return [nn.Parameter(torch.zeros(2))]


_bad_non_negative = st.one_of(
    st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=True),
    st.just(math.nan),
    st.just(math.inf),
)


@settings(max_examples=30, deadline=None)
@given(lr=_bad_non_negative)
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_class_name)
def test_invalid_learning_rate_is_rejected_with_the_value(cls: OptimizerClass, lr: float) -> None:
    with pytest.raises(ValueError, match="Invalid learning rate") as error:
        cls(_params(), lr=lr)
    assert str(lr) in str(error.value)


@settings(max_examples=30, deadline=None)
@given(
    beta=st.one_of(
        st.floats(max_value=-1e-12, allow_nan=False), st.floats(min_value=1.0, allow_nan=False)
    ),
    index=st.sampled_from([0, 1]),
)
@pytest.mark.parametrize("cls", ADAPTIVE, ids=_class_name)
def test_beta_outside_unit_interval_is_rejected_with_the_value(
    cls: OptimizerClass, beta: float, index: int
) -> None:
    betas = [0.9, 0.999]
    betas[index] = beta
    with pytest.raises(ValueError, match=f"Invalid beta parameter at index {index}") as error:
        cls(_params(), betas=tuple(betas))
    assert str(beta) in str(error.value)


@settings(max_examples=20, deadline=None)
@given(value=_bad_non_negative)
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_class_name)
def test_invalid_weight_decay_is_rejected_with_the_value(cls: OptimizerClass, value: float) -> None:
    with pytest.raises(ValueError, match="Invalid weight_decay value") as error:
        cls(_params(), weight_decay=value)
    assert str(value) in str(error.value)


@settings(max_examples=20, deadline=None)
@given(value=_bad_non_negative)
@pytest.mark.parametrize("cls", [*ADAPTIVE, LARS], ids=_class_name)
def test_invalid_eps_is_rejected_with_the_value(cls: OptimizerClass, value: float) -> None:
    with pytest.raises(ValueError, match="Invalid epsilon value") as error:
        cls(_params(), eps=value)
    assert str(value) in str(error.value)


@settings(max_examples=20, deadline=None)
@given(value=st.one_of(st.text(max_size=3), st.none(), st.booleans(), st.lists(st.integers())))
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_class_name)
def test_non_numeric_learning_rate_is_a_type_error(cls: OptimizerClass, value: object) -> None:
    with pytest.raises(TypeError, match="Invalid learning rate") as error:
        cls(_params(), lr=value)
    assert repr(value) in str(error.value)


@settings(max_examples=20, deadline=None)
@given(lr=st.floats(min_value=0.0, max_value=10.0), weight_decay=st.floats(0.0, 1.0))
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_class_name)
def test_valid_arguments_are_accepted_and_stored(
    cls: OptimizerClass, lr: float, weight_decay: float
) -> None:
    if cls in (AdaBound, AMSBound) and lr == 0.0:
        lr = 1e-3  # AdaBound needs an initial lr > 0 (tested in test_adabound)
    optimizer = cls(_params(), lr=lr, weight_decay=weight_decay)
    assert optimizer.param_groups[0]["lr"] == lr
    assert optimizer.param_groups[0]["weight_decay"] == weight_decay


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_class_name)
def test_a_bad_value_in_a_later_param_group_is_rejected_too(cls: OptimizerClass) -> None:
    optimizer = cls(_params(), lr=0.1)
    with pytest.raises(ValueError, match=r"Invalid learning rate: -1\.0"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "lr": -1.0})
    assert len(optimizer.param_groups) == 1  # the bad group was not kept


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_class_name)
@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64], ids=str)
def test_non_real_floating_parameters_are_refused(cls: OptimizerClass, dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=f"floating-point parameters only.*{dtype}"):
        cls([torch.zeros(2, dtype=dtype)])


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_class_name)
def test_invalid_foreach_flag_is_a_type_error(cls: OptimizerClass) -> None:
    with pytest.raises(TypeError, match="Invalid foreach: 'yes'"):
        cls(_params(), foreach="yes")
