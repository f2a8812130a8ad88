"""AdaBound and AMSBound against their update equations written out in float64."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_optdiag.optim import AdaBound, AMSBound
from tests.optim.cases import round_trip

BETAS = (0.9, 0.999)
EPS = 1e-8


def _params() -> list[Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(6, 5, generator=generator, dtype=torch.float64).requires_grad_(),
        torch.randn(5, generator=generator, dtype=torch.float64).requires_grad_(),
    ]


def _grad(weight: Tensor, index: int, step: int) -> Tensor:
    # Gradients of very different sizes across elements and steps, so some elements hit the
    # lower bound and others the upper one.
    wave = torch.cos(torch.arange(weight.numel(), dtype=torch.float64) * 0.7 + step).view_as(weight)
    return (index + 1.0) * weight * 0.3 + wave * 10.0 ** (wave * 2)


def _set_grads(params: list[Tensor], step: int) -> None:
    for index, p in enumerate(params):
        p.grad = _grad(p.detach(), index, step)


class PaperAdaBound:
    """The update of the authors' reference implementation, element by element, in float64."""

    def __init__(
        self,
        weights: list[Tensor],
        *,
        lr: float,
        final_lr: float,
        gamma: float,
        weight_decay: float = 0.0,
        amsbound: bool = False,
    ) -> None:
        self.weights = [w.detach().clone() for w in weights]
        self.m = [torch.zeros_like(w) for w in self.weights]
        self.v = [torch.zeros_like(w) for w in self.weights]
        self.v_max = [torch.zeros_like(w) for w in self.weights]
        self.t = 0
        self.lr, self.base_lr, self.final_lr, self.gamma = lr, lr, final_lr, gamma
        self.weight_decay, self.amsbound = weight_decay, amsbound
        self.clipped_low = self.clipped_high = 0

    def step(self) -> None:
        beta1, beta2 = BETAS
        self.t += 1
        t = self.t
        final_lr = self.final_lr * self.lr / self.base_lr
        lower = final_lr * (1 - 1 / (self.gamma * t + 1))
        upper = final_lr * (1 + 1 / (self.gamma * t))
        for i, w in enumerate(self.weights):
            g = _grad(w, i, t - 1) + self.weight_decay * w
            self.m[i] = beta1 * self.m[i] + (1 - beta1) * g
            self.v[i] = beta2 * self.v[i] + (1 - beta2) * g * g
            self.v_max[i] = torch.maximum(self.v_max[i], self.v[i])
            v = self.v_max[i] if self.amsbound else self.v[i]
            raw = self.lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) / (v.sqrt() + EPS)
            self.clipped_low += int((raw < lower).sum())
            self.clipped_high += int((raw > upper).sum())
            eta = raw.clamp(lower, upper)
            self.weights[i] = w - eta * self.m[i]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize("amsbound", [False, True], ids=["AdaBound", "AMSBound"])
def test_matches_the_update_equations(amsbound: bool, foreach: bool) -> None:
    params = _params()
    kwargs: dict[str, Any] = {"lr": 0.01, "final_lr": 0.05, "gamma": 0.05, "weight_decay": 1e-3}
    optimizer = AdaBound(params, amsbound=amsbound, foreach=foreach, **kwargs)
    reference = PaperAdaBound(params, amsbound=amsbound, **kwargs)
    for step in range(25):
        _set_grads(params, step)
        optimizer.step()
        reference.step()
        for actual, expected in zip(params, reference.weights, strict=True):
            torch.testing.assert_close(actual.detach(), expected, rtol=1e-11, atol=1e-13)
    # The run exercised both bounds, not just Adam.
    assert reference.clipped_low > 0
    assert reference.clipped_high > 0


