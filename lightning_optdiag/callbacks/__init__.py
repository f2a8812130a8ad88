"""Lightning callbacks: the thin glue between Trainer hooks and optdiag's signal computations."""

from lightning_optdiag.callbacks.auto_attach import AutoAttach
from lightning_optdiag.callbacks.curvature_monitor import CurvatureMonitor, CurvatureRecord
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
from lightning_optdiag.callbacks.optimizer_switch import OptimizerSwitch, SwitchEvent
from lightning_optdiag.callbacks.schedule_advisor import ScheduleAdvisor
from lightning_optdiag.callbacks.training_doctor import TrainingDoctor

__all__ = [
    "AutoAttach",
    "CurvatureMonitor",
    "CurvatureRecord",
    "GradientEvent",
    "GradientMonitor",
    "GradientStats",
    "NonFiniteError",
    "NonFiniteEvent",
    "NonFiniteGuard",
    "OptimizerSwitch",
    "ScheduleAdvisor",
    "SwitchEvent",
    "TrainingDoctor",
]
