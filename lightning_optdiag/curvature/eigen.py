"""Extreme Hessian eigenvalues by the Lanczos method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_optdiag._validation import check_choice, check_float, check_generator, check_int
from lightning_optdiag.curvature._krylov import (
    LanczosProcess,
    RitzPairs,
    default_generator,
    random_gaussian,
)
from lightning_optdiag.curvature.operator import (
    HessianOperator,
    HvpReduce,
    LossFn,
    ParamSelection,
    SymmetricOperator,
    select_parameters,
)

__all__ = ["EigenResult", "hessian_eigenvalues", "lanczos_eigenvalues"]

WHICH = ("both", "largest", "smallest")
DEFAULT_MAX_HVPS = 100
# Share of a random direction mixed into warm starts, so that an eigenvector absent from v0 (a new
# outlier) is still reachable; small enough to cost at most a step or two.
WARM_START_NOISE = 1e-2


@dataclass(frozen=True)
class EigenResult:
    """Extreme eigenvalues of a symmetric operator, with their Ritz vectors and error bounds.

    Eigenvalue tensors are float64 on the CPU; Ritz vectors are rows on the operator's device.
    Each residual ``r = ||H y - theta y||`` bounds the distance from ``theta`` to the nearest
    true eigenvalue.

    Attributes:
        largest: the ``k`` algebraically largest eigenvalues, descending (``None`` when
            ``which="smallest"``).
        smallest: the ``k`` algebraically smallest eigenvalues, ascending (``None`` when
            ``which="largest"``).
        largest_vectors: unit Ritz vectors of ``largest``, shape ``(k, n)``.
        smallest_vectors: unit Ritz vectors of ``smallest``, shape ``(k, n)``.
        largest_residuals: residual norms of ``largest``.
        smallest_residuals: residual norms of ``smallest``.
        ritz_values: every Ritz value of the final Krylov space, ascending.
        spectral_radius: ``max |theta|``, the scale the tolerance is relative to.
        num_hvps: operator products used.
        converged: every requested value met ``residual <= tol * spectral_radius``.
    """

    largest: Tensor | None
    smallest: Tensor | None
    largest_vectors: Tensor | None
    smallest_vectors: Tensor | None
    largest_residuals: Tensor | None
    smallest_residuals: Tensor | None
    ritz_values: Tensor
    spectral_radius: float
    num_hvps: int
    converged: bool

    def warm_start(self) -> Tensor:
        """The Ritz vectors found, stacked, to pass as ``v0`` to the next call."""
        vectors = [v for v in (self.largest_vectors, self.smallest_vectors) if v is not None]
        return torch.cat(vectors)


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    k: int = 1,
    which: str = "both",
    tol: float = 1e-3,
    max_hvps: int = DEFAULT_MAX_HVPS,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    params: ParamSelection = None,
    hvp_reduce: HvpReduce | None = None,
) -> EigenResult:
    """Extreme eigenvalues of the Hessian of ``loss_fn(model, batch)``, both ends from one run.

    Runs Lanczos with full reorthogonalisation on the :class:`HessianOperator` and stops as soon
    as every requested Ritz pair has residual ``||H y - theta y|| <= tol * rho``, with ``rho``
    the spectral-radius estimate ``max |theta|``. The residual is a guaranteed bound on the
    distance to a true eigenvalue, unlike the change between iterations, which power-iteration
    tools stop on. Ritz values come from :func:`scipy.linalg.eigh_tridiagonal`.

    Like every Krylov method, Lanczos sees only what its start vector reaches: a random start
    reaches everything, a warm start mostly the span of ``v0``. A new outlier nearly orthogonal
    to ``v0`` can therefore be missed by a warm-started call; start cold from time to time.
    For the same reason a single start vector sees one copy of an exactly repeated eigenvalue:
    further copies are found only when the Krylov space closes (the run then restarts in the
    orthogonal complement), so with ``k >= 2`` the reported values can miss copies of a
    multiple eigenvalue. Exact multiplicities are rare in trained networks; they occur at
    symmetric points such as identical hidden units.

    The model is left exactly as it was: see :class:`HessianOperator`.

    Args:
        model: the module whose loss Hessian is analysed.
        loss_fn: ``loss_fn(model, batch)`` returning a finite scalar tensor.
        batch: passed to ``loss_fn`` unchanged.
        k: how many eigenvalues at each requested end.
        which: ``"both"`` (default), ``"largest"`` or ``"smallest"`` (algebraic order).
        tol: residual tolerance relative to the spectral radius; ``0`` runs ``max_hvps`` steps.
        max_hvps: most Hessian-vector products to spend (capped at the parameter count).
        v0: warm start: a vector of shape ``(n,)`` or several as rows ``(m, n)``, typically
            ``previous_result.warm_start()``; rows are normalised and summed, and 1% of a random
            direction is mixed in so that eigenvectors absent from ``v0`` stay reachable.
            ``None`` starts from a random vector.
        generator: source of random vectors. ``None`` uses a CPU generator seeded with 0, so that
            every process of a distributed job draws the same vectors.
        params: which parameters the Hessian is taken over (see :class:`HessianOperator`).
        hvp_reduce: applied to each product, e.g. :func:`all_reduce_mean` under data parallelism.

    Returns:
        An :class:`EigenResult`.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: ``k`` is not in ``[1, n]``, ``which`` is unknown, ``tol`` is negative,
            ``max_hvps`` is smaller than ``k``, ``v0`` has the wrong shape or is not finite, or
            the loss is invalid (see :class:`HessianOperator`).

    Example::

        result = hessian_eigenvalues(model, loss_fn, (x, y), k=2)
        print(result.largest, result.smallest, result.num_hvps)
        later = hessian_eigenvalues(model, loss_fn, (x, y), k=2, v0=result.warm_start())
    """
    size = sum(param.numel() for _, param in select_parameters(model, params))
    _validate(size, k=k, which=which, tol=tol, max_hvps=max_hvps, generator=generator)
    with HessianOperator(model, loss_fn, batch, params=params, hvp_reduce=hvp_reduce) as operator:
        return lanczos_eigenvalues(
            operator, k=k, which=which, tol=tol, max_hvps=max_hvps, v0=v0, generator=generator
        )


def lanczos_eigenvalues(
    operator: SymmetricOperator,
    *,
    k: int = 1,
    which: str = "both",
    tol: float = 1e-3,
    max_hvps: int = DEFAULT_MAX_HVPS,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """:func:`hessian_eigenvalues` on any symmetric operator (e.g. an existing
    :class:`HessianOperator`, or a preconditioned one), with the same arguments and result."""
    if not isinstance(operator, SymmetricOperator):
        raise TypeError(
            f"Invalid operator: {type(operator).__name__} (expected an object with size, dtype, "
            "device and matvec(vector), such as HessianOperator)"
        )
    size = operator.size
    _validate(size, k=k, which=which, tol=tol, max_hvps=max_hvps, generator=generator)
    generator = default_generator(generator)
    start = _start_vector(operator, v0, generator)
    process = LanczosProcess(operator, start, capacity=max_hvps, generator=generator)
    want_largest = which in ("both", "largest")
    want_smallest = which in ("both", "smallest")
    while True:
        can_continue = process.step(restart_on_breakdown=True)
        pairs = process.ritz_pairs()
        done = _certified(process, pairs, k, tol, want_largest, want_smallest)
        if done or not can_continue or process.steps >= max_hvps:
            break
    return _result(process, pairs, k, done, want_largest, want_smallest)


def _validate(size: int, *, k: Any, which: Any, tol: Any, max_hvps: Any, generator: Any) -> None:
    check_int("k", k, minimum=1, maximum=size)
    check_choice("which", which, WHICH)
    check_float("tol", tol, minimum=0.0)
    check_int("max_hvps", max_hvps, minimum=k)
    check_generator("generator", generator)


def _start_vector(
    operator: SymmetricOperator, v0: Tensor | None, generator: torch.Generator
) -> Tensor:
    size, dtype, device = operator.size, operator.dtype, operator.device
    if v0 is None:
        return random_gaussian(size, generator, dtype, device)
    if not isinstance(v0, Tensor):
        raise TypeError(f"Invalid v0: expected a tensor or None, got {type(v0).__name__}")
    rows = v0.detach().to(device=device, dtype=dtype)
    rows = rows.unsqueeze(0) if rows.dim() == 1 else rows
    if rows.dim() != 2 or rows.shape[1] != size or rows.shape[0] == 0:
        raise ValueError(
            f"Invalid v0: shape {tuple(v0.shape)} (expected ({size},) or (m, {size}) with m >= 1)"
        )
    if not bool(torch.isfinite(rows).all()):
        raise ValueError("Invalid v0: it contains NaN or infinite entries")
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    combined = (rows / norms.clamp_min(torch.finfo(dtype).tiny)).sum(dim=0)
    norm = float(torch.linalg.vector_norm(combined))
    if norm == 0.0:
        raise ValueError("Invalid v0: its rows sum to the zero vector; give non-zero vectors")
    noise = random_gaussian(size, generator, dtype, device)
    return combined / norm + WARM_START_NOISE * noise / torch.linalg.vector_norm(noise)


def _certified(
    process: LanczosProcess,
    pairs: RitzPairs,
    k: int,
    tol: float,
    want_largest: bool,
    want_smallest: bool,
) -> bool:
    """Whether the requested ends are converged, including repeated eigenvalues.

    From a start with a random share, a closed block (breakdown) holds every distinct eigenvalue
    of the space it ran in, but only one copy of each: further copies live in the complement,
    which the block after the restart explores. So after a restart, either the running block
    must have converged at its ends too, or the block that just closed must hold nothing that
    another copy of could still enter the requested ends.
    """
    if not _converged(pairs, k, tol, want_largest, want_smallest):
        return False
    starts = process.block_starts
    if len(starts) == 1:
        return True
    radius = _spectral_radius(pairs.values)
    if process.steps > starts[-1]:
        block = process.ritz_pairs(first=starts[-1])
        block_k = min(k, block.values.size)
        return _converged(block, block_k, tol, want_largest, want_smallest, radius=radius)
    closed = process.ritz_pairs(first=starts[-2], last=starts[-1]).values
    margin = tol * radius
    ordered = pairs.values
    if want_largest and np.any(closed > ordered[-k] + margin):
        return False
    return not (want_smallest and np.any(closed < ordered[k - 1] - margin))


def _converged(
    pairs: RitzPairs,
    k: int,
    tol: float,
    want_largest: bool,
    want_smallest: bool,
    radius: float | None = None,
) -> bool:
    if pairs.values.size < k:
        return False
    threshold = tol * (_spectral_radius(pairs.values) if radius is None else radius)
    ends = []
    if want_largest:
        ends.append(pairs.residuals[-k:])
    if want_smallest:
        ends.append(pairs.residuals[:k])
    return all(bool(np.all(residuals <= threshold)) for residuals in ends)


def _spectral_radius(values: np.ndarray) -> float:
    return float(max(abs(values[0]), abs(values[-1])))


def _result(
    process: LanczosProcess,
    pairs: RitzPairs,
    k: int,
    converged: bool,
    want_largest: bool,
    want_smallest: bool,
) -> EigenResult:
    available = min(k, pairs.values.size)
    largest_idx = np.arange(pairs.values.size - 1, pairs.values.size - 1 - available, -1)
    smallest_idx = np.arange(available)

    def end(
        indices: np.ndarray, wanted: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if not wanted:
            return None, None, None
        values = torch.from_numpy(pairs.values[indices].copy())
        vectors = process.ritz_vectors(pairs.vectors[:, indices])
        residuals = torch.from_numpy(pairs.residuals[indices].copy())
        return values, vectors, residuals

    largest, largest_vectors, largest_residuals = end(largest_idx, want_largest)
    smallest, smallest_vectors, smallest_residuals = end(smallest_idx, want_smallest)
    return EigenResult(
        largest=largest,
        smallest=smallest,
        largest_vectors=largest_vectors,
        smallest_vectors=smallest_vectors,
        largest_residuals=largest_residuals,
        smallest_residuals=smallest_residuals,
        ritz_values=torch.from_numpy(pairs.values.copy()),
        spectral_radius=_spectral_radius(pairs.values),
        num_hvps=process.steps,
        converged=converged,
    )
