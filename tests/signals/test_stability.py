"""Stability thresholds against the real torch optimizers on quadratics.

On ``0.5 theta^T A theta`` the rule claims the step is stable iff ``lr * lambda_max(D A) < c``.
The tests pick the learning rate that puts ``rule.ratio`` at 0.9 or 1.1 (and 0.97 / 1.03) and
run the actual optimizer: it must converge below the threshold and blow up above it.
Adaptive optimizers move their preconditioner, so their constant is checked with the
preconditioner frozen (``eps`` far above ``sqrt(v)`` makes ``P = sqrt(v_hat) + eps`` constant),
and the preconditioner itself against ``optimizer.state`` and against the step actually taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_optdiag.optim import LAMB, LARS, SGDW, SWATS, AdaBound, Lookahead
from lightning_optdiag.signals import (
    StabilityRule,
    optimizer_family,
    stability_rule,
    warmup_horizon,
)
from tests.reference import planted_matrix

SPECTRUM = torch.tensor([4.0, 2.5, 1.0, 0.7, 0.5], dtype=torch.float64)
SIZES = (3, 2)  # the 5 coordinates are split over two parameters

MakeOptimizer = Callable[[list[dict[str, Any]]], Optimizer]


def make_params(seed: int = 0, scale: float = 1.0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    start = scale * torch.randn(sum(SIZES), generator=generator, dtype=torch.float64)
    return [torch.nn.Parameter(chunk.clone()) for chunk in torch.split(start, SIZES)]


def flat(params: Sequence[Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def set_gradients(params: Sequence[Tensor], matrix: Tensor) -> Tensor:
    """The exact gradient ``A theta`` of ``0.5 theta^T A theta``, written into ``.grad``."""
    gradient = matrix @ flat(params)
    for param, chunk in zip(params, torch.split(gradient, SIZES), strict=True):
        param.grad = chunk.clone()
    return gradient


def run(optimizer: Optimizer, params: Sequence[Tensor], matrix: Tensor, steps: int) -> float:
    """``|theta_end| / |theta_start|``, or ``inf`` once the iterates have grown 1e8-fold."""
    start = float(flat(params).norm())
    for _ in range(steps):
        set_gradients(params, matrix)
        optimizer.step()
        size = float(flat(params).norm())
        if not math.isfinite(size) or size > 1e8 * start:
            return math.inf
    return float(flat(params).norm()) / start


def sharpness(rule: StabilityRule, matrix: Tensor) -> float:
    """``lambda_max(D A)`` through ``rule.scale`` (``D = S^2``), by a dense eigensolver."""
    if rule.scale is None:
        return float(np.linalg.eigvalsh(matrix.numpy()).max())
    s = torch.cat([t.reshape(-1) for t in rule.scale]).double().numpy()
    return float(np.linalg.eigvalsh(s[:, None] * matrix.numpy() * s[None, :]).max())


def set_lr_for_ratio(
    optimizer: Optimizer, params: Sequence[Tensor], matrix: Tensor, factor: float
) -> StabilityRule:
    """Rescale every group's lr (keeping their proportions) so that the rule's ratio is
    ``factor``; return the rule at the new learning rates."""
    rule = stability_rule(optimizer, params)
    assert rule is not None
    top = factor * rule.constant / sharpness(rule, matrix)
    multiplier = top / rule.lr
    for group in optimizer.param_groups:
        group["lr"] *= multiplier
    new_rule = stability_rule(optimizer, params)
    assert new_rule is not None
    assert new_rule.lr == pytest.approx(top, rel=1e-12)
    assert new_rule.ratio(sharpness(new_rule, matrix)) == pytest.approx(factor, rel=1e-9)
    return new_rule


@pytest.fixture(scope="module")
def matrix() -> Tensor:
    return planted_matrix(SPECTRUM, seed=4)


# --- momentum SGD: the real dynamics ----------------------------------------------------------

SGD_CASES: dict[str, tuple[str, Callable[[list[Tensor]], Optimizer]]] = {
    "plain": ("sgd", lambda p: torch.optim.SGD(p, lr=1.0)),
    "heavy_ball": ("heavy_ball", lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9)),
    "heavy_ball_0.5": ("heavy_ball", lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.5)),
    "dampened": (
        "heavy_ball",
        lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9, dampening=0.5),
    ),
    "nesterov": ("nesterov", lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9, nesterov=True)),
    "nesterov_0.5": (
        "nesterov",
        lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.5, nesterov=True),
    ),
    "sgdw": ("heavy_ball", lambda p: SGDW(p, lr=1.0, momentum=0.9, weight_decay=0.0)),
}


@pytest.mark.parametrize("factor", [0.9, 0.97, 1.03, 1.1])
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_threshold_separates_convergence_from_divergence(
    matrix: Tensor, case: str, factor: float
) -> None:
    family, make = SGD_CASES[case]
    params = make_params()
    optimizer = make(params)
    rule = set_lr_for_ratio(optimizer, params, matrix, factor)
    assert rule.family == family
    assert rule.scale is None  # one learning rate, no preconditioner: plain lambda_max(A)
    assert rule.threshold == pytest.approx(rule.constant / rule.lr)
    growth = run(optimizer, params, matrix, steps=500)
    if factor < 1:
        assert growth < 1e-6
    else:
        assert growth == math.inf


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_group_learning_rates_fold_into_the_scale(matrix: Tensor, factor: float) -> None:
    params = make_params()
    optimizer = torch.optim.SGD(
        [{"params": [params[0]], "lr": 0.25}, {"params": [params[1]], "lr": 1.0}],
        lr=1.0,
        momentum=0.9,
    )
    rule = stability_rule(optimizer, params)
    assert rule is not None
    assert rule.family == "heavy_ball"
    assert rule.lr == 1.0
    assert rule.scale is not None
    torch.testing.assert_close(rule.scale[0], torch.full((3,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(rule.scale[1], torch.ones(2, dtype=torch.float64))
    # The group scaling matters here: the plain lambda_max(A) would be a different sharpness.
    assert sharpness(rule, matrix) < 0.9 * float(SPECTRUM.max())
    rule = set_lr_for_ratio(optimizer, params, matrix, factor)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25 * rule.lr)
    growth = run(optimizer, params, matrix, steps=500)
    assert (growth < 1e-6) if factor < 1 else (growth == math.inf)


def test_parameters_outside_the_optimizer_get_zero_scale() -> None:
    params = make_params()
    optimizer = torch.optim.SGD([params[0]], lr=0.1)
    rule = stability_rule(optimizer, params)
    assert rule is not None
    assert rule.family == "sgd"
    assert rule.lr == 0.1
    assert rule.scale is not None
    torch.testing.assert_close(rule.scale[0], torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(rule.scale[1], torch.zeros(2, dtype=torch.float64))
    # The same for an adaptive optimizer once it has state.
    adam = torch.optim.Adam([params[1]], lr=0.1)
    params[1].grad = torch.ones(2, dtype=torch.float64)
    adam.step()
    rule = stability_rule(adam, params)
    assert rule is not None
    assert rule.scale is not None
    torch.testing.assert_close(rule.scale[0], torch.zeros(3, dtype=torch.float64))
    assert bool((rule.scale[1] > 0).all())
    # None of the parameters held: nothing to measure.
    assert stability_rule(torch.optim.SGD([params[0]], lr=0.1), [params[1]]) is None


def test_zero_learning_rate_has_no_rule() -> None:
    params = make_params()
    assert stability_rule(torch.optim.SGD(params, lr=0.0), params) is None
    assert StabilityRule("sgd", 2.0, 0.0, None).threshold == math.inf
    rule = StabilityRule("sgd", 2.0, 0.5, None)
    assert rule.threshold == 4.0
    assert rule.ratio(4.0) == 1.0
    assert rule.ratio(1.0) == 0.25


# --- adaptive optimizers: the preconditioner --------------------------------------------------


def adam_like_inverse(optimizer: Optimizer, param: Tensor) -> np.ndarray:
    """``1 / (sqrt(v / (1 - beta2^t)) + eps)`` from the optimizer's own state, by hand."""
    state = optimizer.state[param]
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    beta2, eps = group["betas"][1], group["eps"]
    key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
    second = state[key].double().numpy()
    t = float(state["step"])
    return 1.0 / (np.sqrt(second / (1.0 - beta2**t)) + eps)


