"""LARS: momentum SGD with a layer-wise trust ratio."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT
from torch.optim.sgd import sgd

from lightning_optdiag.optim._base import (
    BundledOptimizer,
    check_lr,
    check_non_negative,
    group_by_device_and_dtype,
    l2_norms,
    use_foreach,
)
from lightning_optdiag.optim.layer_adaptation import trust_ratios

__all__ = ["LARS"]


class LARS(BundledOptimizer):
    r"""Layer-wise Adaptive Rate Scaling (LARS, You, Gitman & Ginsburg 2017).

    For each parameter tensor :math:`w` (a "layer") with gradient :math:`g`, trust coefficient
    :math:`\eta` and weight decay :math:`\beta`:

    .. math::
        q = \frac{\eta\,\lVert w\rVert}{\lVert g\rVert + \beta\lVert w\rVert + \epsilon}
        \quad (q = 1 \text{ if } \lVert w\rVert = 0 \text{ or } \lVert g\rVert = 0),

    .. math::
        d = q\,(g + \beta w), \qquad b \leftarrow \mu b + d, \qquad w \leftarrow w - \gamma b,

    with :math:`\gamma` = ``lr`` and the first buffer :math:`b = d` (torch's SGD convention: the
    momentum step is torch's functional ``sgd`` on the rescaled gradient, so the paper's
    :math:`v \leftarrow \mu v + \gamma q (g + \beta w)` is matched exactly while ``lr`` is
    constant). A zero-initialised layer or one with a zero gradient gets :math:`q = 1`
    instead of a division by zero or a frozen layer.

    Exclusions: a param group with ``layer_adaptation=False`` skips the trust ratio (plain
    momentum SGD with L2 ``weight_decay``). :func:`~lightning_optdiag.optim.
    param_groups_for_layer_adaptation` builds such a group for biases and normalisation
    parameters, without weight decay.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Global learning rate :math:`\gamma` (default: 1.0; the trust ratio already scales
            each layer's step to about ``trust_coefficient`` times its norm).
        momentum: Momentum factor :math:`\mu` (default: 0.9).
        weight_decay: Weight decay :math:`\beta` (default: 0).
        trust_coefficient: :math:`\eta` (default: 1e-3, the paper's value).
        eps: Added to the trust ratio's denominator (default: 1e-8).
        nesterov: Nesterov momentum (default: False).
        foreach: Use the multi-tensor ``torch._foreach_*`` implementation; ``None`` (default)
            picks it for plain tensors, ``False`` runs the per-tensor reference loop.

    Raises:
        ValueError: For a negative ``lr``, ``momentum``, ``weight_decay``, ``eps``, a
            ``trust_coefficient`` <= 0 or Nesterov without momentum.
        TypeError: For non-numeric hyperparameters or non floating-point parameters.
        RuntimeError: From :meth:`step`, for a sparse gradient.

    Example:
        >>> from lightning_optdiag.optim import param_groups_for_layer_adaptation
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
        >>> optimizer = LARS(param_groups_for_layer_adaptation(model, weight_decay=5e-4))
        >>> model(torch.randn(16, 4)).square().mean().backward()
        >>> optimizer.step()

    References:
        You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017,
        arXiv:1708.03888.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        eps: float = 1e-8,
        nesterov: bool = False,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "nesterov": nesterov,
            "layer_adaptation": True,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_non_negative("momentum value", group["momentum"])
        check_non_negative("weight_decay value", group["weight_decay"])
        check_non_negative("epsilon value", group["eps"])
        check_non_negative("trust_coefficient value", group["trust_coefficient"])
        if group["trust_coefficient"] == 0:
            raise ValueError(
                f"Invalid trust_coefficient value: {group['trust_coefficient']} "
                "(expected a finite number > 0)"
            )
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError(
                f"Nesterov momentum requires a momentum, got momentum={group['momentum']}"
            )
        if not isinstance(group["layer_adaptation"], bool):
            raise TypeError(
                f"Invalid layer_adaptation: {group['layer_adaptation']!r} (expected True or False)"
            )

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        foreach = use_foreach(group["foreach"], params)
        weight_decay = group["weight_decay"]
        if group["layer_adaptation"]:
            directions = _scaled_directions(params, grads, group, foreach)
            # The decay is inside the rescaled direction already.
            weight_decay = 0.0
        else:
            directions = grads
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        sgd(
            params,
            directions,
            buffers,
            foreach=foreach,
            weight_decay=weight_decay,
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=0.0,
            nesterov=group["nesterov"],
            maximize=False,
        )
        if group["momentum"] != 0:
            for p, buffer in zip(params, buffers, strict=True):
                self.state[p]["momentum_buffer"] = buffer


def _scaled_directions(
    params: list[Tensor], grads: list[Tensor], group: dict[str, Any], foreach: bool
) -> list[Tensor]:
    """q * (g + weight_decay * w) per tensor, in new tensors (the .grad tensors stay intact)."""
    coefficient, weight_decay, eps = group["trust_coefficient"], group["weight_decay"], group["eps"]

    def lars_ratio(weight_norm: Tensor, grad_norm: Tensor) -> Tensor:
        return coefficient * weight_norm / (grad_norm + weight_decay * weight_norm + eps)

    devices = [p.device for p in params]
    ratios = trust_ratios(l2_norms(params), l2_norms(grads), lars_ratio, devices=devices)
    if not foreach:
        directions = []
        for p, g, ratio in zip(params, grads, ratios, strict=True):
            if weight_decay != 0:
                directions.append(g.add(p, alpha=weight_decay).mul_(ratio))
            else:
                directions.append(g.mul(ratio))
        return directions
    results: list[Tensor | None] = [None] * len(params)
    for (chunk_params, chunk_grads), indices in group_by_device_and_dtype([params, grads]):
        chunk_ratios = [ratios[i] for i in indices]
        if weight_decay != 0:
            chunk_directions = list(
                torch._foreach_add(chunk_grads, chunk_params, alpha=weight_decay)
            )
            torch._foreach_mul_(chunk_directions, chunk_ratios)
        else:
            chunk_directions = list(torch._foreach_mul(chunk_grads, chunk_ratios))
        for position, index in enumerate(indices):
            results[index] = chunk_directions[position]
    return [d for d in results if d is not None]
