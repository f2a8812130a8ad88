"""Stochastic estimates of the Hessian trace: Hutch++ and Hutchinson."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_optdiag._validation import check_choice, check_generator, check_int
from lightning_optdiag.curvature._krylov import default_generator, random_rademacher
from lightning_optdiag.curvature.operator import (
    HessianOperator,
    HvpReduce,
    LossFn,
    ParamSelection,
    SymmetricOperator,
)

__all__ = ["TraceEstimate", "estimate_trace", "hessian_trace"]

METHODS = ("hutch++", "hutchinson")
DEFAULT_NUM_HVPS = 60
_MIN_HVPS = {"hutch++": 6, "hutchinson": 2}


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its standard error.

    Attributes:
        value: the estimate of ``tr(H)``.
        standard_error: standard error of ``value`` from the spread of the random probes (for
            Hutch++, of the Hutchinson part on the deflated remainder; the sketched part is
            exact given the sketch).
        num_hvps: operator products used.
        method: ``"hutch++"`` or ``"hutchinson"``.
    """

    value: float
    standard_error: float
    num_hvps: int
    method: str


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    num_hvps: int = DEFAULT_NUM_HVPS,
    method: str = "hutch++",
    generator: torch.Generator | None = None,
    params: ParamSelection = None,
    hvp_reduce: HvpReduce | None = None,
) -> TraceEstimate:
    """Estimate the trace of the Hessian of ``loss_fn(model, batch)`` with random sign probes.

    ``"hutchinson"`` averages ``z^T H z`` over Rademacher vectors ``z``: its variance is
    ``2 (||H||_F^2 - sum_i H_ii^2) / m`` (Hutchinson, 1989), so the error falls like
    ``1/sqrt(m)``. ``"hutch++"`` (Meyer, Musco, Musco & Woodruff, 2021, arXiv 2010.09649) spends a
    third of the budget sketching the dominant subspace ``Q = orth(H S)``, a third computing
    ``tr(Q^T H Q)`` exactly, and the rest on Hutchinson for the deflated remainder; it needs
    ``O(1/eps)`` products instead of ``O(1/eps^2)`` and wins clearly on the outlier-dominated
    spectra of neural networks.

    The model is left exactly as it was: see :class:`HessianOperator`.

    Args:
        model: the module whose loss Hessian is analysed.
        loss_fn: ``loss_fn(model, batch)`` returning a finite scalar tensor.
        batch: passed to ``loss_fn`` unchanged.
        num_hvps: product budget (at least 6 for Hutch++, 2 for Hutchinson).
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        generator: source of the probes; ``None`` uses a CPU generator seeded with 0.
        params: which parameters the Hessian is taken over (see :class:`HessianOperator`).
        hvp_reduce: applied to each product, e.g. :func:`all_reduce_mean`.

    Returns:
        A :class:`TraceEstimate`.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: ``method`` is unknown, ``num_hvps`` is too small for it, or the loss is
            invalid (see :class:`HessianOperator`).

    Example::

        trace = hessian_trace(model, loss_fn, (x, y), num_hvps=90)
        print(f"{trace.value:.3g} +/- {trace.standard_error:.2g}")
    """
    _validate(num_hvps=num_hvps, method=method, generator=generator)
    with HessianOperator(model, loss_fn, batch, params=params, hvp_reduce=hvp_reduce) as operator:
        return estimate_trace(operator, num_hvps=num_hvps, method=method, generator=generator)


def estimate_trace(
    operator: SymmetricOperator,
    *,
    num_hvps: int = DEFAULT_NUM_HVPS,
    method: str = "hutch++",
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    """:func:`hessian_trace` on any symmetric operator, with the same arguments and result."""
    _validate(num_hvps=num_hvps, method=method, generator=generator)
    generator = default_generator(generator)
    if method == "hutchinson":
        probes = _rademacher_columns(operator, num_hvps, generator)
        value, error = _hutchinson(operator, probes)
        return TraceEstimate(value, error, num_hvps, method)
    sketch_size = num_hvps // 3
    sketch = _rademacher_columns(operator, sketch_size, generator)
    basis, _ = torch.linalg.qr(_apply(operator, sketch))
    exact_part = float(torch.einsum("ij,ij->", basis, _apply(operator, basis)))
    probes = _rademacher_columns(operator, num_hvps - 2 * sketch_size, generator)
    probes = probes - basis @ (basis.T @ probes)
    remainder, error = _hutchinson(operator, probes)
    return TraceEstimate(exact_part + remainder, error, num_hvps, method)


def _validate(*, num_hvps: Any, method: Any, generator: Any) -> None:
    check_choice("method", method, METHODS)
    check_int("num_hvps", num_hvps, minimum=_MIN_HVPS[method])
    check_generator("generator", generator)


def _rademacher_columns(
    operator: SymmetricOperator, count: int, generator: torch.Generator
) -> Tensor:
    return random_rademacher((count, operator.size), generator, operator.dtype, operator.device).T


def _apply(operator: SymmetricOperator, columns: Tensor) -> Tensor:
    return torch.stack([operator.matvec(column) for column in columns.T], dim=1)


def _hutchinson(operator: SymmetricOperator, probes: Tensor) -> tuple[float, float]:
    samples = torch.einsum("ij,ij->j", probes, _apply(operator, probes)).double().cpu()
    count = samples.numel()
    return float(samples.mean()), float(samples.std(correction=1)) / math.sqrt(count)