ADAM_CASES: dict[str, Callable[[list[dict[str, Any]]], Optimizer]] = {
    "adam": lambda g: torch.optim.Adam(g, lr=0.01),
    "adam_beta1_0.5": lambda g: torch.optim.Adam(g, lr=0.01, betas=(0.5, 0.99)),
    "amsgrad": lambda g: torch.optim.Adam(g, lr=0.01, amsgrad=True),
    "adamw": lambda g: torch.optim.AdamW(g, lr=0.01),
    "swats": lambda g: SWATS(g, lr=0.01),
    "adabound": lambda g: AdaBound(g, lr=0.01),
    "lookahead_adam": lambda g: Lookahead(torch.optim.Adam(g, lr=0.01), k=3),
}


@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_sharpness_is_that_of_the_frozen_preconditioner(matrix: Tensor, case: str) -> None:
    params = make_params(seed=1)
    groups = [{"params": [params[0]]}, {"params": [params[1]], "lr": 0.005}]
    optimizer = ADAM_CASES[case](groups)
    for step in range(6):
        set_gradients(params, matrix)
        if step == 2:  # a jump in one coordinate, so that v is far from uniform
            params[0].grad[0] *= 30.0
        optimizer.step()
    rule = stability_rule(optimizer, params)
    assert rule is not None
    assert rule.family == "adam"
    beta1 = optimizer.param_groups[0]["betas"][0]
    assert rule.constant == pytest.approx((2 + 2 * beta1) / (1 - beta1))
    assert rule.lr == 0.01
    # D = (lr_group / lr) / P, with P rebuilt from exp_avg_sq independently.
    inverse = np.concatenate(
        [adam_like_inverse(optimizer, params[0]), 0.5 * adam_like_inverse(optimizer, params[1])]
    )
    assert rule.scale is not None
    scale = torch.cat(rule.scale).numpy()
    np.testing.assert_allclose(scale**2, inverse, rtol=1e-10)
    # lambda_max(P^-1 A), a non-symmetric product, by a general dense eigensolver.
    exact = float(np.max(np.linalg.eigvals(inverse[:, None] * matrix.numpy()).real))
    assert sharpness(rule, matrix) == pytest.approx(exact, rel=1e-9)
    assert rule.ratio(exact) == pytest.approx(0.01 * exact / rule.constant, rel=1e-12)
    # The preconditioner is far from a multiple of the identity, so this is not just A.
    assert np.ptp(inverse) > 0.5 * np.max(inverse)


