"""Lanczos eigenvalues against dense Hessians, planted spectra and SciPy's ARPACK."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_optdiag.curvature import (
    HessianOperator,
    hessian_eigenvalues,
    lanczos_eigenvalues,
)
from tests.reference import (
    DenseOperator,
    Quadratic,
    classification_batch,
    cross_entropy_loss,
    dense_hessian,
    mse_loss,
    planted_matrix,
    quadratic_loss,
    small_mlp,
)

TOL = 1e-3


@pytest.fixture(scope="module")
def mlp_problem() -> tuple[nn.Module, tuple[Tensor, Tensor], Tensor]:
    model = small_mlp()
    batch = classification_batch()
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy_loss, batch))
    return model, batch, eigenvalues


def planted_spectrum(n: int = 300, seed: int = 0) -> Tensor:
    """A neural-net-like spectrum: a few positive outliers, a bulk near zero, a negative tail."""
    generator = torch.Generator().manual_seed(seed)
    bulk = 0.05 * torch.randn(n - 6, generator=generator, dtype=torch.float64)
    return torch.cat(
        [torch.tensor([10.0, 7.0, 5.5, -3.0, -2.2], dtype=torch.float64), bulk, torch.tensor([1.0])]
    )


@pytest.mark.parametrize("k", [1, 3])
def test_mlp_both_ends_match_dense_hessian(mlp_problem, k: int) -> None:
    model, batch, exact = mlp_problem
    result = hessian_eigenvalues(model, cross_entropy_loss, batch, k=k, which="both", tol=TOL)
    radius = float(exact.abs().max())
    assert result.converged
    torch.testing.assert_close(result.largest, exact.flip(0)[:k], atol=TOL * radius, rtol=0)
    torch.testing.assert_close(result.smallest, exact[:k], atol=TOL * radius, rtol=0)
    assert torch.all(result.largest[:-1] >= result.largest[1:])
    assert torch.all(result.smallest[:-1] <= result.smallest[1:])
    assert result.num_hvps < exact.numel()
    assert result.spectral_radius == pytest.approx(radius, rel=TOL)


def test_reported_residuals_are_the_true_residuals(mlp_problem) -> None:
    model, batch, exact = mlp_problem
    matrix = dense_hessian(model, cross_entropy_loss, batch)
    result = hessian_eigenvalues(model, cross_entropy_loss, batch, k=2, which="both", tol=TOL)
    radius = float(exact.abs().max())
    pairs = [
        (result.largest, result.largest_vectors, result.largest_residuals),
        (result.smallest, result.smallest_vectors, result.smallest_residuals),
    ]
    for values, vectors, residuals in pairs:
        for value, vector, reported in zip(values, vectors, residuals, strict=True):
            assert float(vector.norm()) == pytest.approx(1.0, abs=1e-10)
            true_residual = float((matrix @ vector - value * vector).norm())
            assert true_residual == pytest.approx(float(reported), abs=1e-9 * radius)
            # A residual bounds the distance to the nearest eigenvalue.
            nearest = float((exact - value).abs().min())
            assert nearest <= float(reported) + 1e-12 * radius


def test_planted_spectrum_top_and_bottom_k() -> None:
    spectrum = planted_spectrum()
    model = Quadratic(planted_matrix(spectrum))
    exact = torch.sort(spectrum).values
    result = hessian_eigenvalues(model, quadratic_loss, None, k=4, which="both", tol=TOL)
    radius = float(exact.abs().max())
    assert result.converged
    torch.testing.assert_close(result.largest, exact.flip(0)[:4], atol=TOL * radius, rtol=0)
    torch.testing.assert_close(result.smallest, exact[:4], atol=TOL * radius, rtol=0)


def test_float32_model_meets_the_tolerance() -> None:
    spectrum = planted_spectrum(seed=3)
    model = Quadratic(planted_matrix(spectrum, seed=3), dtype=torch.float32)
    exact = torch.sort(spectrum).values
    result = hessian_eigenvalues(model, quadratic_loss, None, k=2, which="both", tol=TOL)
    assert result.largest_vectors is not None
    assert result.largest_vectors.dtype == torch.float32
    radius = float(exact.abs().max())
    torch.testing.assert_close(result.largest, exact.flip(0)[:2], atol=TOL * radius, rtol=0)
    torch.testing.assert_close(result.smallest, exact[:2], atol=TOL * radius, rtol=0)


@pytest.mark.parametrize(("which", "scipy_which"), [("largest", "LA"), ("smallest", "SA")])
def test_agrees_with_scipy_eigsh(mlp_problem, which: str, scipy_which: str) -> None:
    model, batch, exact = mlp_problem
    radius = float(exact.abs().max())
    with HessianOperator(model, cross_entropy_loss, batch) as operator:
        reference = scipy.sparse.linalg.eigsh(
            operator.as_linear_operator(),
            k=2,
            which=scipy_which,
            tol=1e-10,
            return_eigenvectors=False,
        )
        result = hessian_eigenvalues(model, cross_entropy_loss, batch, k=2, which=which, tol=TOL)
    ours = result.largest if which == "largest" else result.smallest
    assert ours is not None
    expected = np.sort(reference)[::-1] if which == "largest" else np.sort(reference)
    np.testing.assert_allclose(ours.numpy(), expected, atol=TOL * radius, rtol=0)


def test_unrequested_end_is_not_reported(mlp_problem) -> None:
    model, batch, _ = mlp_problem
    largest = hessian_eigenvalues(model, cross_entropy_loss, batch, which="largest")
    smallest = hessian_eigenvalues(model, cross_entropy_loss, batch, which="smallest")
    assert largest.smallest is None
    assert largest.smallest_vectors is None
    assert largest.largest is not None
    assert smallest.largest is None
    assert smallest.largest_residuals is None
    assert smallest.smallest is not None


def test_largest_alone_needs_fewer_products_than_both(mlp_problem) -> None:
    model, batch, _ = mlp_problem
    largest = hessian_eigenvalues(model, cross_entropy_loss, batch, which="largest")
    both = hessian_eigenvalues(model, cross_entropy_loss, batch, which="both")
    assert largest.num_hvps <= both.num_hvps


def test_strict_saddle_of_a_two_layer_linear_network() -> None:
    # f(x) = W2 W1 x near the origin: the Hessian of the squared loss is indefinite with
    # eigenvalues +-sigma_i of the input-output cross-covariance: a strict saddle.
    torch.manual_seed(0)
    inputs = torch.randn(128, 4, dtype=torch.float64)
    targets = inputs @ torch.randn(4, 3, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(5, 3, bias=False)).double()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1e-3)
    batch = (inputs, targets)
    result = hessian_eigenvalues(model, mse_loss, batch, which="both", tol=TOL)
    exact = torch.linalg.eigvalsh(dense_hessian(model, mse_loss, batch))
    assert result.smallest is not None
    assert result.largest is not None
    assert float(result.smallest[0]) < -0.5 * float(result.largest[0])
    radius = float(exact.abs().max())
    assert float(result.smallest[0]) == pytest.approx(float(exact[0]), abs=TOL * radius)


def test_convex_logistic_regression_at_its_minimum_has_no_negative_curvature() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(200, 5, generator=generator, dtype=torch.float64)
    labels = (inputs @ torch.randn(5, generator=generator, dtype=torch.float64) > 0).double()
    labels = torch.where(torch.rand(200, generator=generator) < 0.2, 1 - labels, labels)
    model = nn.Linear(5, 1).double()

    def loss_fn(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        logits = module(batch[0]).squeeze(-1)
        return nn.functional.binary_cross_entropy_with_logits(logits, batch[1])

    optimizer = torch.optim.LBFGS(
        model.parameters(),
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn(model, (inputs, labels))
        loss.backward()
        return loss

    optimizer.step(closure)
    batch = (inputs, labels)
    gradient = torch.autograd.grad(loss_fn(model, batch), list(model.parameters()))
    assert max(float(g.abs().max()) for g in gradient) < 1e-8  # at the minimum
    result = hessian_eigenvalues(model, loss_fn, batch, which="both", tol=TOL)
    exact = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batch))
    assert float(exact[0]) > 0
    assert result.smallest is not None
    assert float(result.smallest[0]) >= -TOL * result.spectral_radius
    assert float(result.smallest[0]) == pytest.approx(
        float(exact[0]), abs=TOL * result.spectral_radius
    )


@pytest.mark.parametrize(("which", "budget"), [("largest", 2), ("both", 3)])
def test_warm_start_from_the_exact_eigenvectors_converges_at_once(which: str, budget: int) -> None:
    spectrum = planted_spectrum()
    model = Quadratic(planted_matrix(spectrum))
    cold = hessian_eigenvalues(model, quadratic_loss, None, which=which, tol=TOL)
    warm = hessian_eigenvalues(
        model, quadratic_loss, None, which=which, tol=TOL, v0=cold.warm_start()
    )
    assert warm.converged
    assert warm.num_hvps <= budget < cold.num_hvps
    radius = float(spectrum.abs().max())
    assert float(warm.largest[0]) == pytest.approx(float(spectrum.max()), abs=TOL * radius)
    if which == "both":
        assert float(warm.smallest[0]) == pytest.approx(float(spectrum.min()), abs=TOL * radius)


def test_warm_start_after_a_perturbation_is_cheaper_than_a_cold_start() -> None:
    spectrum = planted_spectrum()
    matrix = planted_matrix(spectrum)
    before = hessian_eigenvalues(Quadratic(matrix), quadratic_loss, None, which="both", tol=TOL)
    noise = planted_matrix(torch.randn(spectrum.numel(), dtype=torch.float64), seed=7)
    after_model = Quadratic(matrix + 0.01 * noise)
    cold = hessian_eigenvalues(after_model, quadratic_loss, None, which="both", tol=TOL)
    warm = hessian_eigenvalues(
        after_model, quadratic_loss, None, which="both", tol=TOL, v0=before.warm_start()
    )
    assert warm.converged
    assert cold.converged
    assert warm.num_hvps < cold.num_hvps
    radius = cold.spectral_radius
    torch.testing.assert_close(warm.largest, cold.largest, atol=2 * TOL * radius, rtol=0)
    torch.testing.assert_close(warm.smallest, cold.smallest, atol=2 * TOL * radius, rtol=0)


def test_repeated_eigenvalues_are_found_through_restarts() -> None:
    # Three distinct eigenvalues: every Krylov space closes after three products; each restart
    # from a random vector orthogonal to the basis uncovers one more copy of each.
    spectrum = torch.cat([torch.full((3,), 5.0), torch.full((2,), -2.0), torch.zeros(95)]).double()
    operator = DenseOperator(planted_matrix(spectrum))
    result = lanczos_eigenvalues(operator, k=3, which="both", tol=TOL)
    assert result.converged
    torch.testing.assert_close(result.largest, torch.full((3,), 5.0).double(), atol=1e-8, rtol=0)
    torch.testing.assert_close(
        result.smallest, torch.tensor([-2.0, -2.0, 0.0]).double(), atol=1e-8, rtol=0
    )
    assert operator.num_hvps == result.num_hvps <= 12


def test_tiny_problem_is_solved_exactly() -> None:
    spectrum = torch.tensor([-1.5, 0.25, 2.0], dtype=torch.float64)
    model = Quadratic(planted_matrix(spectrum))
    result = hessian_eigenvalues(model, quadratic_loss, None, k=3, which="both", tol=0.0)
    assert result.num_hvps == 3
    torch.testing.assert_close(result.largest, spectrum.flip(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(result.smallest, spectrum, atol=1e-12, rtol=0)


def test_budget_exhaustion_reports_not_converged_with_honest_residuals() -> None:
    spectrum = planted_spectrum()
    matrix = planted_matrix(spectrum)
    result = lanczos_eigenvalues(DenseOperator(matrix), which="smallest", tol=1e-12, max_hvps=4)
    assert result.num_hvps == 4
    assert not result.converged
    assert result.smallest_vectors is not None
    assert result.smallest is not None
    vector, value = result.smallest_vectors[0], result.smallest[0]
    true_residual = float((matrix @ vector - value * vector).norm())
    assert true_residual == pytest.approx(float(result.smallest_residuals[0]), rel=1e-6)
    assert true_residual > 1e-12 * result.spectral_radius


def test_zero_tolerance_spends_the_whole_budget() -> None:
    operator = DenseOperator(planted_matrix(planted_spectrum()))
    result = lanczos_eigenvalues(operator, which="largest", tol=0.0, max_hvps=25)
    assert result.num_hvps == operator.num_hvps == 25


def test_zero_hessian_of_a_linear_loss() -> None:
    model = nn.Linear(3, 1).double()

    def linear_loss(module: nn.Module, batch: Tensor) -> Tensor:
        return module(batch).sum()

    result = hessian_eigenvalues(model, linear_loss, torch.ones(2, 3, dtype=torch.float64))
    assert result.converged
    assert result.spectral_radius == 0.0
    assert float(result.largest[0]) == 0.0
    assert float(result.smallest[0]) == 0.0


def test_same_seed_gives_identical_results(mlp_problem) -> None:
    model, batch, _ = mlp_problem
    first = hessian_eigenvalues(model, cross_entropy_loss, batch)
    second = hessian_eigenvalues(model, cross_entropy_loss, batch)
    seeded = hessian_eigenvalues(
        model, cross_entropy_loss, batch, generator=torch.Generator().manual_seed(0)
    )
    other = hessian_eigenvalues(
        model, cross_entropy_loss, batch, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(first.largest, second.largest)
    assert first.num_hvps == second.num_hvps
    assert torch.equal(first.largest, seeded.largest)
    assert not torch.equal(first.ritz_values, other.ritz_values)


def test_parameter_subset_matches_the_dense_sub_block(mlp_problem) -> None:
    model, batch, _ = mlp_problem
    names = ["2.weight", "2.bias"]
    exact = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy_loss, batch, names))
    result = hessian_eigenvalues(model, cross_entropy_loss, batch, params="2", which="both")
    radius = float(exact.abs().max())
    assert float(result.largest[0]) == pytest.approx(float(exact[-1]), abs=TOL * radius)
    assert float(result.smallest[0]) == pytest.approx(float(exact[0]), abs=TOL * radius)
    assert result.largest_vectors.shape == (1, exact.numel())


# --------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"k": 0}, ValueError, r"Invalid k: 0 \(expected an integer in \[1, 435\]\)"),
        ({"k": 436}, ValueError, r"Invalid k: 436"),
        ({"k": 1.5}, TypeError, r"Invalid k: 1.5 \(expected an integer"),
        ({"k": True}, TypeError, r"Invalid k: True"),
        ({"which": "top"}, ValueError, r"Invalid which: 'top' \(expected one of 'both'"),
        ({"tol": -1e-3}, ValueError, r"Invalid tol: -0.001"),
        ({"tol": math.nan}, ValueError, r"Invalid tol: nan"),
        ({"max_hvps": 0}, ValueError, r"Invalid max_hvps: 0"),
        ({"k": 3, "max_hvps": 2}, ValueError, r"Invalid max_hvps: 2 \(expected an integer >= 3\)"),
        ({"generator": 0}, TypeError, r"Invalid generator: 0 \(expected a torch.Generator"),
        ({"v0": torch.ones(7)}, ValueError, r"Invalid v0: shape \(7,\) \(expected \(435,\)"),
        ({"v0": torch.full((435,), math.nan)}, ValueError, r"Invalid v0: .*NaN"),
        ({"v0": torch.zeros(435)}, ValueError, r"Invalid v0: .*zero"),
        ({"v0": [1.0, 2.0]}, TypeError, r"Invalid v0: expected a tensor"),
    ],
)
def test_bad_arguments_are_refused_clearly(mlp_problem, kwargs, error, pattern) -> None:
    model, batch, _ = mlp_problem
    with pytest.raises(error, match=pattern):
        hessian_eigenvalues(model, cross_entropy_loss, batch, **kwargs)


@settings(max_examples=30, deadline=None)
@given(k=st.one_of(st.integers(max_value=0), st.integers(min_value=301)))
def test_any_k_outside_one_to_n_is_refused(k: int) -> None:
    operator = DenseOperator(torch.eye(300, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"Invalid k: {k} \(expected an integer in \[1, 300\]\)"):
        lanczos_eigenvalues(operator, k=k)
    assert operator.num_hvps == 0


def test_bad_arguments_are_refused_before_any_forward_pass() -> None:
    calls = []

    def counting_loss(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        calls.append(1)
        return cross_entropy_loss(module, batch)

    with pytest.raises(ValueError, match="Invalid which"):
        hessian_eigenvalues(small_mlp(), counting_loss, classification_batch(), which="middle")
    assert calls == []


def test_operator_that_is_not_an_operator_is_refused() -> None:
    with pytest.raises(TypeError, match="Invalid operator: Tensor"):
        lanczos_eigenvalues(torch.eye(3))  # type: ignore[arg-type]
