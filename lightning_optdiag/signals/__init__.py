"""Signal computations on plain tensors and floats (no Lightning): fused norms, running
statistics, loss trends, the gradient noise scale and optimizer stability thresholds."""

from lightning_optdiag.signals.noise_scale import GradientNoiseScale, NoiseScaleEstimate
from lightning_optdiag.signals.norms import LayerGrouping, group_norms, tensor_norms, total_norm
from lightning_optdiag.signals.running import RunningMedian
from lightning_optdiag.signals.stability import (
    StabilityRule,
    optimizer_family,
    stability_rule,
    warmup_horizon,
)
from lightning_optdiag.signals.trend import TrendTest, trend_test

__all__ = [
    "GradientNoiseScale",
    "LayerGrouping",
    "NoiseScaleEstimate",
    "RunningMedian",
    "StabilityRule",
    "TrendTest",
    "group_norms",
    "optimizer_family",
    "stability_rule",
    "tensor_norms",
    "total_norm",
    "trend_test",
    "warmup_horizon",
]
