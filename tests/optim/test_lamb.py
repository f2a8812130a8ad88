"""LAMB against its update equations written out in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_optdiag.optim import LAMB

BETAS = (0.9, 0.999)
EPS = 1e-6
LR = 0.01


def _weights() -> list[Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(5, 4, generator=generator, dtype=torch.float64).requires_grad_(),
        (0.1 * torch.randn(3, 5, generator=generator, dtype=torch.float64)).requires_grad_(),
        torch.randn(5, generator=generator, dtype=torch.float64).requires_grad_(),  # "bias"
    ]


def _grad(weight: Tensor, index: int, step: int) -> Tensor:
    return (index + 1.0) * weight + torch.cos(torch.arange(weight.numel()) * 0.9 + step).view_as(
        weight
    )


def _set_grads(params: list[Tensor], step: int) -> None:
    for index, p in enumerate(params):
        p.grad = _grad(p.detach(), index, step)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_matches_the_paper_update_with_an_excluded_group(
    bias_correction: bool, foreach: bool
) -> None:
    weight_decay = 0.05
    params = _weights()
    optimizer = LAMB(
        [
            {"params": params[:2], "weight_decay": weight_decay},
            {"params": params[2:], "weight_decay": 0.0, "layer_adaptation": False},
        ],
        lr=LR,
        eps=EPS,
        bias_correction=bias_correction,
        foreach=foreach,
    )
    beta1, beta2 = BETAS
    weights = [p.detach().clone() for p in params]
    m = [torch.zeros_like(w) for w in weights]
    v = [torch.zeros_like(w) for w in weights]
    for t in range(1, 16):
        for i, w in enumerate(weights):
            g = _grad(w, i, t - 1)
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1**t) if bias_correction else m[i]
            v_hat = v[i] / (1 - beta2**t) if bias_correction else v[i]
            adapted = i < 2
            u = m_hat / (v_hat.sqrt() + EPS) + (weight_decay if adapted else 0.0) * w
            trust = w.norm() / u.norm() if adapted else 1.0
            weights[i] = w - LR * trust * u
        _set_grads(params, t - 1)
        optimizer.step()
        for actual, expected in zip(params, weights, strict=True):
            torch.testing.assert_close(actual.detach(), expected, rtol=1e-12, atol=1e-14)


def test_each_adapted_layer_moves_by_lr_times_its_norm() -> None:
    params = _weights()[:2]
    optimizer = LAMB(params, lr=LR, weight_decay=0.01)
    for step in range(5):
        before = [p.detach().clone() for p in params]
        _set_grads(params, step)
        optimizer.step()
        for p, w in zip(params, before, strict=True):
            torch.testing.assert_close((p.detach() - w).norm(), LR * w.norm(), rtol=1e-12, atol=0)


def test_an_excluded_group_without_decay_is_adam() -> None:
    params, adam_params = _weights(), _weights()
    lamb = LAMB([{"params": params, "layer_adaptation": False}], lr=LR, eps=EPS)
    adam = torch.optim.Adam(adam_params, lr=LR, eps=EPS)
    for step in range(10):
        _set_grads(params, step)
        _set_grads(adam_params, step)
        lamb.step()
        adam.step()
    for a, b in zip(params, adam_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_zero_weight_or_zero_update_gets_a_trust_ratio_of_one() -> None:
    zero_weight = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    still = torch.ones(4, dtype=torch.float64, requires_grad=True)
    optimizer = LAMB([zero_weight, still], lr=LR)
    zero_weight.grad = torch.full((4,), 3.0, dtype=torch.float64)
    still.grad = torch.zeros(4, dtype=torch.float64)
    optimizer.step()
    # q = 1 with u = m_hat / (sqrt(v_hat) + eps) = 3 / (3 + eps); zero update stays zero.
    expected = -LR * 3.0 / (3.0 + EPS)
    torch.testing.assert_close(
        zero_weight.detach(), torch.full((4,), expected, dtype=torch.float64)
    )
    assert torch.equal(still.detach(), torch.ones(4, dtype=torch.float64))
    assert all(math.isfinite(x) for x in zero_weight.detach().tolist())


@pytest.mark.parametrize("flag", ["bias_correction", "layer_adaptation"])
def test_flags_must_be_bools(flag: str) -> None:
    with pytest.raises(TypeError, match=f"Invalid {flag}: 1"):
        LAMB([{"params": _weights(), flag: 1}])
