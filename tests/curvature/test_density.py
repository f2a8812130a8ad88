"""Stochastic Lanczos quadrature against exact spectra and quadrature identities."""

from __future__ import annotations

import pytest
import torch

from lightning_optdiag.curvature import estimate_spectral_density, spectral_density
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


@pytest.fixture(scope="module")
def mlp_hessian() -> torch.Tensor:
    return dense_hessian(small_mlp(), cross_entropy_loss, classification_batch())


def test_weights_sum_to_one_and_nodes_lie_in_the_spectrum(mlp_hessian) -> None:
    density = spectral_density(
        small_mlp(), cross_entropy_loss, classification_batch(), num_probes=3, num_steps=20
    )
    exact = torch.linalg.eigvalsh(mlp_hessian)
    assert float(density.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool((density.weights >= 0).all())
    # Ritz values interlace: they never leave [lambda_min, lambda_max].
    assert float(density.nodes.min()) >= float(exact[0]) - 1e-10
    assert float(density.nodes.max()) <= float(exact[-1]) + 1e-10
    assert density.num_hvps == 60
    assert density.size == mlp_hessian.shape[0]
    assert density.moment(0) == pytest.approx(1.0, abs=1e-12)


def test_quadrature_is_exact_for_low_degree_polynomials() -> None:
    # For one probe v and m steps, sum_i tau_i theta_i^p = v^T A^p v / v^T v for p < 2m.
    matrix = planted_matrix(torch.linspace(-2.0, 5.0, 80, dtype=torch.float64), seed=5)
    operator = DenseOperator(matrix)
    steps = 6
    density = estimate_spectral_density(
        operator, num_probes=1, num_steps=steps, generator=seeded(1)
    )
    probe = operator.applied[0]  # the first product is applied to the normalised probe
    assert bool(torch.all(probe.abs() == probe.abs()[0]))  # a scaled sign vector
    power = probe.clone()
    for order in range(1, 2 * steps):
        power = matrix @ power
        assert density.moment(order) == pytest.approx(float(probe @ power), rel=1e-9, abs=1e-9)


def test_moments_match_the_dense_spectrum(mlp_hessian) -> None:
    n = mlp_hessian.shape[0]
    model, batch = small_mlp(), classification_batch()
    per_probe = [
        spectral_density(
            model, cross_entropy_loss, batch, num_probes=1, num_steps=12, generator=seeded(s)
        )
        for s in range(24)
    ]
    for order, exact in [
        (1, float(torch.trace(mlp_hessian)) / n),
        (2, float(torch.trace(mlp_hessian @ mlp_hessian)) / n),
    ]:
        samples = torch.tensor([d.moment(order) for d in per_probe], dtype=torch.float64)
        standard_error = float(samples.std()) / len(per_probe) ** 0.5
        assert abs(float(samples.mean()) - exact) <= 4 * standard_error


def test_full_length_run_recovers_the_spectrum() -> None:
    spectrum = torch.tensor([-1.0, 0.5, 2.0, 4.0, 7.5], dtype=torch.float64)
    density = estimate_spectral_density(
        DenseOperator(planted_matrix(spectrum)), num_probes=2, num_steps=5
    )
    visible = density.nodes[density.weights > 1e-12]
    for node in visible:
        assert float((spectrum - node).abs().min()) < 1e-10
    for order in (1, 2, 3):
        assert density.moment(order) == pytest.approx(float((spectrum**order).mean()), rel=0.5)


def test_smoothed_density_integrates_to_one(mlp_hessian) -> None:
    density = spectral_density(
        small_mlp(), cross_entropy_loss, classification_batch(), num_probes=2, num_steps=15
    )
    points, values = density.grid(num_points=4000)
    assert float(torch.trapezoid(values, points)) == pytest.approx(1.0, abs=1e-3)
    wider = density.evaluate(points, sigma=5 * density.default_sigma())
    assert float(torch.trapezoid(wider, points)) == pytest.approx(1.0, abs=2e-2)
    assert bool((values >= 0).all())


def test_density_peaks_at_an_isolated_eigenvalue_cluster() -> None:
    spectrum = torch.cat([torch.zeros(150), torch.full((50,), 4.0)]).double()
    spectrum = spectrum + 0.01 * torch.randn(200, generator=seeded(0), dtype=torch.float64)
    density = estimate_spectral_density(
        DenseOperator(planted_matrix(spectrum)), num_probes=8, num_steps=20
    )
    near = density.evaluate(torch.tensor([0.0, 2.0, 4.0]), sigma=0.1)
    assert float(near[0]) > 10 * float(near[1])
    assert float(near[2]) > 10 * float(near[1])
    assert float(near[0]) > float(near[2])  # three times as many eigenvalues near 0
    mass_high = float(density.weights[density.nodes > 2.0].sum())
    assert mass_high == pytest.approx(0.25, abs=0.1)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"num_probes": 0}, ValueError, r"Invalid num_probes: 0 \(expected an integer >= 1\)"),
        ({"num_steps": -2}, ValueError, r"Invalid num_steps: -2"),
        ({"num_steps": "10"}, TypeError, r"Invalid num_steps: '10'"),
        ({"generator": 1}, TypeError, r"Invalid generator: 1"),
    ],
)
def test_bad_arguments_are_refused_clearly(kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        spectral_density(small_mlp(), cross_entropy_loss, classification_batch(), **kwargs)


def test_bad_evaluation_arguments_are_refused() -> None:
    density = estimate_spectral_density(
        DenseOperator(torch.eye(4, dtype=torch.float64)), num_steps=2
    )
    with pytest.raises(ValueError, match=r"Invalid sigma: 0.0"):
        density.evaluate(torch.zeros(3), sigma=0.0)
    with pytest.raises(ValueError, match=r"Invalid num_points: 1"):
        density.grid(num_points=1)
