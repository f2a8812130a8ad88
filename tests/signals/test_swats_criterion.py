"""SwatsCriterion against the SWATS paper's formulas written out independently.

The reference keeps no running state: the average is the closed-form sum
``lambda_k = (1 - beta2) * sum_i beta2^(n - i) gamma_(j_i)`` over the ``n`` steps ``j_i <= k`` with
a usable projection (the paper updates lambda inside ``if p.g != 0``), while the bias correction
``1 - beta2^k`` counts every Adam step (Algorithm 1 increments ``k`` before that check). The
criterion's recursive average must agree with it to rounding, and fire at exactly the steps
where the reference's relative test holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from lightning_optdiag.optim import SWATS
from lightning_optdiag.signals import SwatsCriterion


@dataclass
class Expected:
    usable: bool  # p.g != 0 and gamma finite
    gamma: float | None
    estimate: float | None
    fires: bool
    margin: float  # |(|Lambda - gamma| - threshold * Lambda)| / Lambda: distance to the boundary


def paper_reference(
    sequence: list[tuple[float, float]], beta2: float, threshold: float, min_steps: int
) -> list[Expected]:
    """The paper's gamma / Lambda and the relative switch test, step by step, in closed form."""
    gammas: list[tuple[int, float]] = []  # (k, gamma_k) of the usable steps
    out: list[Expected] = []
    for k, (squared_norm, projection) in enumerate(sequence, start=1):
        gamma = None if projection == 0.0 else squared_norm / -projection
        usable = gamma is not None and math.isfinite(gamma)
        if usable:
            assert gamma is not None
            gammas.append((k, gamma))
        if not gammas:
            out.append(Expected(usable, None, None, False, math.inf))
            continue
        # lambda changes only at usable steps (the paper updates it inside ``if p.g != 0``):
        # each later usable step decays gamma_j once more.
        n = len(gammas)
        average = (1.0 - beta2) * math.fsum(
            beta2 ** (n - 1 - i) * g for i, (_, g) in enumerate(gammas)
        )
        estimate = average / (1.0 - beta2**k)
        last_gamma = gammas[-1][1]
        fires = False
        margin = math.inf
        if usable and k >= min_steps and estimate > 0.0:
            gap = abs(estimate - last_gamma)
            fires = gap < threshold * estimate
            margin = abs(gap - threshold * estimate) / estimate
        out.append(Expected(usable, last_gamma, estimate, fires, margin))
    return out