def frozen(make: Callable[..., Optimizer]) -> Callable[[list[Tensor]], Optimizer]:
    """An adaptive optimizer whose ``eps`` dwarfs ``sqrt(v)``: ``P = sqrt(v_hat) + eps`` stays
    constant while the iterates (started at 1e-6) grow up to the 1e8-fold divergence cut."""
    return lambda params: make(params, eps=1e6)


FROZEN_CASES: dict[str, Callable[[list[Tensor]], Optimizer]] = {
    "adam": frozen(lambda p, **k: torch.optim.Adam(p, lr=1e-12, **k)),
    "adam_beta1_0.5": frozen(lambda p, **k: torch.optim.Adam(p, lr=1e-12, betas=(0.5, 0.99), **k)),
    "amsgrad": frozen(lambda p, **k: torch.optim.Adam(p, lr=1e-12, amsgrad=True, **k)),
    "adamw": frozen(lambda p, **k: torch.optim.AdamW(p, lr=1e-12, weight_decay=0.0, **k)),
    "rmsprop": frozen(lambda p, **k: torch.optim.RMSprop(p, lr=1e-12, **k)),
    "rmsprop_momentum": frozen(lambda p, **k: torch.optim.RMSprop(p, lr=1e-12, momentum=0.9, **k)),
    "adagrad": frozen(lambda p, **k: torch.optim.Adagrad(p, lr=1e-12, **k)),
    "lookahead_adam": frozen(lambda p, **k: Lookahead(torch.optim.Adam(p, lr=1e-12, **k), k=5)),
}


def frozen_run(matrix: Tensor, make: Callable[[list[Tensor]], Optimizer], factor: float) -> float:
    params = make_params(scale=1e-6)
    optimizer = make(params)
    # A warm-up at a negligible learning rate: state exists and Adam's bias correction of the
    # first moment has died out (0.9^100), so the asymptotic constant applies.
    for _ in range(100):
        set_gradients(params, matrix)
        optimizer.step()
    set_lr_for_ratio(optimizer, params, matrix, factor)
    return run(optimizer, params, matrix, steps=600)


