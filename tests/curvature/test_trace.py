"""Hutch++ and Hutchinson trace estimates against exact traces."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_optdiag.curvature import estimate_trace, hessian_trace
from tests.reference import (
    DenseOperator,
    classification_batch,
    cross_entropy_loss,
    dense_hessian,
    planted_matrix,
    small_mlp,
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def outlier_spectrum(n: int = 200) -> torch.Tensor:
    """A few large eigenvalues over a small bulk: what Hutch++ is built for."""
    bulk = 0.01 * torch.randn(n - 5, generator=seeded(11), dtype=torch.float64)
    return torch.cat([torch.tensor([40.0, 25.0, 12.0, -8.0, 5.0], dtype=torch.float64), bulk])


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_mlp_trace_within_three_standard_errors(method: str) -> None:
    model, batch = small_mlp(), classification_batch()
    exact = float(torch.trace(dense_hessian(model, cross_entropy_loss, batch)))
    estimate = hessian_trace(model, cross_entropy_loss, batch, num_hvps=60, method=method)
    assert estimate.num_hvps == 60
    assert estimate.method == method
    assert estimate.standard_error > 0
    assert abs(estimate.value - exact) <= 3 * estimate.standard_error


def test_hutchinson_standard_error_is_calibrated() -> None:
    # Over many independent runs: the spread of the estimates matches the theoretical variance
    # 2 (||A||_F^2 - sum A_ii^2) / m, and +-2 reported standard errors cover the truth ~95%.
    matrix = planted_matrix(torch.linspace(-1.0, 3.0, 60, dtype=torch.float64), seed=4)
    exact = float(torch.trace(matrix))
    num_hvps, runs = 10, 300
    estimates = [
        estimate_trace(
            DenseOperator(matrix), num_hvps=num_hvps, method="hutchinson", generator=seeded(s)
        )
        for s in range(runs)
    ]
    values = torch.tensor([e.value for e in estimates], dtype=torch.float64)
    theory = math.sqrt(
        2 * (float((matrix**2).sum()) - float((matrix.diag() ** 2).sum())) / num_hvps
    )
    assert float(values.std()) == pytest.approx(theory, rel=0.15)
    covered = sum(abs(e.value - exact) <= 2 * e.standard_error for e in estimates) / runs
    assert 0.85 <= covered <= 0.99


def test_hutch_plus_plus_beats_hutchinson_on_an_outlier_spectrum() -> None:
    matrix = planted_matrix(outlier_spectrum(), seed=2)
    exact = float(torch.trace(matrix))

    def mean_squared_error(method: str) -> float:
        errors = [
            estimate_trace(
                DenseOperator(matrix), num_hvps=30, method=method, generator=seeded(s)
            ).value
            - exact
            for s in range(40)
        ]
        return sum(error**2 for error in errors) / len(errors)

    assert mean_squared_error("hutch++") < 0.05 * mean_squared_error("hutchinson")


def test_hutch_plus_plus_standard_error_covers_the_truth() -> None:
    matrix = planted_matrix(outlier_spectrum(), seed=3)
    exact = float(torch.trace(matrix))
    estimates = [
        estimate_trace(DenseOperator(matrix), num_hvps=30, generator=seeded(s)) for s in range(100)
    ]
    covered = sum(abs(e.value - exact) <= 3 * e.standard_error for e in estimates) / len(estimates)
    assert covered >= 0.9


def test_hutch_plus_plus_is_exact_when_the_sketch_spans_the_space() -> None:
    matrix = planted_matrix(torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64))
    operator = DenseOperator(matrix)
    estimate = estimate_trace(operator, num_hvps=12)
    assert estimate.value == pytest.approx(float(torch.trace(matrix)), abs=1e-12)
    assert estimate.standard_error == pytest.approx(0.0, abs=1e-12)
    assert operator.num_hvps == estimate.num_hvps == 12


def test_budget_is_spent_exactly() -> None:
    operator = DenseOperator(planted_matrix(outlier_spectrum()))
    estimate_trace(operator, num_hvps=31, method="hutch++")
    assert operator.num_hvps == 31


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (
            {"method": "exact"},
            ValueError,
            r"Invalid method: 'exact' \(expected one of 'hutch\+\+', 'hutchinson'\)",
        ),
        ({"num_hvps": 5}, ValueError, r"Invalid num_hvps: 5 \(expected an integer >= 6\)"),
        (
            {"num_hvps": 1, "method": "hutchinson"},
            ValueError,
            r"Invalid num_hvps: 1 \(expected an integer >= 2\)",
        ),
        ({"num_hvps": 10.0}, TypeError, r"Invalid num_hvps: 10.0"),
        ({"generator": "seed"}, TypeError, r"Invalid generator: 'seed'"),
    ],
)
def test_bad_arguments_are_refused_clearly(kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        hessian_trace(small_mlp(), cross_entropy_loss, classification_batch(), **kwargs)
