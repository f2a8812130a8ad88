"""Fused norms of many tensors, grouped into layers, with one device-to-host transfer.

Everything here stays on the tensors' device: a caller gathers what it needs into one tensor and
reads it back once per step (``Tensor.tolist``), instead of one ``.item()`` per parameter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LayerGrouping", "group_norms", "tensor_norms", "total_norm"]


def tensor_norms(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """The ``norm_type``-norm of every tensor, as one vector on the first tensor's device
    (float32, or float64 when any tensor is float64).

    Uses ``torch._foreach_norm`` per device (the multi-tensor kernel behind
    ``torch.nn.utils.clip_grad_norm_``), so the cost is a handful of kernel launches whatever the
    number of tensors. A tensor holding NaN or infinity gets a non-finite norm (the converse
    does not hold: finite values beyond ~1e19 overflow the float32 sum of squares).

    Args:
        tensors: the tensors (any floating dtypes, any devices).
        norm_type: the order of the norm (``2.0``, ``1.0``, ``math.inf``, ...).
    """
    if not tensors:
        return torch.zeros(0)
    target = tensors[0].device
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    if len(by_device) == 1:
        return _stacked_norms(list(tensors), norm_type)
    norms = torch.empty(
        len(tensors),
        dtype=torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32,
        device=target,
    )
    for indices in by_device.values():
        values = _stacked_norms([tensors[i] for i in indices], norm_type)
        norms[torch.tensor(indices, device=target)] = values.to(target)
    return norms


_HALF = (torch.float16, torch.bfloat16)


def _stacked_norms(tensors: list[Tensor], norm_type: float) -> Tensor:
    """Norms in float32 (float64 when a tensor is float64), in one kernel per precision class."""
    out_dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    half = [i for i, t in enumerate(tensors) if t.dtype in _HALF]
    if not half:
        return torch.stack(torch._foreach_norm(tensors, norm_type)).to(out_dtype)
    full = [i for i, t in enumerate(tensors) if t.dtype not in _HALF]
    norms = torch.empty(len(tensors), dtype=out_dtype, device=tensors[0].device)
    # Accumulating half precision in float32 keeps norms above 65504 finite.
    norms[half] = torch.stack(
        torch._foreach_norm([tensors[i] for i in half], norm_type, dtype=torch.float32)
    ).to(out_dtype)
    if full:
        norms[full] = torch.stack(torch._foreach_norm([tensors[i] for i in full], norm_type)).to(
            out_dtype
        )
    return norms


@dataclass(frozen=True)
class LayerGrouping:
    """Which layer each tensor belongs to, for summing per-tensor norms into per-layer norms.

    Attributes:
        names: the layer names, in order of first appearance.
        index: for every tensor, the position of its layer in ``names`` (a long tensor).
    """

    names: tuple[str, ...]
    index: Tensor

    @classmethod
    def from_labels(
        cls, labels: Sequence[str], device: torch.device | None = None
    ) -> LayerGrouping:
        """Group tensors that share a label (e.g. their module's name)."""
        positions: dict[str, int] = {}
        index = [positions.setdefault(label, len(positions)) for label in labels]
        return cls(tuple(positions), torch.tensor(index, dtype=torch.long, device=device))


def group_norms(norms: Tensor, grouping: LayerGrouping, norm_type: float = 2.0) -> Tensor:
    """Combine per-tensor norms into per-group norms: ``(sum_i ||t_i||^p)^(1/p)``, or the max for
    ``p = inf``. A non-finite member makes its group non-finite."""
    groups = len(grouping.names)
    index = grouping.index.to(norms.device)
    if math.isinf(norm_type):
        out = torch.full((groups,), -math.inf, dtype=norms.dtype, device=norms.device)
        return out.scatter_reduce(0, index, norms, reduce="amax")
    powered = torch.zeros(groups, dtype=norms.dtype, device=norms.device)
    powered.index_add_(0, index, norms.pow(norm_type))
    return powered.pow(1.0 / norm_type)


def total_norm(norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """The norm of the concatenation of all tensors, from their individual norms."""
    if norms.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=norms.device)
    if math.isinf(norm_type):
        return norms.max()
    return norms.pow(norm_type).sum().pow(1.0 / norm_type)
