"""lightning-optdiag: training diagnostics for PyTorch Lightning.

The package is split so that the numerical core never imports Lightning:

- :mod:`lightning_optdiag.curvature`: Hessian-vector products, Lanczos eigenvalues, trace and
  spectral density estimation (pure PyTorch and SciPy).
- :mod:`lightning_optdiag.signals`: fused gradient norms, running statistics, trend tests, the
  gradient noise scale and optimizer stability thresholds (pure PyTorch).
- :mod:`lightning_optdiag.diagnosis`: the rules that turn those signals into diagnoses.
- :mod:`lightning_optdiag.optim`: optimizers torch.optim lacks, and one registry over all of them.
- :mod:`lightning_optdiag.report`: rich console and TensorBoard output, and reading logs back.
- :mod:`lightning_optdiag.callbacks`: the Lightning glue (``GradientMonitor``,
  ``NonFiniteGuard``, ``CurvatureMonitor``, ``TrainingDoctor``, ``OptimizerSwitch``,
  ``ScheduleAdvisor``, ``AutoAttach``).

Submodules are imported on first use, so ``import lightning_optdiag`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

_SUBMODULES = ("callbacks", "curvature", "diagnosis", "optim", "report", "signals")

if TYPE_CHECKING:
    from lightning_optdiag import callbacks, curvature, diagnosis, optim, report, signals


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "callbacks", "curvature", "diagnosis", "optim", "report", "signals"]