@pytest.mark.parametrize("factor", [0.9, 1.1])
@pytest.mark.parametrize("case", list(FROZEN_CASES))
def test_adaptive_constant_with_a_frozen_preconditioner(
    matrix: Tensor, case: str, factor: float
) -> None:
    growth = frozen_run(matrix, FROZEN_CASES[case], factor)
    assert (growth < 1e-3) if factor < 1 else (growth == math.inf)


@pytest.mark.parametrize("optimizer_class", [torch.optim.NAdam, torch.optim.RAdam])
def test_nadam_and_radam_have_no_rule(matrix: Tensor, optimizer_class: type) -> None:
    # NAdam's momentum schedule makes it diverge at about a tenth of Adam's threshold, and
    # RAdam's rectification rescales its step: Adam's rule would mislead for both.
    params = make_params()
    optimizer = optimizer_class(params, lr=0.01)
    for _ in range(3):
        set_gradients(params, matrix)
        optimizer.step()
    assert stability_rule(optimizer, params) is None


def realised_step_cases() -> dict[str, Callable[[list[Tensor]], Optimizer]]:
    # beta1 = 0 (no momentum): the step taken is exactly -lr * D * g with D from the state the
    # step leaves behind.
    return {
        "adam": lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.0, 0.99)),
        "amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.0, 0.99), amsgrad=True),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.0, 0.99), weight_decay=0.0),
        "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9),
        "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, centered=True),
        "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.01),
        "adagrad_lr_decay": lambda p: torch.optim.Adagrad(p, lr=0.01, lr_decay=0.3),
    }


def check_realised_step(matrix: Tensor, make: Callable[[list[Tensor]], Optimizer]) -> None:
    params = make_params(seed=2)
    optimizer = make(params)
    for step in range(10):
        before = flat(params)
        gradient = set_gradients(params, matrix)
        if step % 3 == 0:  # uneven gradients, so the preconditioner is not uniform
            params[1].grad.mul_(1 + step)
            gradient = torch.cat([p.grad.reshape(-1) for p in params])
        optimizer.step()
        rule = stability_rule(optimizer, params)
        assert rule is not None
        assert rule.scale is not None
        inverse = torch.cat(rule.scale) ** 2
        taken = flat(params) - before
        torch.testing.assert_close(taken, -rule.lr * inverse * gradient, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("case", list(realised_step_cases()))
def test_scale_is_the_preconditioner_of_the_step_taken(matrix: Tensor, case: str) -> None:
    check_realised_step(matrix, realised_step_cases()[case])


# --- unsupported and early states -------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.AdamW(p, lr=0.01),
        lambda p: torch.optim.RMSprop(p, lr=0.01),
        lambda p: Lookahead(torch.optim.Adam(p, lr=0.01)),
    ],
    ids=["adam", "adamw", "rmsprop", "lookahead_adam"],
)
def test_adaptive_optimizer_before_its_first_step_has_no_rule(
    make: Callable[[list[Tensor]], Optimizer],
) -> None:
    params = make_params()
    assert stability_rule(make(params), params) is None


def test_adagrad_before_its_first_step_has_no_rule() -> None:
    params = make_params()
    assert stability_rule(torch.optim.Adagrad(params, lr=0.01), params) is None


@pytest.mark.parametrize("optimizer_class", [LAMB, LARS])
def test_trust_ratio_optimizers_have_no_rule(matrix: Tensor, optimizer_class: type) -> None:
    params = make_params()
    optimizer = optimizer_class(params, lr=0.01)
    assert stability_rule(optimizer, params) is None
    set_gradients(params, matrix)
    optimizer.step()
    assert stability_rule(optimizer, params) is None


