"""SGDW: SGD with momentum and decoupled weight decay."""

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
    use_foreach,
)

__all__ = ["SGDW"]


class SGDW(BundledOptimizer):
    r"""SGD with momentum and decoupled weight decay (SGDW, Loshchilov & Hutter).

    The weights decay directly, outside the gradient and so outside the momentum buffer, then
    take torch's SGD step (torch's functional ``sgd`` is called, so with ``weight_decay=0`` this
    is :class:`torch.optim.SGD` bit for bit):

    .. math::
        \theta \leftarrow \theta (1 - \eta\lambda), \qquad
        b \leftarrow \mu b + (1 - \tau) g, \qquad \theta \leftarrow \theta - \eta b

    (Nesterov: :math:`\theta \leftarrow \theta - \eta (g + \mu b)`; the first buffer is
    :math:`g`, as in torch). With L2 weight decay (``torch.optim.SGD(weight_decay=...)``) the
    decay term would pass through the momentum buffer and, with adaptive methods, through the
    preconditioner; decoupling keeps the effective decay at :math:`\eta\lambda` per step.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Learning rate :math:`\eta` (default: 1e-3).
        momentum: Momentum factor :math:`\mu` (default: 0).
        dampening: Dampening :math:`\tau` of the momentum (default: 0).
        weight_decay: Decoupled decay :math:`\lambda`: each step multiplies the weights by
            ``1 - lr * weight_decay`` (default: 1e-2, as torch's AdamW).
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``
            (default: False).
        foreach: Use the multi-tensor ``torch._foreach_*`` implementation; ``None`` (default)
            picks it for plain tensors, ``False`` runs the per-tensor reference loop.

    Raises:
        ValueError: For a negative ``lr``, ``momentum``, ``dampening`` or ``weight_decay``, or
            Nesterov without momentum / with dampening.
        TypeError: For non-numeric hyperparameters or non floating-point parameters.
        RuntimeError: From :meth:`step`, for a sparse gradient.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = SGDW(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> optimizer.step()

    References:
        Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
        arXiv:1711.05101.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 1e-2,
        nesterov: bool = False,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_non_negative("momentum value", group["momentum"])
        check_non_negative("dampening value", group["dampening"])
        check_non_negative("weight_decay value", group["weight_decay"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                "Nesterov momentum requires a momentum and zero dampening, got "
                f"momentum={group['momentum']} and dampening={group['dampening']}"
            )

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        foreach = use_foreach(group["foreach"], params)
        _decay(params, group["lr"] * group["weight_decay"], foreach=foreach)
        momentum = group["momentum"]
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        sgd(
            params,
            grads,
            buffers,
            foreach=foreach,
            weight_decay=0.0,
            momentum=momentum,
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=False,
        )
        if momentum != 0:
            for p, buffer in zip(params, buffers, strict=True):
                self.state[p]["momentum_buffer"] = buffer


def _decay(params: list[Tensor], rate: float, *, foreach: bool) -> None:
    """theta <- theta * (1 - rate), the decoupled decay."""
    if rate == 0:
        return
    if not foreach:
        for p in params:
            p.mul_(1 - rate)
        return
    for [chunk], _ in group_by_device_and_dtype([params]):
        torch._foreach_mul_(chunk, 1 - rate)
