"""LAMB: Adam's update rescaled by a layer-wise trust ratio."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from lightning_optdiag.optim._base import (
    BundledOptimizer,
    check_betas,
    check_lr,
    check_non_negative,
    group_by_device_and_dtype,
    l2_norms,
    use_foreach,
)
from lightning_optdiag.optim.layer_adaptation import trust_ratios

__all__ = ["LAMB"]


class LAMB(BundledOptimizer):
    r"""Layer-wise Adaptive Moments for Batch training (LAMB, You et al. 2019).

    For each parameter tensor :math:`w` (a "layer") with gradient :math:`g` at step :math:`t`:

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g^2,

    .. math::
        u = \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} + \lambda w,
        \qquad
        w \leftarrow w - \eta \frac{\lVert w\rVert}{\lVert u\rVert} u,

    with the trust ratio :math:`\lVert w\rVert / \lVert u\rVert` replaced by 1 when either norm
    is zero (a zero-initialised layer still moves, a zero update stays zero).
    ``bias_correction=False`` drops the :math:`1 - \beta^t` factors. The weight decay
    :math:`\lambda` is decoupled (inside :math:`u`, not in the moments), as in the paper.

    Exclusions: a param group with ``layer_adaptation=False`` uses a trust ratio of 1 (then
    LAMB is Adam with decoupled decay). :func:`~lightning_optdiag.optim.
    param_groups_for_layer_adaptation` builds such a group for biases and normalisation
    parameters, without weight decay.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Learning rate :math:`\eta` (default: 1e-3).
        betas: Coefficients of the running averages (default: (0.9, 0.999)).
        eps: Term added to the denominator (default: 1e-6, the paper's value).
        weight_decay: Decoupled weight decay :math:`\lambda` (default: 0).
        bias_correction: Apply Adam's bias correction (default: True).
        foreach: Use the multi-tensor ``torch._foreach_*`` implementation; ``None`` (default)
            picks it for plain tensors, ``False`` runs the per-tensor reference loop.

    Raises:
        ValueError: For a negative ``lr``, ``eps`` or ``weight_decay`` or a beta outside [0, 1).
        TypeError: For non-numeric hyperparameters or non floating-point parameters.
        RuntimeError: From :meth:`step`, for a sparse gradient.

    Example:
        >>> from lightning_optdiag.optim import param_groups_for_layer_adaptation
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
        >>> optimizer = LAMB(param_groups_for_layer_adaptation(model, weight_decay=0.01))
        >>> model(torch.randn(16, 4)).square().mean().backward()
        >>> optimizer.step()

    References:
        You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
        ICLR 2020, arXiv:1904.00962.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bias_correction,
            "layer_adaptation": True,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_non_negative("epsilon value", group["eps"])
        check_non_negative("weight_decay value", group["weight_decay"])
        for flag in ("bias_correction", "layer_adaptation"):
            if not isinstance(group[flag], bool):
                raise TypeError(f"Invalid {flag}: {group[flag]!r} (expected True or False)")

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        update = (
            _multi_tensor_lamb if use_foreach(group["foreach"], params) else _single_tensor_lamb
        )
        update(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            bias_correction=group["bias_correction"],
            layer_adaptation=group["layer_adaptation"],
        )


# How the update is computed. With c1 = 1 - beta1^t and c2 = sqrt(1 - beta2^t), Adam's term is
#     m_hat / (sqrt(v_hat) + eps) = (c2 / c1) * r,   r = m / (sqrt(v) + eps * c2),
# so u = (c2 / c1) * d with d = r + (weight_decay * c1 / c2) * w, the trust ratio is
# ||w|| / ||u|| = (c1 / c2) * ||w|| / ||d|| and the step is -lr * ratio * (c2 / c1) * d.
# Folding c1 and c2 into scalars saves two passes over each tensor compared with forming u,
# and r is computed in the memory of the denominator, so nothing is allocated beyond Adam.


def _bias_corrections(step: int, beta1: float, beta2: float, enabled: bool) -> tuple[float, float]:
    """(c1, c2) = (1 - beta1^t, sqrt(1 - beta2^t)), or (1, 1) without bias correction."""
    if not enabled:
        return 1.0, 1.0
    return 1 - beta1**step, (1 - beta2**step) ** 0.5


def _single_tensor_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    layer_adaptation: bool,
) -> None:
    for param, grad, exp_avg, exp_avg_sq, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, steps, strict=True
    ):
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        c1, c2 = _bias_corrections(step, beta1, beta2, bias_correction)
        denom = exp_avg_sq.sqrt().add_(eps * c2)
        direction = torch.div(exp_avg, denom, out=denom)
        if weight_decay != 0:
            direction.add_(param, alpha=weight_decay * c1 / c2)
        [ratio] = _ratios([param], [direction], [c1 / c2], layer_adaptation)
        param.addcmul_(direction, ratio, value=-lr * c2 / c1)


def _multi_tensor_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    layer_adaptation: bool,
) -> None:
    """The ``torch._foreach_*`` twin of :func:`_single_tensor_lamb` (same results)."""
    corrections = [_bias_corrections(step, beta1, beta2, bias_correction) for step in steps]
    directions: list[Tensor | None] = [None] * len(params)
    chunks = group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs])
    for (chunk_params, chunk_grads, chunk_exp_avgs, chunk_exp_avg_sqs), indices in chunks:
        torch._foreach_lerp_(chunk_exp_avgs, chunk_grads, 1 - beta1)
        torch._foreach_mul_(chunk_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(chunk_exp_avg_sqs, chunk_grads, chunk_grads, 1 - beta2)
        denoms = torch._foreach_sqrt(chunk_exp_avg_sqs)
        torch._foreach_add_(denoms, [eps * corrections[i][1] for i in indices])
        for exp_avg, denom in zip(chunk_exp_avgs, denoms, strict=True):
            # In place over the denominator: no foreach op divides into its divisor.
            torch.div(exp_avg, denom, out=denom)
        if weight_decay != 0:
            decays = [weight_decay * corrections[i][0] / corrections[i][1] for i in indices]
            _add_decay(denoms, chunk_params, decays)
        for position, index in enumerate(indices):
            directions[index] = denoms[position]
    filled = [d for d in directions if d is not None]
    factors = [c1 / c2 for c1, c2 in corrections]
    ratios = _ratios(params, filled, factors, layer_adaptation)
    for (chunk_params, chunk_directions), indices in group_by_device_and_dtype([params, filled]):
        torch._foreach_addcmul_(
            chunk_params,
            chunk_directions,
            [ratios[i] for i in indices],
            [-lr * corrections[i][1] / corrections[i][0] for i in indices],
        )


def _ratios(
    params: list[Tensor], directions: list[Tensor], factors: list[float], layer_adaptation: bool
) -> list[Tensor]:
    """LAMB's trust ratio ||w|| / ||u|| = factor * ||w|| / ||d||, or 1 (0-d tensors)."""
    if not layer_adaptation:
        ones = {p.device: torch.ones((), device=p.device) for p in params}
        return [ones[p.device] for p in params]
    devices = [p.device for p in params]
    return trust_ratios(l2_norms(params), l2_norms(directions), torch.div, factors, devices)


def _add_decay(
    directions: tuple[Tensor, ...] | list[Tensor], params: list[Tensor], decays: list[float]
) -> None:
    """direction += decay * w, rounded as the for-loop's ``add_(alpha=...)``."""
    if all(decay == decays[0] for decay in decays):
        torch._foreach_add_(directions, params, alpha=decays[0])
        return
    for direction, param, decay in zip(directions, params, decays, strict=True):
        direction.add_(param, alpha=decay)
