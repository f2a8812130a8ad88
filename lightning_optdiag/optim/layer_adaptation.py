"""Param groups for layer-wise adaptive optimizers (LARS, LAMB) and their trust ratios.

Biases and normalisation parameters are conventionally left out of the trust ratio and of weight
decay: their norms say nothing about a layer's scale, and a LayerNorm gain pulled to zero by
decay, or rescaled by ||w|| / ||g||, destabilises training (You et al. 2017, 2019).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_optdiag.optim._base import check_non_negative

__all__ = ["NORMALIZATION_LAYERS", "param_groups_for_layer_adaptation"]

#: Module types whose parameters are excluded from layer adaptation and weight decay.
NORMALIZATION_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def param_groups_for_layer_adaptation(
    model: nn.Module, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Split a model's parameters into an adapted group and an excluded one for LARS / LAMB.

    Excluded (no trust ratio, no weight decay): every parameter with at most one dimension
    (biases, norm gains) and every parameter of a normalisation layer
    (:data:`NORMALIZATION_LAYERS`). Everything else gets the trust ratio and ``weight_decay``.
    A parameter shared between modules is excluded if any of its owners excludes it. Empty
    groups are left out; parameter order follows ``model.parameters()``.

    Args:
        model: The module whose parameters to split.
        weight_decay: Weight decay of the adapted group (default: 0).

    Returns:
        Param-group dicts for :class:`~lightning_optdiag.optim.LARS` or
        :class:`~lightning_optdiag.optim.LAMB`: ``{"params": ..., "weight_decay": weight_decay}``
        and ``{"params": ..., "weight_decay": 0.0, "layer_adaptation": False}``.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: For a negative ``weight_decay``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
        >>> groups = param_groups_for_layer_adaptation(model, weight_decay=1e-4)
        >>> [len(group["params"]) for group in groups]
        [1, 3]

    References:
        You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017,
        arXiv:1708.03888; You et al., "Large Batch Optimization for Deep Learning: Training BERT
        in 76 minutes", 2019, arXiv:1904.00962.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    check_non_negative("weight_decay value", weight_decay)
    excluded_ids = {
        id(p)
        for module in model.modules()
        for p in module.parameters(recurse=False)
        if isinstance(module, NORMALIZATION_LAYERS) or p.ndim <= 1
    }
    adapted = [p for p in model.parameters() if id(p) not in excluded_ids]
    excluded = [p for p in model.parameters() if id(p) in excluded_ids]
    groups: list[dict[str, Any]] = []
    if adapted:
        groups.append({"params": adapted, "weight_decay": weight_decay})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "layer_adaptation": False})
    return groups


def trust_ratios(
    weight_norms: Tensor,
    other_norms: Tensor,
    ratio: Callable[[Tensor, Tensor], Tensor],
    factors: Sequence[float] | None = None,
    devices: Sequence[torch.device] | None = None,
) -> list[Tensor]:
    """``factor * ratio(||w||, ||other||)`` per tensor, and exactly 1 where either norm is zero.

    The norms come stacked (see ``l2_norms``), so the ratios cost a handful of tiny kernels per
    step, not a handful per tensor, and no host synchronisation. ``devices`` moves each ratio to
    its parameter's device when a group spans several.
    """
    value = ratio(weight_norms, other_norms)
    if factors is not None:
        value = value * torch.tensor(factors, dtype=value.dtype, device=value.device)
    both_positive = (weight_norms > 0) & (other_norms > 0)
    ratios = list(torch.where(both_positive, value, torch.ones_like(value)).unbind())
    if devices is not None and any(device != value.device for device in devices):
        ratios = [r.to(device) for r, device in zip(ratios, devices, strict=True)]
    return ratios