def test_amsbound_is_adabound_with_the_flag() -> None:
    a_params, b_params = _params(), _params()
    a = AMSBound(a_params, lr=0.01, final_lr=0.05)
    b = AdaBound(b_params, lr=0.01, final_lr=0.05, amsbound=True)
    assert isinstance(a, AdaBound)
    assert a.defaults == b.defaults
    for step in range(10):
        _set_grads(a_params, step)
        _set_grads(b_params, step)
        a.step()
        b.step()
    assert all(torch.equal(x, y) for x, y in zip(a_params, b_params, strict=True))


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize("amsbound", [False, True], ids=["AdaBound", "AMSBound"])
def test_with_both_bounds_at_final_lr_it_is_momentum_sgd(amsbound: bool, foreach: bool) -> None:
    final_lr, beta1 = 0.05, BETAS[0]
    params, sgd_params = _params(), _params()
    # gamma = inf puts both bounds at final_lr from the first step.
    optimizer = AdaBound(
        params, lr=0.01, final_lr=final_lr, gamma=math.inf, amsbound=amsbound, foreach=foreach
    )
    sgd = torch.optim.SGD(sgd_params, lr=(1 - beta1) * final_lr, momentum=beta1)
    weights = [p.detach().clone() for p in params]
    momentum = [torch.zeros_like(w) for w in weights]
    for step in range(20):
        _set_grads(params, step)
        _set_grads(sgd_params, step)
        optimizer.step()
        sgd.step()
        # Heavy ball written out: m <- beta1 m + (1 - beta1) g, w <- w - final_lr m.
        grads = [_grad(w, i, step) for i, w in enumerate(weights)]
        momentum = [beta1 * m + (1 - beta1) * g for m, g in zip(momentum, grads, strict=True)]
        weights = [w - final_lr * m for w, m in zip(weights, momentum, strict=True)]
        for mine, torchs, expected in zip(params, sgd_params, weights, strict=True):
            torch.testing.assert_close(mine.detach(), expected, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(mine.detach(), torchs.detach(), rtol=1e-12, atol=1e-13)


def test_the_bounds_close_in_on_final_lr() -> None:
    # A tiny step (huge gradients) is lifted to the lower bound, a huge one (tiny gradients)
    # cut to the upper bound; both bounds approach final_lr as t grows.
    final_lr, gamma = 0.1, 0.01
    big, small = (
        torch.zeros(1, dtype=torch.float64, requires_grad=True),
        torch.zeros(1, dtype=torch.float64, requires_grad=True),
    )
    optimizer = AdaBound([big, small], lr=1e-3, final_lr=final_lr, gamma=gamma)
    for t in (1, 2, 3):
        before = (big.item(), small.item())
        big.grad = torch.full((1,), 1e6, dtype=torch.float64)
        small.grad = torch.full((1,), 1e-9, dtype=torch.float64)
        optimizer.step()
        m_big, m_small = (optimizer.state[p]["exp_avg"].item() for p in (big, small))
        lower = final_lr * (1 - 1 / (gamma * t + 1))
        upper = final_lr * (1 + 1 / (gamma * t))
        assert before[0] - big.item() == pytest.approx(lower * m_big, rel=1e-12)
        assert before[1] - small.item() == pytest.approx(upper * m_small, rel=1e-12)


def test_an_lr_scheduler_scales_final_lr_and_base_lr_survives_a_resume() -> None:
    kwargs: dict[str, Any] = {"final_lr": 0.05, "gamma": 0.05}
    params = _params()
    optimizer = AdaBound(params, lr=0.01, **kwargs)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    reference = PaperAdaBound(params, lr=0.01, **kwargs)
    for step in range(6):
        _set_grads(params, step)
        optimizer.step()
        reference.step()
        scheduler.step()
        reference.lr = optimizer.param_groups[0]["lr"]
    assert optimizer.param_groups[0]["lr"] == 0.005
    assert optimizer.param_groups[0]["base_lr"] == 0.01
    for actual, expected in zip(params, reference.weights, strict=True):
        torch.testing.assert_close(actual.detach(), expected, rtol=1e-11, atol=1e-13)

    # A resumed optimizer built with the *current* lr still scales from the original one.
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = AdaBound(resumed_params, lr=0.005, **kwargs)
    resumed.load_state_dict(round_trip(optimizer.state_dict()))
    assert resumed.param_groups[0]["base_lr"] == 0.01
    for step in range(6, 10):
        for group in (params, resumed_params):
            _set_grads(group, step)
        optimizer.step()
        resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params, strict=True))


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
def test_a_scheduled_lr_of_zero_freezes_the_weights_but_not_the_moments(foreach: bool) -> None:
    params = _params()
    optimizer = AdaBound(params, lr=0.01, final_lr=0.05, foreach=foreach)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.0)
    assert optimizer.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in params]
    for step in range(3):
        _set_grads(params, step)
        optimizer.step()
        scheduler.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert optimizer.state[params[0]]["step"] == 3
    assert torch.count_nonzero(optimizer.state[params[0]]["exp_avg"]) > 0


def test_a_final_lr_of_zero_closes_both_bounds_at_zero() -> None:
    params = _params()
    optimizer = AdaBound(params, lr=0.01, final_lr=0.0)
    before = [p.detach().clone() for p in params]
    for step in range(3):
        _set_grads(params, step)
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_a_group_may_set_its_own_base_lr() -> None:
    p = torch.zeros(3, requires_grad=True)
    optimizer = AdaBound([{"params": [p], "lr": 0.002, "base_lr": 0.004}], final_lr=0.1)
    assert optimizer.param_groups[0]["base_lr"] == 0.004
    assert AdaBound([p], lr=0.003).param_groups[0]["base_lr"] == 0.003


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, r"Invalid learning rate: 0.0 \(AdaBound needs an initial lr > 0"),
        ({"gamma": 0.0}, "Invalid gamma value: 0.0"),
        ({"gamma": -1.0}, "Invalid gamma value: -1.0"),
        ({"final_lr": -0.1}, "Invalid final_lr value: -0.1"),
        ({"final_lr": math.inf}, "Invalid final_lr value: inf"),
    ],
)
def test_invalid_bound_settings_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaBound([torch.zeros(2, requires_grad=True)], **kwargs)


def test_amsbound_flag_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="Invalid amsbound: 'yes'"):
        AdaBound([torch.zeros(2, requires_grad=True)], amsbound="yes")  # type: ignore[arg-type]
