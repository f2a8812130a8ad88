"""SGDW against torch's SGD and against the decoupled update written out in float64."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_optdiag.optim import SGDW


def _params() -> list[Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(4, 3, generator=generator, dtype=torch.float64).requires_grad_(),
        torch.randn(3, generator=generator, dtype=torch.float64).requires_grad_(),
    ]


def _grad(weight: Tensor, index: int, step: int) -> Tensor:
    return (index + 1.0) * weight + torch.sin(torch.arange(weight.numel()) + step).view_as(weight)


def _set_grads(params: list[Tensor], step: int) -> None:
    for index, p in enumerate(params):
        p.grad = _grad(p.detach(), index, step)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize(
    ("momentum", "dampening", "nesterov"),
    [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.5, False), (0.8, 0.0, True)],
)
def test_matches_the_decoupled_update_equations(
    momentum: float, dampening: float, nesterov: bool, foreach: bool
) -> None:
    lr, weight_decay = 0.05, 0.2
    params = _params()
    optimizer = SGDW(
        params,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        foreach=foreach,
    )
    weights = [p.detach().clone() for p in params]
    buffers: list[Tensor | None] = [None, None]
    for step in range(15):
        for i, w in enumerate(weights):
            g = _grad(w, i, step)  # the gradient at theta_{t-1}, without any decay term
            decayed = w * (1 - lr * weight_decay)
            if momentum == 0:
                direction = g
            else:
                previous = buffers[i]
                buffer = g if previous is None else momentum * previous + (1 - dampening) * g
                buffers[i] = buffer
                direction = g + momentum * buffer if nesterov else buffer
            weights[i] = decayed - lr * direction
        _set_grads(params, step)
        optimizer.step()
        for actual, expected in zip(params, weights, strict=True):
            torch.testing.assert_close(actual.detach(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)])
def test_without_weight_decay_it_is_torch_sgd_bit_for_bit(
    momentum: float, nesterov: bool, foreach: bool
) -> None:
    params, torch_params = _params(), _params()
    sgdw = SGDW(
        params, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=0.0, foreach=foreach
    )
    sgd = torch.optim.SGD(
        torch_params, lr=0.05, momentum=momentum, nesterov=nesterov, foreach=foreach
    )
    for step in range(12):
        _set_grads(params, step)
        _set_grads(torch_params, step)
        sgdw.step()
        sgd.step()
    assert all(torch.equal(a, b) for a, b in zip(params, torch_params, strict=True))


def test_the_decay_stays_out_of_the_momentum_buffer() -> None:
    # With a zero loss gradient, decoupled decay shrinks the weights geometrically and leaves
    # the buffer at zero; L2 decay (torch's SGD weight_decay) feeds the buffer and overshoots.
    lr, weight_decay = 0.1, 0.5
    params, l2_params = _params(), _params()
    initial = [p.detach().clone() for p in params]
    sgdw = SGDW(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    l2 = torch.optim.SGD(l2_params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    for _ in range(5):
        for p in (*params, *l2_params):
            p.grad = torch.zeros_like(p)
        sgdw.step()
        l2.step()
    for p, p0 in zip(params, initial, strict=True):
        torch.testing.assert_close(
            p.detach(), p0 * (1 - lr * weight_decay) ** 5, rtol=1e-14, atol=0
        )
        assert torch.count_nonzero(sgdw.state[p]["momentum_buffer"]) == 0
    assert not any(torch.allclose(a, b) for a, b in zip(params, l2_params, strict=True))


def test_the_decay_follows_a_scheduled_lr() -> None:
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    optimizer = SGDW([p], lr=0.1, weight_decay=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    expected = 1.0
    for _ in range(3):
        expected *= 1 - optimizer.param_groups[0]["lr"] * 0.5
        p.grad = torch.zeros_like(p)
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), expected, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"nesterov": True},
            "Nesterov momentum requires a momentum and zero dampening, got momentum=0.0",
        ),
        ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "dampening=0.1"),
        ({"momentum": -0.5}, "Invalid momentum value: -0.5"),
        ({"dampening": -1.0}, "Invalid dampening value: -1.0"),
    ],
)
def test_invalid_settings_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SGDW(_params(), **kwargs)
