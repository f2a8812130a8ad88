"""Fused norms of many tensors, grouped into layers, with one device-to-host transfer.

Everything here stays on the tensors' device: a caller gathers what it needs into one tensor and
reads it back once per step (``Tensor.tolist``), instead of one ``.item()`` per parameter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = ["LayerGrouping", "group_norms", "tensor_norms", "total_norm"]

_HALF = (torch.float16, torch.bfloat16)


def tensor_norms(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """The ``norm_type``-norm of every tensor, as one vector on the first tensor's device
    (float32, or float64 when any tensor is float64).

    Uses ``torch._foreach_norm`` per device and dtype (the multi-tensor kernel behind
    ``torch.nn.utils.clip_grad_norm_``; the grouping is torch's own, in C++), so the Python cost
    does not grow with the number of tensors. Half-precision tensors accumulate in float32, so
    norms above 65504 stay finite. A tensor holding NaN or infinity gets a non-finite norm (the
    converse does not hold: finite values beyond ~1e19 overflow the float32 sum of squares).

    Args:
        tensors: the tensors (any floating dtypes, any devices).
        norm_type: the order of the norm (``2.0``, ``1.0``, ``math.inf``, ...).
    """
    if not tensors:
        return torch.zeros(0)
    groups = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
    if len(groups) == 1:
        ((_, dtype), ((members,), _)) = next(iter(groups.items()))
        return _norms(cast(list[Tensor], members), dtype, norm_type)
    target = tensors[0].device
    wide = any(dtype == torch.float64 for _, dtype in groups)
    out_dtype = torch.float64 if wide else torch.float32
    norms = torch.empty(len(tensors), dtype=out_dtype, device=target)
    for (_, dtype), ((members,), indices) in groups.items():
        position = torch.tensor(indices, device=target)
        norms[position] = _norms(cast(list[Tensor], members), dtype, norm_type).to(
            device=target, dtype=out_dtype
        )
    return norms


def _norms(tensors: list[Tensor], dtype: torch.dtype, norm_type: float) -> Tensor:
    if dtype in _HALF:
        return torch.stack(torch._foreach_norm(tensors, norm_type, dtype=torch.float32))
    norms = torch.stack(torch._foreach_norm(tensors, norm_type))
    return norms if dtype == torch.float64 else norms.float()


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
