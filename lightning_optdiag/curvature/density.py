"""Hessian eigenvalue density by stochastic Lanczos quadrature."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_optdiag._validation import check_float, check_generator, check_int
from lightning_optdiag.curvature._krylov import (
    LanczosProcess,
    default_generator,
    random_rademacher,
)
from lightning_optdiag.curvature.operator import (
    HessianOperator,
    HvpReduce,
    LossFn,
    ParamSelection,
    SymmetricOperator,
)

__all__ = ["SpectralDensity", "estimate_spectral_density", "spectral_density"]

DEFAULT_NUM_PROBES = 4
DEFAULT_NUM_STEPS = 40


@dataclass(frozen=True)
class SpectralDensity:
    """A discrete approximation of the eigenvalue density: weighted nodes summing to one.

    For each random probe ``v``, the Gauss quadrature of the Lanczos matrix ``T_m`` started at
    ``v`` has nodes ``theta_i`` (eigenvalues of ``T_m``) and weights ``tau_i`` (squared first
    components of its eigenvectors); ``sum_i tau_i f(theta_i)`` equals ``v^T f(H) v / v^T v``
    exactly for polynomials ``f`` of degree below ``2m``. Averaging over probes estimates
    ``tr f(H) / n``: the density is ``sum_i w_i delta(t - theta_i)``.

    Attributes:
        nodes: quadrature nodes of all probes, shape ``(N,)`` (float64, CPU).
        weights: their weights (each probe's weights divided by the number of probes), summing
            to one.
        num_probes: number of random probes averaged.
        size: dimension ``n`` of the operator; ``n * density`` counts eigenvalues.
        num_hvps: operator products used.
    """

    nodes: Tensor
    weights: Tensor
    num_probes: int
    size: int
    num_hvps: int

    def moment(self, order: int) -> float:
        """Estimate of ``tr(H^order) / n`` (``order=1``: mean eigenvalue)."""
        check_int("order", order, minimum=0)
        return float((self.weights * self.nodes**order).sum())

    def evaluate(self, grid: Tensor | np.ndarray, sigma: float | None = None) -> Tensor:
        """The density smoothed by a Gaussian of width ``sigma``, evaluated at ``grid`` points.

        Args:
            grid: 1-D points at which to evaluate.
            sigma: kernel width; ``None`` uses 1% of the node range (Ghorbani et al. smooth on
                a similar relative scale). Integrates to one over a wide enough grid.
        """
        points = torch.as_tensor(np.asarray(grid), dtype=torch.float64).reshape(-1)
        width = (
            self.default_sigma()
            if sigma is None
            else check_float("sigma", sigma, minimum=0.0, exclusive_minimum=True)
        )
        offsets = (points[:, None] - self.nodes[None, :]) / width
        kernel = torch.exp(-0.5 * offsets**2) / (width * math.sqrt(2.0 * math.pi))
        return kernel @ self.weights

    def grid(self, num_points: int = 512, sigma: float | None = None) -> tuple[Tensor, Tensor]:
        """Points spanning the nodes with a margin of five kernel widths, and the density there."""
        check_int("num_points", num_points, minimum=2)
        width = self.default_sigma() if sigma is None else sigma
        low = float(self.nodes.min()) - 5 * width
        high = float(self.nodes.max()) + 5 * width
        points = torch.linspace(low, high, num_points, dtype=torch.float64)
        return points, self.evaluate(points, width)

    def default_sigma(self) -> float:
        """1% of the node range (or of the largest node magnitude when all nodes coincide)."""
        spread = float(self.nodes.max() - self.nodes.min())
        scale = spread if spread > 0 else float(self.nodes.abs().max())
        return 0.01 * scale if scale > 0 else 1e-3


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    num_probes: int = DEFAULT_NUM_PROBES,
    num_steps: int = DEFAULT_NUM_STEPS,
    generator: torch.Generator | None = None,
    params: ParamSelection = None,
    hvp_reduce: HvpReduce | None = None,
) -> SpectralDensity:
    """Eigenvalue density of the Hessian of ``loss_fn(model, batch)`` by stochastic Lanczos
    quadrature (Ghorbani, Krishnan & Xiao, 2019, arXiv 1901.10159; Lin, Saad & Yang, 2016).

    Each probe is a random sign vector run through ``num_steps`` Lanczos steps with full
    reorthogonalisation; ``num_probes * num_steps`` products in all (fewer if a probe's Krylov
    space closes early, where its quadrature is exact).

    Args:
        model: the module whose loss Hessian is analysed.
        loss_fn: ``loss_fn(model, batch)`` returning a finite scalar tensor.
        batch: passed to ``loss_fn`` unchanged.
        num_probes: random probes to average.
        num_steps: Lanczos steps per probe (the resolution; capped at the parameter count).
        generator: source of the probes; ``None`` uses a CPU generator seeded with 0.
        params: which parameters the Hessian is taken over (see :class:`HessianOperator`).
        hvp_reduce: applied to each product, e.g. :func:`all_reduce_mean`.

    Returns:
        A :class:`SpectralDensity`.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: ``num_probes`` or ``num_steps`` is below 1, or the loss is invalid.

    Example::

        density = spectral_density(model, loss_fn, (x, y), num_probes=8)
        points, values = density.grid()
    """
    _validate(num_probes=num_probes, num_steps=num_steps, generator=generator)
    with HessianOperator(model, loss_fn, batch, params=params, hvp_reduce=hvp_reduce) as operator:
        return estimate_spectral_density(
            operator, num_probes=num_probes, num_steps=num_steps, generator=generator
        )


def estimate_spectral_density(
    operator: SymmetricOperator,
    *,
    num_probes: int = DEFAULT_NUM_PROBES,
    num_steps: int = DEFAULT_NUM_STEPS,
    generator: torch.Generator | None = None,
) -> SpectralDensity:
    """:func:`spectral_density` on any symmetric operator, with the same arguments and result."""
    _validate(num_probes=num_probes, num_steps=num_steps, generator=generator)
    generator = default_generator(generator)
    nodes: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    num_hvps = 0
    for _ in range(num_probes):
        probe = random_rademacher((operator.size,), generator, operator.dtype, operator.device)
        process = LanczosProcess(operator, probe, capacity=num_steps, generator=generator)
        while process.step(restart_on_breakdown=False) and process.steps < num_steps:
            pass
        pairs = process.ritz_pairs()
        nodes.append(pairs.values)
        weights.append(pairs.vectors[0, :] ** 2 / num_probes)
        num_hvps += process.steps
    return SpectralDensity(
        nodes=torch.from_numpy(np.concatenate(nodes)),
        weights=torch.from_numpy(np.concatenate(weights)),
        num_probes=num_probes,
        size=operator.size,
        num_hvps=num_hvps,
    )


def _validate(*, num_probes: Any, num_steps: Any, generator: Any) -> None:
    check_int("num_probes", num_probes, minimum=1)
    check_int("num_steps", num_steps, minimum=1)
    check_generator("generator", generator)