def test_lbfgs_has_no_rule() -> None:
    params = make_params()
    assert stability_rule(torch.optim.LBFGS(params), params) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.8, "dampening": 0.3},
    ],
)
def test_lookahead_has_the_rule_of_its_base(matrix: Tensor, kwargs: dict[str, Any]) -> None:
    params = make_params()
    base = torch.optim.SGD(params, lr=0.05, **kwargs)
    wrapped = Lookahead(base, k=2)
    for _ in range(3):
        set_gradients(params, matrix)
        wrapped.step()
    expected = stability_rule(torch.optim.SGD(params, lr=0.05, **kwargs), params)
    assert stability_rule(wrapped, params) == expected
    assert stability_rule(base, params) == expected
    assert expected is not None
    assert expected.scale is None


def test_lookahead_adam_has_the_scale_of_its_base(matrix: Tensor) -> None:
    params = make_params()
    base = torch.optim.Adam(params, lr=0.01)
    wrapped = Lookahead(base, k=2)
    for _ in range(3):
        set_gradients(params, matrix)
        wrapped.step()
    outer, inner = stability_rule(wrapped, params), stability_rule(base, params)
    assert outer is not None
    assert inner is not None
    assert outer.scale is not None
    assert inner.scale is not None
    assert (outer.family, outer.constant, outer.lr) == (inner.family, inner.constant, inner.lr)
    for a, b in zip(outer.scale, inner.scale, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "family", "constant"),
    [
        (lambda p: torch.optim.RMSprop(p, lr=0.01), "rmsprop", 2.0),
        (lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5), "rmsprop", 3.0),
        (lambda p: torch.optim.Adagrad(p, lr=0.01), "adagrad", 2.0),
    ],
    ids=["rmsprop", "rmsprop_momentum", "adagrad"],
)
def test_rmsprop_and_adagrad_scale_from_their_state(
    matrix: Tensor, make: Callable[[list[Tensor]], Optimizer], family: str, constant: float
) -> None:
    params = make_params()
    optimizer = make(params)
    for _ in range(4):
        set_gradients(params, matrix)
        optimizer.step()
    rule = stability_rule(optimizer, params)
    assert rule is not None
    assert (rule.family, rule.constant, rule.lr) == (family, constant, 0.01)
    assert rule.scale is not None
    for param, scale in zip(params, rule.scale, strict=True):
        state = optimizer.state[param]
        statistic = state["square_avg"] if family == "rmsprop" else state["sum"]
        expected = 1.0 / (statistic.sqrt() + optimizer.param_groups[0]["eps"])
        torch.testing.assert_close(scale**2, expected, rtol=1e-12, atol=0)


# --- family and warm-up horizon ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "family"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), "sgd"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "heavy_ball"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1), "heavy_ball"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "nesterov"),
        (lambda p: SGDW(p, lr=0.1, momentum=0.9), "heavy_ball"),
        (lambda p: torch.optim.Adam(p), "adam"),
        (lambda p: torch.optim.AdamW(p), "adam"),
        (lambda p: torch.optim.NAdam(p), "adam"),
        (lambda p: AdaBound(p), "adam"),
        (lambda p: torch.optim.RMSprop(p), "rmsprop"),
        (lambda p: torch.optim.Adagrad(p), "adagrad"),
        (lambda p: torch.optim.Adadelta(p), None),
        (lambda p: Lookahead(torch.optim.SGD(p, lr=0.1, momentum=0.9)), "heavy_ball"),
        (lambda p: Lookahead(torch.optim.Adam(p)), "adam"),
    ],
)
def test_optimizer_family_before_any_step(
    make: Callable[[list[Tensor]], Optimizer], family: str | None
) -> None:
    assert optimizer_family(make(make_params())) == family


@pytest.mark.parametrize(
    ("make", "horizon"),
    [
        (lambda p: torch.optim.Adam(p), 2000),
        (lambda p: torch.optim.AdamW(p, betas=(0.9, 0.99)), 200),
        (lambda p: torch.optim.Adam(p, betas=(0.9, 0.95)), 40),
        (lambda p: torch.optim.Adam(p, betas=(0.9, 0.0)), 2),
        (lambda p: Lookahead(torch.optim.Adam(p, betas=(0.9, 0.98))), 100),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), None),
        (lambda p: torch.optim.RMSprop(p), None),
        (lambda p: torch.optim.Adagrad(p), None),
    ],
)
def test_warmup_horizon_is_two_over_one_minus_beta2(
    make: Callable[[list[Tensor]], Optimizer], horizon: int | None
) -> None:
    assert warmup_horizon(make(make_params())) == horizon
