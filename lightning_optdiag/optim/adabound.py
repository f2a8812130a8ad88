"""AdaBound and AMSBound: Adam whose per-element step is clipped into bounds that close on SGD."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from lightning_optdiag.optim._base import (
    BundledOptimizer,
    check_betas,
    check_lr,
    check_non_negative,
    check_positive,
    group_by_device_and_dtype,
    use_foreach,
)

__all__ = ["AMSBound", "AdaBound"]


class AdaBound(BundledOptimizer):
    r"""Adam with dynamic bounds on the step size (AdaBound, Luo et al. 2019).

    With :math:`\eta` = ``lr``, :math:`\eta^*` = ``final_lr`` (see "LR schedulers" below) and
    :math:`t` the step, each step is (the authors' reference form, with Adam's bias
    correction folded into the step size):

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \quad
        (\text{AMSBound: } \hat v_t = \max(\hat v_{t-1}, v_t)),

    .. math::
        \eta_l(t) = \eta^*\Big(1 - \frac{1}{\gamma t + 1}\Big), \qquad
        \eta_u(t) = \eta^*\Big(1 + \frac{1}{\gamma t}\Big),

    .. math::
        \theta_t = \theta_{t-1} - \operatorname{clip}\Big(
        \frac{\eta \sqrt{1 - \beta_2^t} / (1 - \beta_1^t)}{\sqrt{v_t} + \epsilon},
        \eta_l(t), \eta_u(t)\Big) \odot m_t .

    Both bounds converge to ``final_lr``, turning Adam into SGD with momentum: once they meet,
    the step is ``final_lr * m_t``, i.e. ``torch.optim.SGD(lr=(1 - beta1) * final_lr,
    momentum=beta1)``. ``gamma=inf`` makes the bounds meet from the first step.
    ``weight_decay`` is an L2 penalty added to the gradient, as in the reference implementation.

    LR schedulers: the bounds follow the learning rate, as the authors' reference
    implementation documents: the effective ``final_lr`` is ``final_lr * lr / base_lr``, where
    ``base_lr`` is the group's ``lr`` when the group was created (a param group may also set
    ``base_lr`` itself). ``base_lr`` is a param-group entry, so it is saved in
    :meth:`state_dict` and a resumed run keeps the same scaling even if a scheduler had already
    changed ``lr``.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Adam-phase learning rate, > 0 (default: 1e-3).
        betas: Coefficients of the running averages (default: (0.9, 0.999)).
        final_lr: The SGD learning rate the bounds converge to, >= 0 (default: 0.1).
        gamma: Convergence speed of the bounds, > 0, inf allowed (default: 1e-3).
        eps: Term added to the denominator (default: 1e-8).
        weight_decay: L2 penalty (default: 0).
        amsbound: Use the running maximum of the second moment (AMSBound) (default: False).
        foreach: Use the multi-tensor ``torch._foreach_*`` implementation; ``None`` (default)
            picks it for plain tensors, ``False`` runs the per-tensor reference loop.

    Raises:
        ValueError: For ``lr`` or ``base_lr`` <= 0, negative ``final_lr``, ``eps`` or
            ``weight_decay``, ``gamma`` <= 0 or a beta outside [0, 1).
        TypeError: For non-numeric hyperparameters or non floating-point parameters.
        RuntimeError: From :meth:`step`, for a sparse gradient.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = AdaBound(model.parameters(), lr=1e-3, final_lr=0.1)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> optimizer.step()

    References:
        Luo, Xiong, Liu & Sun, "Adaptive Gradient Methods with Dynamic Bound of Learning Rate",
        ICLR 2019, arXiv:1902.09843.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        final_lr: float = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsbound: bool = False,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "final_lr": final_lr,
            "gamma": gamma,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsbound": amsbound,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # base_lr must exist before the group is checked; a group that brings its own keeps it.
        if isinstance(param_group, dict):
            param_group.setdefault("base_lr", param_group.get("lr", self.defaults["lr"]))
        super().add_param_group(param_group)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_non_negative("final_lr value", group["final_lr"])
        check_positive("gamma value", group["gamma"], allow_inf=True)
        check_non_negative("epsilon value", group["eps"])
        check_non_negative("weight_decay value", group["weight_decay"])
        if not isinstance(group["amsbound"], bool):
            raise TypeError(f"Invalid amsbound: {group['amsbound']!r} (expected True or False)")
        try:
            check_lr(group["base_lr"], positive=True)
        except ValueError:
            raise ValueError(
                f"Invalid learning rate: {group['base_lr']} (AdaBound needs an initial lr > 0: "
                "final_lr is scaled by lr / base_lr)"
            ) from None

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsbound"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            max_exp_avg_sqs.append(state.get("max_exp_avg_sq"))
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        update = (
            _multi_tensor_adabound
            if use_foreach(group["foreach"], params)
            else _single_tensor_adabound
        )
        update(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs if group["amsbound"] else None,
            steps,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            final_lr=group["final_lr"] * group["lr"] / group["base_lr"],
            gamma=group["gamma"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )


class AMSBound(AdaBound):
    r"""AdaBound on the running maximum of the second moment (AMSBound, Luo et al. 2019).

    Exactly :class:`AdaBound` with ``amsbound=True``; see it for the update, the bounds and the
    behaviour under LR schedulers.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Adam-phase learning rate, > 0 (default: 1e-3).
        betas: Coefficients of the running averages (default: (0.9, 0.999)).
        final_lr: The SGD learning rate the bounds converge to (default: 0.1).
        gamma: Convergence speed of the bounds, > 0, inf allowed (default: 1e-3).
        eps: Term added to the denominator (default: 1e-8).
        weight_decay: L2 penalty (default: 0).
        foreach: Use the multi-tensor implementation; ``None`` (default) picks it for plain
            tensors.

    Raises:
        ValueError: As :class:`AdaBound`.
        TypeError: As :class:`AdaBound`.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = AMSBound(model.parameters(), lr=1e-3, final_lr=0.1)

    References:
        Luo, Xiong, Liu & Sun, "Adaptive Gradient Methods with Dynamic Bound of Learning Rate",
        ICLR 2019, arXiv:1902.09843.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        final_lr: float = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas, final_lr, gamma, eps, weight_decay, amsbound=True, foreach=foreach
        )


def _bounds(final_lr: float, gamma: float, step: int) -> tuple[float, float]:
    # With gamma = inf both fractions are exactly 0 and the bounds are final_lr itself.
    lower = final_lr * (1 - 1 / (gamma * step + 1))
    upper = final_lr * (1 + 1 / (gamma * step))
    return lower, upper


def _denominator_bounds(
    final_lr: float, gamma: float, step: int, step_size: float
) -> tuple[float, float]:
    """Bounds on d = sqrt(v) + eps equivalent to clipping step_size / d into [lower, upper].

    clip(s / d, lower, upper) = s / clip(d, s / upper, s / lower) for s > 0, which lets the
    update be one ``addcdiv_`` (as Adam's) instead of a reciprocal, a clip and two products.
    """
    lower, upper = _bounds(final_lr, gamma, step)
    smallest = step_size / upper if upper > 0 else math.inf
    largest = step_size / lower if lower > 0 else math.inf
    return smallest, largest


def _single_tensor_adabound(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor | None] | None,
    steps: list[int],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    final_lr: float,
    gamma: float,
    eps: float,
    weight_decay: float,
) -> None:
    for index, (param, grad, exp_avg, exp_avg_sq) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)
    ):
        step = steps[index]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        second_moment = exp_avg_sq
        if max_exp_avg_sqs is not None:
            running_max = max_exp_avg_sqs[index]
            assert running_max is not None
            torch.maximum(running_max, exp_avg_sq, out=running_max)
            second_moment = running_max
        if lr == 0:
            continue  # the bounds scale to 0 with lr: the step is 0
        step_size = lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
        denom_min, denom_max = _denominator_bounds(final_lr, gamma, step, step_size)
        denom = second_moment.sqrt().add_(eps).clamp_(denom_min, denom_max)
        param.addcdiv_(exp_avg, denom, value=-step_size)


def _multi_tensor_adabound(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor | None] | None,
    steps: list[int],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    final_lr: float,
    gamma: float,
    eps: float,
    weight_decay: float,
) -> None:
    amsbound = max_exp_avg_sqs is not None
    running_maxes = max_exp_avg_sqs if amsbound else [None] * len(params)
    chunks = group_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, running_maxes]  # type: ignore[list-item]
    )
    for (
        chunk_params,
        chunk_grads,
        chunk_exp_avgs,
        chunk_exp_avg_sqs,
        chunk_maxes,
    ), indices in chunks:
        chunk_steps = [steps[i] for i in indices]
        if weight_decay != 0:
            chunk_grads = list(torch._foreach_add(chunk_grads, chunk_params, alpha=weight_decay))
        torch._foreach_lerp_(chunk_exp_avgs, chunk_grads, 1 - beta1)
        torch._foreach_mul_(chunk_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(chunk_exp_avg_sqs, chunk_grads, chunk_grads, 1 - beta2)
        second_moments = chunk_exp_avg_sqs
        if amsbound:
            torch._foreach_maximum_(chunk_maxes, chunk_exp_avg_sqs)
            second_moments = chunk_maxes
        if lr == 0:
            continue  # the bounds scale to 0 with lr: the step is 0
        step_sizes = [lr * (1 - beta2**s) ** 0.5 / (1 - beta1**s) for s in chunk_steps]
        denoms = torch._foreach_sqrt(second_moments)
        torch._foreach_add_(denoms, eps)
        for denom, step, step_size in zip(denoms, chunk_steps, step_sizes, strict=True):
            # One clamp pass per tensor; foreach offers only separate min and max passes.
            denom.clamp_(*_denominator_bounds(final_lr, gamma, step, step_size))
        torch._foreach_addcdiv_(
            chunk_params, chunk_exp_avgs, denoms, [-size for size in step_sizes]
        )
