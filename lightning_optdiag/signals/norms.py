"""Fused norms of many tensors, for one device-to-host transfer per step.

Everything here stays on the tensors' device: a caller gathers what it needs into one tensor and
reads it back once per step (``Tensor.tolist``), instead of one ``.item()`` per parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = ["tensor_norms"]

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
