"""Averaging curvature products across data-parallel processes."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_mean"]


def all_reduce_mean(tensor: Tensor, group: Any = None) -> Tensor:
    """Average ``tensor`` over the processes of ``group``; identity when not distributed.

    Passed as ``hvp_reduce`` to the curvature functions, it makes every process apply the Hessian
    of the *global* batch (the mean of the per-process Hessians of equally weighted local
    losses). All processes must then run the same number of products, which they do: they see
    the same averaged products and draw the same random vectors from identically seeded
    generators, so every data-dependent decision (Lanczos stopping) is taken identically.

    Args:
        tensor: the local product.
        group: the process group (``None``: the default group).

    Returns:
        A new tensor with the average, or ``tensor`` itself outside a distributed run.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return tensor
    averaged = tensor.clone()
    dist.all_reduce(averaged, op=dist.ReduceOp.SUM, group=group)
    return averaged.div_(world_size)
