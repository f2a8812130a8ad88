"""ScaledOperator ``S H S`` against dense eigenvalues of ``D H`` (``D = S^2``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from lightning_optdiag.curvature import ScaledOperator, SymmetricOperator, lanczos_eigenvalues
from tests.reference import DenseOperator, planted_matrix

N = 12


def random_scale(n: int, seed: int, zeros: int = 0) -> Tensor:
    """Positive entries spread over three orders of magnitude, like 1/sqrt(v) in Adam."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp(3.0 * torch.rand(n, generator=generator, dtype=torch.float64) - 1.5)
    scale[:zeros] = 0.0
    return scale


def spd_matrix(n: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    spectrum = torch.rand(n, generator=generator, dtype=torch.float64) * 5 + 0.1
    return planted_matrix(spectrum, seed=seed)


def indefinite_matrix(n: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    spectrum = torch.randn(n, generator=generator, dtype=torch.float64) * 3
    spectrum[0], spectrum[1] = 4.0, -6.0  # both signs for sure
    return planted_matrix(spectrum, seed=seed)


def dense_of(operator: ScaledOperator) -> Tensor:
    """The operator's matrix, column by column from matvec."""
    eye = torch.eye(operator.size, dtype=operator.dtype, device=operator.device)
    return torch.stack([operator.matvec(column) for column in eye], dim=1)


def sorted_real_eigenvalues_of_dh(matrix: Tensor, scale: Tensor) -> np.ndarray:
    """Eigenvalues of the non-symmetric ``diag(s^2) H`` by a general eigensolver (numpy)."""
    product = (scale.numpy() ** 2)[:, None] * matrix.numpy()
    eigenvalues = np.linalg.eigvals(product)
    assert np.max(np.abs(eigenvalues.imag)) < 1e-8 * np.max(np.abs(eigenvalues))
    return np.sort(eigenvalues.real)


@pytest.mark.parametrize("zeros", [0, 3])
@pytest.mark.parametrize("kind", ["spd", "indefinite"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eigenvalues_are_those_of_d_times_h(kind: str, seed: int, zeros: int) -> None:
    matrix = spd_matrix(N, seed) if kind == "spd" else indefinite_matrix(N, seed)
    scale = random_scale(N, seed + 10, zeros=zeros)
    operator = ScaledOperator(DenseOperator(matrix), scale)
    dense = dense_of(operator)
    torch.testing.assert_close(dense, dense.T, rtol=0, atol=1e-12)  # symmetric, unlike D H
    torch.testing.assert_close(dense, scale[:, None] * matrix * scale[None, :])
    expected = sorted_real_eigenvalues_of_dh(matrix, scale)
    actual = np.linalg.eigvalsh(dense.numpy())
    radius = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-9 * radius)
    # Scaling changes the spectrum (the check above is not comparing H with itself).
    assert not np.allclose(actual, np.linalg.eigvalsh(matrix.numpy()), atol=1e-3)
    if kind == "spd":
        assert np.all(actual[zeros:] > 0)  # congruence keeps definiteness on the support
        np.testing.assert_allclose(actual[:zeros], 0.0, atol=1e-12)
    else:
        assert actual[0] < 0 < actual[-1]


def test_unit_scale_is_the_operator_itself() -> None:
    matrix = indefinite_matrix(N, 5)
    operator = ScaledOperator(DenseOperator(matrix), torch.ones(N, dtype=torch.float64))
    torch.testing.assert_close(dense_of(operator), matrix, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["spd", "indefinite"])
def test_lanczos_on_the_scaled_operator_finds_the_dense_extremes(kind: str) -> None:
    n = 80
    matrix = spd_matrix(n, 7) if kind == "spd" else indefinite_matrix(n, 7)
    scale = random_scale(n, 8)
    expected = sorted_real_eigenvalues_of_dh(matrix, scale)
    operator = ScaledOperator(DenseOperator(matrix), scale)
    generator = torch.Generator().manual_seed(0)
    result = lanczos_eigenvalues(operator, k=1, which="both", tol=1e-6, generator=generator)
    radius = np.max(np.abs(expected))
    assert result.converged
    assert result.largest is not None
    assert result.smallest is not None
    assert float(result.largest[0]) == pytest.approx(expected[-1], abs=1e-5 * radius)
    assert float(result.smallest[0]) == pytest.approx(expected[0], abs=1e-5 * radius)
    # Not the unscaled answer.
    unscaled = np.linalg.eigvalsh(matrix.numpy())[-1]
    assert abs(expected[-1] - unscaled) > 1e-2 * radius


def test_float32_operator_gets_a_float32_scale() -> None:
    matrix = spd_matrix(N, 3)
    inner = DenseOperator(matrix.float())
    scale = random_scale(N, 4)  # float64, converted to the operator's dtype
    operator = ScaledOperator(inner, scale)
    vector = torch.randn(N, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    out = operator.matvec(vector)
    assert out.dtype == torch.float32
    expected = scale * (matrix @ (scale * vector.double()))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_size_dtype_and_device_pass_through() -> None:
    inner = DenseOperator(spd_matrix(N, 0).float())
    operator = ScaledOperator(inner, torch.ones(N))
    assert operator.size == inner.size == N
    assert operator.dtype == inner.dtype == torch.float32
    assert operator.device == inner.device
    assert isinstance(operator, SymmetricOperator)
    operator.matvec(torch.ones(N))
    assert inner.num_hvps == 1  # one product of H per product of S H S


def test_the_scale_is_detached_from_autograd() -> None:
    scale = random_scale(N, 1).requires_grad_(True)
    operator = ScaledOperator(DenseOperator(spd_matrix(N, 1)), scale)
    out = operator.matvec(torch.ones(N, dtype=torch.float64))
    assert not out.requires_grad


@pytest.mark.parametrize(
    ("scale", "error"),
    [
        (torch.ones(N - 1, dtype=torch.float64), ValueError),
        (torch.ones(N + 1, dtype=torch.float64), ValueError),
        (torch.ones(1, N, dtype=torch.float64), ValueError),
        (torch.ones(N, 1, dtype=torch.float64), ValueError),
        (torch.tensor(1.0, dtype=torch.float64), ValueError),
        (torch.cat([torch.ones(N - 1), torch.tensor([-0.1])]).double(), ValueError),
        (torch.cat([torch.ones(N - 1), torch.tensor([math.nan])]).double(), ValueError),
        (torch.cat([torch.ones(N - 1), torch.tensor([math.inf])]).double(), ValueError),
        ([1.0] * N, TypeError),
        (np.ones(N), TypeError),
        (None, TypeError),
    ],
    ids=[
        "short",
        "long",
        "row",
        "column",
        "scalar",
        "negative",
        "nan",
        "inf",
        "list",
        "numpy",
        "none",
    ],
)
def test_invalid_scales_are_rejected(scale: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="Invalid scale"):
        ScaledOperator(DenseOperator(spd_matrix(N, 0)), scale)  # type: ignore[arg-type]
