"""The Lanczos process with full reorthogonalisation, shared by the eigenvalue and density code."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor

from lightning_optdiag.curvature.operator import SymmetricOperator

DEFAULT_SEED = 0
"""Seed of the generator used when none is given: identical on every process and device."""

# An off-diagonal below this multiple of eps * ||T|| means the Krylov space is (numerically)
# invariant: the next basis vector would be rounding noise.
_BREAKDOWN_FACTOR = 100.0
_INITIAL_ROWS = 16


def default_generator(generator: torch.Generator | None) -> torch.Generator:
    """Return ``generator``, or a CPU generator seeded with :data:`DEFAULT_SEED`."""
    return torch.Generator().manual_seed(DEFAULT_SEED) if generator is None else generator


def random_gaussian(
    size: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Standard normal vector drawn on the generator's device, then moved to ``device``.

    Drawing where the generator lives keeps the draws identical across processes and devices.
    """
    return torch.randn(size, generator=generator, device=generator.device, dtype=dtype).to(device)


def random_rademacher(
    shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Tensor of independent random signs (+1/-1), drawn like :func:`random_gaussian`."""
    bits = torch.randint(0, 2, shape, generator=generator, device=generator.device)
    return (bits * 2 - 1).to(device=device, dtype=dtype)


@dataclass
class RitzPairs:
    """Eigen-decomposition of the Lanczos tridiagonal matrix ``T_m``.

    Attributes:
        values: Ritz values, ascending, shape ``(m,)`` (float64, NumPy).
        vectors: eigenvectors of ``T_m`` as columns, shape ``(m, m)``.
        residuals: Ritz residual norms ``||H y - theta y|| = beta_m |s_m|``, shape ``(m,)``.
    """

    values: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray


class LanczosProcess:
    """Builds an orthonormal Krylov basis ``Q`` and tridiagonal ``T`` with ``Q^T H Q = T``.

    Every new vector is orthogonalised twice against the whole basis (classical Gram-Schmidt
    twice), which keeps the basis orthonormal to working precision and rules out the spurious
    copies of converged eigenvalues that plain Lanczos produces.

    Args:
        operator: the symmetric operator.
        start: the start vector (any non-zero norm).
        capacity: largest basis size that will be needed (at most ``operator.size``).
        generator: source of restart vectors after a breakdown.
    """

    def __init__(
        self,
        operator: SymmetricOperator,
        start: Tensor,
        capacity: int,
        generator: torch.Generator,
    ) -> None:
        self._operator = operator
        self._generator = generator
        self._capacity = min(capacity, operator.size)
        # Rows are allocated as the basis grows: most runs stop long before their capacity, and
        # each row is as large as the model.
        self.basis = torch.empty(
            (min(_INITIAL_ROWS, self._capacity), operator.size),
            dtype=operator.dtype,
            device=operator.device,
        )
        self.basis[0] = start / torch.linalg.vector_norm(start)
        self.alphas: list[float] = []
        # betas[j] couples basis vector j to j + 1; the last entry is the current residual norm.
        self.betas: list[float] = []
        self._scale = 0.0
        # First step of each block of T; a new block starts at every restart.
        self.block_starts = [0]

    @property
    def steps(self) -> int:
        """Number of Lanczos steps taken so far, equal to the number of products."""
        return len(self.alphas)

    def step(self, *, restart_on_breakdown: bool) -> bool:
        """Take one step (one product). Return whether another step is possible.

        On a breakdown (the Krylov space is invariant), either stop or, with
        ``restart_on_breakdown``, continue from a random vector orthogonal to the basis, which
        starts a new block of ``T`` (a zero off-diagonal). From a start vector with a random
        share, a breakdown means every distinct eigenvalue has been found; restarts then
        uncover further copies of repeated eigenvalues.
        """
        j = self.steps
        q = self.basis[j]
        w = self._operator.matvec(q)
        alpha = torch.dot(q, w)
        w = w - alpha * q
        if j > 0:
            w = w - self.betas[-1] * self.basis[j - 1]
        w = self._orthogonalize(w, j + 1)
        beta = torch.linalg.vector_norm(w)
        alpha_value, beta_value = torch.stack([alpha, beta]).tolist()  # one sync per step
        self.alphas.append(alpha_value)
        self._scale = max(self._scale, abs(alpha_value) + beta_value)
        if j + 1 >= self._capacity:
            self.betas.append(beta_value)
            return False
        eps = torch.finfo(self._operator.dtype).eps
        if beta_value > _BREAKDOWN_FACTOR * eps * self._scale:
            self.betas.append(beta_value)
            self._set_row(j + 1, w / beta_value)
            return True
        self.betas.append(0.0)
        return restart_on_breakdown and self._restart(j + 1)

    def ritz_pairs(self, first: int = 0, last: int | None = None) -> RitzPairs:
        """Eigen-decompose ``T_m`` (or its steps ``first:last``) with
        :func:`scipy.linalg.eigh_tridiagonal`.

        A block between two restarts is the Lanczos run on the orthogonal complement of
        everything found before it.
        """
        last = self.steps if last is None else last
        diagonal = np.asarray(self.alphas[first:last], dtype=np.float64)
        off_diagonal = np.asarray(self.betas[first : last - 1], dtype=np.float64)
        values, vectors = eigh_tridiagonal(diagonal, off_diagonal)
        residuals = np.abs(self.betas[last - 1] * vectors[-1, :])
        return RitzPairs(values=values, vectors=vectors, residuals=residuals)

    def ritz_vectors(self, coefficients: np.ndarray) -> Tensor:
        """Map eigenvectors of ``T_m`` (columns of ``coefficients``) to rows ``y = Q s``."""
        weights = torch.as_tensor(coefficients.T, dtype=self.basis.dtype, device=self.basis.device)
        return weights @ self.basis[: self.steps]

    def _set_row(self, index: int, vector: Tensor) -> None:
        if index >= self.basis.shape[0]:
            rows = min(2 * self.basis.shape[0], self._capacity)
            grown = self.basis.new_empty((rows, self.basis.shape[1]))
            grown[:index] = self.basis[:index]
            self.basis = grown
        self.basis[index] = vector

    def _orthogonalize(self, vector: Tensor, count: int) -> Tensor:
        basis = self.basis[:count]
        for _ in range(2):
            vector = vector - basis.T @ (basis @ vector)
        return vector

    def _restart(self, index: int) -> bool:
        operator = self._operator
        fresh = random_gaussian(operator.size, self._generator, operator.dtype, operator.device)
        fresh = self._orthogonalize(fresh / torch.linalg.vector_norm(fresh), index)
        norm = float(torch.linalg.vector_norm(fresh))
        if norm <= 1e-3:  # the basis already spans (numerically) the whole space
            return False
        self._set_row(index, fresh / norm)
        self.block_starts.append(index)
        return True
