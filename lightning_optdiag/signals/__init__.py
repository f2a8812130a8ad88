"""Signal computations on plain tensors (no Lightning): fused norms and running statistics."""

from lightning_optdiag.signals.norms import LayerGrouping, group_norms, tensor_norms, total_norm
from lightning_optdiag.signals.running import RunningMedian

__all__ = ["LayerGrouping", "RunningMedian", "group_norms", "tensor_norms", "total_norm"]
