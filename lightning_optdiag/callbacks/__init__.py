"""Lightning callbacks: the thin glue between Trainer hooks and optdiag's signal computations."""

from lightning_optdiag.callbacks.gradient_monitor import (
    GradientEvent,
    GradientMonitor,
    GradientStats,
)
from lightning_optdiag.callbacks.nonfinite_guard import (
    NonFiniteError,
    NonFiniteEvent,
    NonFiniteGuard,
)

__all__ = [
    "GradientEvent",
    "GradientMonitor",
    "GradientStats",
    "NonFiniteError",
    "NonFiniteEvent",
    "NonFiniteGuard",
]
