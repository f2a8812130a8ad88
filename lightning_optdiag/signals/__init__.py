"""Signal computations on plain tensors and floats (no Lightning): fused norms, running
statistics, loss trends, the gradient noise scale and optimizer stability thresholds."""

from lightning_optdiag.signals.noise_scale import GradientNoiseScale, NoiseScaleEstimate
from lightning_optdiag.signals.norms import tensor_norms
from lightning_optdiag.signals.running import RunningMedian
from lightning_optdiag.signals.stability import (
    StabilityRule,
    optimizer_family,
    stability_rule,
    warmup_horizon,
)
from lightning_optdiag.signals.swats import SwatsCriterion
from lightning_optdiag.signals.trend import TrendTest, trend_test

__all__ = [
    "GradientNoiseScale",
    "NoiseScaleEstimate",
    "RunningMedian",
    "StabilityRule",
    "SwatsCriterion",
    "TrendTest",
    "optimizer_family",
    "stability_rule",
    "tensor_norms",
    "trend_test",
    "warmup_horizon",
]
