"""The curvature engine: Hessian eigenvalues, trace and spectral density from Hessian-vector
products, in pure PyTorch and SciPy (no Lightning).

- :class:`HessianOperator`: the loss Hessian as a linear operator (one forward pass, one gradient
  with ``create_graph=True``, then reverse-over-reverse products on the retained graph).
- :func:`hessian_eigenvalues`: extreme eigenvalues by Lanczos with a residual stop.
- :func:`hessian_trace`: Hutch++ / Hutchinson trace with a standard error.
- :func:`spectral_density`: stochastic Lanczos quadrature.
- :class:`ScaledOperator`: ``S H S``, for the sharpness an adaptive optimizer sees.
- :func:`isolated_forward`: the guarantee behind all of them: no trace on the training run.
- :func:`all_reduce_mean`: the ``hvp_reduce`` hook for data-parallel runs.
"""

from lightning_optdiag.curvature.density import (
    SpectralDensity,
    estimate_spectral_density,
    spectral_density,
)
from lightning_optdiag.curvature.distributed import all_reduce_mean
from lightning_optdiag.curvature.eigen import EigenResult, hessian_eigenvalues, lanczos_eigenvalues
from lightning_optdiag.curvature.isolation import isolated_forward
from lightning_optdiag.curvature.operator import (
    HessianOperator,
    LossFn,
    NonFiniteLossError,
    ParamSelection,
    SymmetricOperator,
    select_parameters,
)
from lightning_optdiag.curvature.scaled import ScaledOperator
from lightning_optdiag.curvature.trace import TraceEstimate, estimate_trace, hessian_trace

__all__ = [
    "EigenResult",
    "HessianOperator",
    "LossFn",
    "NonFiniteLossError",
    "ParamSelection",
    "ScaledOperator",
    "SpectralDensity",
    "SymmetricOperator",
    "TraceEstimate",
    "all_reduce_mean",
    "estimate_spectral_density",
    "estimate_trace",
    "hessian_eigenvalues",
    "hessian_trace",
    "isolated_forward",
    "lanczos_eigenvalues",
    "select_parameters",
    "spectral_density",
]