def scripted_sequence(seed: int, steps: int = 400) -> list[tuple[float, float]]:
    """(p.p, p.g) pairs whose gamma is noisy around a drifting level, with the odd special step:
    zero projections, an ascent step (p.g > 0), a gamma that overflows, a NaN."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(steps, generator=generator, dtype=torch.float64).tolist()
    sizes = torch.rand(steps, generator=generator, dtype=torch.float64).tolist()
    sequence = []
    for k in range(1, steps + 1):
        level = 0.05 * (1.0 + 0.5 * math.exp(-k / 80.0))
        gamma = level * (1.0 + 0.25 * noise[k - 1])
        squared_norm = 1e-4 * (0.1 + sizes[k - 1])
        sequence.append((squared_norm, -squared_norm / gamma))
    sequence[2] = (1e-4, 0.0)  # p.g == 0: counted, not averaged
    sequence[30] = (2e-4, -0.0)
    sequence[41] = (1e-4, +2e-3)  # ascent: a negative gamma, averaged as the paper does
    sequence[57] = (1e-4, -1e-320)  # gamma overflows to inf: skipped
    sequence[63] = (math.nan, -1e-3)  # NaN: skipped
    return sequence


def run(criterion: SwatsCriterion, sequence: list[tuple[float, float]]) -> list[bool]:
    return [criterion.update(squared_norm, projection) for squared_norm, projection in sequence]


# -------------------------------------------------------------------------- the paper's rule
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("beta2", "threshold", "min_steps"), [(0.999, 5e-3, 10), (0.99, 2e-2, 2), (0.9, 1e-3, 25)]
)
def test_every_step_matches_the_paper_formulas(
    seed: int, beta2: float, threshold: float, min_steps: int
) -> None:
    sequence = scripted_sequence(seed)
    expected = paper_reference(sequence, beta2, threshold, min_steps)
    # The data must not sit on the decision boundary (rounding would decide, not the rule).
    assert min(e.margin for e in expected) > 1e-9
    criterion = SwatsCriterion(beta2=beta2, threshold=threshold, min_steps=min_steps)
    assert criterion.estimate is None
    for k, ((squared_norm, projection), want) in enumerate(
        zip(sequence, expected, strict=True), start=1
    ):
        fired = criterion.update(squared_norm, projection)
        assert criterion.steps == k
        assert fired == want.fires, k
        if want.estimate is None:
            assert criterion.estimate is None
            assert criterion.last_gamma is None
        else:
            assert criterion.estimate == pytest.approx(want.estimate, rel=1e-12), k
            assert criterion.last_gamma == want.gamma
    fires = [k for k, e in enumerate(expected, start=1) if e.fires]
    assert fires, "the scripted sequence should fire somewhere"
    assert fires[0] >= min_steps


def test_steps_without_a_usable_projection_count_in_the_bias_correction() -> None:
    # beta2 = 0.5, worked by hand: k=1 p.g=0 (no gamma); k=2 gamma=1: lambda=0.5,
    # Lambda = 0.5 / (1 - 0.25) = 2/3; k=3 gamma=2: lambda = 0.25 + 1 = 1.25, Lambda = 1.25/0.875.
    criterion = SwatsCriterion(beta2=0.5, threshold=1e-3, min_steps=2)
    assert criterion.update(1.0, 0.0) is False
    assert (criterion.steps, criterion.estimate, criterion.average) == (1, None, 0.0)
    assert criterion.update(1.0, -1.0) is False  # |2/3 - 1| = 1/3 of... far from 1e-3
    assert criterion.steps == 2
    assert criterion.average == 0.5
    assert criterion.estimate == pytest.approx(2.0 / 3.0, rel=1e-15)
    assert criterion.update(4.0, -2.0) is False
    assert criterion.estimate == pytest.approx(1.25 / 0.875, rel=1e-15)
    assert criterion.last_gamma == 2.0


@pytest.mark.parametrize(
    ("squared_norm", "projection"),
    [(1.0, 0.0), (1.0, -0.0), (1e-4, -1e-320), (math.inf, -1.0), (math.nan, -1.0), (1.0, math.nan)],
)
def test_unusable_steps_are_counted_but_leave_the_average(
    squared_norm: float, projection: float
) -> None:
    criterion = SwatsCriterion(beta2=0.9, threshold=1.0, min_steps=2)
    criterion.update(0.5, -1.0)  # gamma = 0.5
    average = criterion.average
    assert criterion.update(squared_norm, projection) is False
    assert criterion.steps == 2
    assert criterion.average == average
    assert criterion.last_gamma == 0.5
    # Lambda is re-corrected with k = 2: 0.05 / (1 - 0.81).
    assert criterion.estimate == pytest.approx(0.05 / 0.19, rel=1e-15)


@pytest.mark.parametrize("min_steps", [2, 3, 10])
def test_a_constant_gamma_fires_exactly_at_min_steps(min_steps: int) -> None:
    # With gamma constant, Lambda_k = gamma for every k: only min_steps holds the test back.
    criterion = SwatsCriterion(beta2=0.999, threshold=1e-6, min_steps=min_steps)
    fired = run(criterion, [(0.02, -0.2)] * 12)
    assert fired.index(True) + 1 == min_steps
    assert all(fired[min_steps - 1 :])
    assert criterion.estimate == pytest.approx(0.1, rel=1e-12)


def test_a_negative_lambda_never_fires() -> None:
    # Ascent steps only: gamma = -0.1 agrees perfectly with Lambda = -0.1, but that is no
    # SGD learning rate.
    criterion = SwatsCriterion(beta2=0.999, threshold=0.5, min_steps=2)
    assert not any(run(criterion, [(0.01, 0.1)] * 30))
    assert criterion.estimate == pytest.approx(-0.1, rel=1e-12)


def test_the_threshold_is_relative_to_lambda() -> None:
    # gamma scaled by 1e3 (p.p scaled, p.g not) fires at the same steps with Lambda scaled by 1e3;
    # p.p and p.g scaled together leave gamma, and every decision, unchanged.
    sequence = scripted_sequence(3)
    base = SwatsCriterion()
    scaled_gamma = SwatsCriterion()
    scaled_both = SwatsCriterion()
    fired = run(base, sequence)
    assert any(fired)
    assert run(scaled_gamma, [(1e3 * pp, pg) for pp, pg in sequence]) == fired
    assert run(scaled_both, [(1e-6 * pp, 1e-6 * pg) for pp, pg in sequence]) == fired
    assert base.estimate is not None
    assert scaled_gamma.estimate == pytest.approx(1e3 * base.estimate, rel=1e-12)
    assert scaled_both.estimate == pytest.approx(base.estimate, rel=1e-12)


@pytest.mark.parametrize(("threshold", "fires"), [(0.2, False), (0.25, False), (0.3, True)])
def test_the_relative_gap_decides(threshold: float, fires: bool) -> None:
    # beta2 = 0.5, gamma_1 = 6, gamma_2 = 3 (all exact in binary): lambda_1 = 3,
    # lambda_2 = 0.5 * 3 + 0.5 * 3 = 3, Lambda_2 = 3 / (1 - 0.25) = 4,
    # |Lambda_2 - gamma_2| = 1 = 0.25 * Lambda_2: the test is strict, so 0.25 does not fire.
    criterion = SwatsCriterion(beta2=0.5, threshold=threshold, min_steps=2)
    assert criterion.update(6.0, -1.0) is False  # k = 1 < min_steps
    assert criterion.update(3.0, -1.0) is fires
    assert criterion.estimate == 4.0


# ------------------------------------------------------------------------------ checkpoints
def test_state_dict_round_trip_continues_identically() -> None:
    sequence = scripted_sequence(4)
    whole = SwatsCriterion(beta2=0.99, threshold=2e-2, min_steps=5)
    expected = run(whole, sequence)
    first = SwatsCriterion(beta2=0.99, threshold=2e-2, min_steps=5)
    head = run(first, sequence[:150])
    # A criterion built with the default beta2 takes the checkpoint's (the callback's
    # load_state_dict relies on it).
    resumed = SwatsCriterion(threshold=2e-2, min_steps=5)
    resumed.load_state_dict(first.state_dict())
    assert resumed.beta2 == 0.99
    tail = run(resumed, sequence[150:])
    assert head + tail == expected
    assert (resumed.steps, resumed.average, resumed.last_gamma) == (
        whole.steps,
        whole.average,
        whole.last_gamma,
    )


def test_fresh_state_round_trip() -> None:
    criterion = SwatsCriterion()
    other = SwatsCriterion(beta2=0.5)
    other.load_state_dict(criterion.state_dict())
    assert other == criterion
    assert other.estimate is None


# ------------------------------------------------------------ the bundled SWATS (global mode)
def _quadratic(seed: int) -> tuple[list[Tensor], list[Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    weights = [
        torch.randn(6, 4, generator=generator, dtype=torch.float64),
        torch.randn(7, generator=generator, dtype=torch.float64),
    ]
    targets = [torch.randn(w.shape, generator=generator, dtype=torch.float64) for w in weights]
    return [w.requires_grad_() for w in weights], targets


def _set_grads(params: list[Tensor], targets: list[Tensor], step: int, seed: int) -> None:
    # A curved objective with step-dependent noise: gamma jitters around a settling level.
    generator = torch.Generator().manual_seed(1000 * seed + step)
    for index, (p, target) in enumerate(zip(params, targets, strict=True)):
        noise = 0.3 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
        p.grad = (index + 1.0) * (p.detach() - target) + 0.05 * p.detach() ** 3 + noise


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("seed", [0, 1])
def test_fed_from_parameter_differences_it_switches_where_swats_does(
    seed: int, weight_decay: float
) -> None:
    # SWATS (global mode) on float64 parameters; the criterion gets p = theta_after -
    # theta_before and g = grad + wd * theta_before computed here, outside the optimizer.
    params, targets = _quadratic(seed)
    swats = SWATS(params, lr=1e-2, weight_decay=weight_decay, switch_threshold=5e-3)
    criterion = SwatsCriterion(beta2=0.999, threshold=5e-3, min_steps=10)
    for step in range(1, 600):
        _set_grads(params, targets, step, seed)
        before = [p.detach().clone() for p in params]
        grad = torch.cat(
            [(p.grad + weight_decay * b).reshape(-1) for p, b in zip(params, before, strict=True)]  # type: ignore[operator]
        )
        swats.step()
        move = torch.cat(
            [(p.detach() - b).reshape(-1) for p, b in zip(params, before, strict=True)]
        )
        fired = criterion.update(float(move @ move), float(move @ grad))
        assert fired == swats.switched, step
        if fired:
            break
    [status] = swats.switch_status()
    assert status.switched, "SWATS should switch on this problem"
    assert status.switch_step == criterion.steps == step
    assert 10 <= step < 599
    assert criterion.estimate == pytest.approx(status.lambda_estimate, rel=1e-9)
