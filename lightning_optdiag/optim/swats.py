"""SWATS: train with Adam, then switch to momentum SGD once Adam's projected SGD step settles."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT
from torch.optim.sgd import sgd

from lightning_optdiag._validation import check_choice, check_int
from lightning_optdiag.optim._base import (
    BundledOptimizer,
    check_betas,
    check_lr,
    check_non_negative,
    dot,
    group_by_device_and_dtype,
    host_floats,
    require_real,
    use_foreach,
)

__all__ = ["DEFAULT_SWITCH_MIN_STEPS", "DEFAULT_SWITCH_THRESHOLD", "SWATS", "SwitchStatus"]

#: Default relative switch threshold: switch when |Lambda - gamma| < 5e-3 * Lambda.
DEFAULT_SWITCH_THRESHOLD = 5e-3
#: Default first Adam step at which the switch test is evaluated (1 / (1 - beta1) for 0.9).
DEFAULT_SWITCH_MIN_STEPS = 10

_MODES = ("global", "per_layer")
_RULES = ("relative", "absolute")


@dataclass(frozen=True)
class SwitchStatus:
    """Where one switching unit of :class:`SWATS` stands.

    Attributes:
        group: Index of the param group.
        param: Index of the tensor inside the group in ``"per_layer"`` mode; ``None`` in
            ``"global"`` mode, where the whole group switches at once.
        switched: Whether the unit now runs momentum SGD.
        switch_step: The Adam step after which it switched, ``None`` before the switch.
        lambda_estimate: The bias-corrected estimate Lambda of the SGD learning rate (frozen at
            the switch), ``None`` before the first usable step.
        sgd_lr: The SGD phase's learning rate ``(1 - beta1) * Lambda`` (scaled by any change of
            the group's ``lr`` since the switch), ``None`` before the switch.
    """

    group: int
    param: int | None
    switched: bool
    switch_step: int | None
    lambda_estimate: float | None
    sgd_lr: float | None


@dataclass
class AdamSteps:
    """What one Adam step leaves for the switch test, per tensor.

    With r = m / denom the step is p_k = -step_size * r, so p_k . p_k = step_size^2 r . r and
    p_k . g_k = -step_size r . g_k. The dot products stay on the device until
    :meth:`projections` reads them all at once.
    """

    direction_squares: list[Tensor] = field(default_factory=list)
    direction_grads: list[Tensor] = field(default_factory=list)
    step_sizes: list[float] = field(default_factory=list)

    def add(self, direction: Tensor, grad: Tensor, step_size: float) -> None:
        self.direction_squares.append(dot(direction, direction))
        self.direction_grads.append(dot(direction, grad))
        self.step_sizes.append(step_size)

    def projections(self) -> tuple[list[float], list[float]]:
        """Per tensor p_k . p_k and p_k . g_k, with a single device synchronisation."""
        values = host_floats(self.direction_squares + self.direction_grads)
        count = len(self.step_sizes)
        sizes = self.step_sizes
        squared_norms = [s * s * v for s, v in zip(sizes, values[:count], strict=True)]
        projections = [-s * v for s, v in zip(sizes, values[count:], strict=True)]
        return squared_norms, projections


class SWATS(BundledOptimizer):
    r"""Adam that switches to momentum SGD (SWATS, Keskar & Socher 2017).

    Until the switch, each step is exactly :class:`torch.optim.Adam` (L2 ``weight_decay`` as
    Adam's). After every Adam step :math:`p_k` with gradient :math:`g_k` (when
    :math:`p_k^\top g_k \ne 0`) the projected SGD learning rate and its average are

    .. math::
        \gamma_k = \frac{p_k^\top p_k}{-p_k^\top g_k}, \qquad
        \lambda_k = \beta_2 \lambda_{k-1} + (1 - \beta_2)\gamma_k, \qquad
        \Lambda_k = \frac{\lambda_k}{1 - \beta_2^k},

    and the unit switches when :math:`k \ge` ``switch_min_steps``, :math:`\Lambda_k > 0` and

    - ``switch_rule="relative"`` (default): :math:`|\Lambda_k - \gamma_k| < \epsilon\,\Lambda_k`;
    - ``switch_rule="absolute"`` (the paper's test): :math:`|\Lambda_k - \gamma_k| < \epsilon`,

    with :math:`\epsilon` = ``switch_threshold``. From the next step on the unit runs
    ``torch.optim.SGD(lr=(1 - beta1) * Lambda, momentum=beta1)`` on a fresh momentum buffer
    (torch's functional ``sgd`` is called, so the SGD phase is torch's SGD bit for bit); Adam's
    moment buffers are then freed. The paper's exact rule is ``switch_rule="absolute",
    switch_threshold=1e-9, switch_min_steps=2``.

    Why the defaults (relative ``5e-3``, from step 10): :math:`\gamma` has the units of a
    learning rate, so an absolute threshold means something different on every problem; the
    paper's ``1e-9`` asks for agreement to 1e-6 to 1e-8 relative at a typical
    :math:`\Lambda` of 1e-3 to 1e-1, while the minibatch noise of :math:`\gamma` is tens of
    percent, so that test practically never fires (two popular implementations never switch on
    a small MLP in 2000 steps). Since :math:`\Lambda` averages :math:`\gamma` with a long
    memory, the relative test fires when :math:`\gamma` crosses its settled average. On a small
    MLP trained with Adam (lr 3e-4, 1e-3 and 3e-3, 12 seeds each, 2000 steps) the paper's rule
    never fired; ``5e-3`` fired in all 36 runs within 1000 steps (median step 45, 87 and 313);
    ``1e-3`` never fired in 10 of the 36. A :math:`\gamma` that keeps drifting away from its
    average never fires. The test starts at step 10 (about :math:`1/(1-\beta_1)`) because over
    the first steps Adam's step is nearly ``lr * sign(g)``, so the first few :math:`\gamma`
    nearly agree by construction: without that guard the relative test fired at step 2 or 4 in
    some of those runs (``python benchmarks/optimizers.py --swats-threshold-study`` reproduces
    these figures). ``switch_threshold=0`` never switches (pure Adam); ``switch_threshold=inf``
    switches at step ``switch_min_steps``.

    Modes: ``"global"`` (the paper's form) computes one :math:`\gamma` from the concatenation of
    every tensor of a param group and switches the whole group with that group's
    :math:`\Lambda`; ``"per_layer"`` keeps one :math:`\Lambda` and one switch per tensor, each
    tensor switching with its own :math:`\Lambda`.

    LR schedulers: before the switch ``lr`` is Adam's. After it the SGD rate is
    ``(1 - beta1) * Lambda * lr / lr_at_switch``, so a schedule keeps shaping training.

    State: Adam's per-tensor state (``step``, ``exp_avg``, ``exp_avg_sq``), then SGD's
    ``momentum_buffer``. In ``"global"`` mode the group dict carries ``swats_step``,
    ``swats_lambda_avg`` (the raw average :math:`\lambda_k`), ``switch_step``,
    ``switch_lambda`` and ``lr_at_switch``; in ``"per_layer"`` mode the same (``lambda_avg``
    instead of ``swats_lambda_avg``) live in each tensor's state. All of it is in
    :meth:`state_dict`, so a resumed run continues in the right phase with the right Lambda.

    Args:
        params: Iterable of parameters or dicts defining parameter groups.
        lr: Adam learning rate (default: 1e-3).
        betas: Adam's coefficients; ``beta2`` also averages :math:`\gamma` and ``beta1`` is the
            SGD phase's momentum (default: (0.9, 0.999)).
        eps: Term added to Adam's denominator (default: 1e-8).
        weight_decay: L2 penalty added to the gradient in both phases (default: 0).
        mode: ``"global"`` or ``"per_layer"`` (default: ``"global"``).
        switch_rule: ``"relative"`` or ``"absolute"`` (default: ``"relative"``).
        switch_threshold: :math:`\epsilon` of the switch test, >= 0
            (default: :data:`DEFAULT_SWITCH_THRESHOLD` = 5e-3, relative).
        switch_min_steps: First step :math:`k` at which the switch test runs, >= 2
            (default: :data:`DEFAULT_SWITCH_MIN_STEPS` = 10).
        foreach: Use the multi-tensor ``torch._foreach_*`` implementation; ``None`` (default)
            picks it for plain tensors, ``False`` runs the per-tensor reference loop.

    Raises:
        ValueError: For a negative ``lr``, ``eps``, ``weight_decay`` or ``switch_threshold``, a
            beta outside [0, 1), ``switch_min_steps`` < 2 or an unknown ``mode`` /
            ``switch_rule``.
        TypeError: For non-numeric hyperparameters or non floating-point parameters.
        RuntimeError: From :meth:`step`, for a sparse gradient.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = SWATS(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> optimizer.step()
        >>> optimizer.switched
        False

    References:
        Keskar & Socher, "Improving Generalization Performance by Switching from Adam to SGD",
        2017, arXiv:1712.07628.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        mode: Literal["global", "per_layer"] = "global",
        switch_rule: Literal["relative", "absolute"] = "relative",
        switch_threshold: float = DEFAULT_SWITCH_THRESHOLD,
        switch_min_steps: int = DEFAULT_SWITCH_MIN_STEPS,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "mode": mode,
            "switch_rule": switch_rule,
            "switch_threshold": switch_threshold,
            "switch_min_steps": switch_min_steps,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_non_negative("epsilon value", group["eps"])
        check_non_negative("weight_decay value", group["weight_decay"])
        check_choice("mode", group["mode"], _MODES)
        check_choice("switch_rule", group["switch_rule"], _RULES)
        threshold = group["switch_threshold"]
        if require_real("switch_threshold", threshold) < 0 or math.isnan(threshold):
            raise ValueError(
                f"Invalid switch_threshold: {threshold} (expected a number >= 0, inf allowed)"
            )
        check_int("switch_min_steps", group["switch_min_steps"], minimum=2)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["mode"] == "global":
            group.setdefault("swats_step", 0)
            group.setdefault("swats_lambda_avg", 0.0)
            group.setdefault("switch_step", None)
            group.setdefault("switch_lambda", None)
            group.setdefault("lr_at_switch", None)

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        """Adam or SGD phase, per switching unit."""
        if group["mode"] == "global":
            self._step_global(group, params, grads)
        else:
            self._step_per_layer(group, params, grads)

    @property
    def switched(self) -> bool:
        """True once every switching unit that has stepped runs SGD."""
        statuses = [s for s in self.switch_status() if s.lambda_estimate is not None]
        return bool(statuses) and all(s.switched for s in statuses)

    def switch_status(self) -> list[SwitchStatus]:
        """One :class:`SwitchStatus` per group (``"global"``) or per tensor (``"per_layer"``)."""
        statuses: list[SwitchStatus] = []
        for index, group in enumerate(self.param_groups):
            if group["mode"] == "global":
                statuses.append(
                    _status(index, None, group, group, "swats_step", "swats_lambda_avg")
                )
                continue
            for param_index, p in enumerate(group["params"]):
                state = self.state.get(p, {})
                statuses.append(_status(index, param_index, group, state, "step", "lambda_avg"))
        return statuses

    def _step_global(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        foreach = use_foreach(group["foreach"], params)
        if group["switch_step"] is not None:
            self._sgd(group, params, grads, _sgd_lr(group, group), foreach)
            return
        squared_norms, projections = self._adam(group, params, grads, foreach).projections()
        group["swats_step"] += 1
        # The paper's form: p and g of the whole group, concatenated.
        squared_norm, projection = sum(squared_norms), sum(projections)
        if self._track_and_test(
            group, group, "swats_step", "swats_lambda_avg", squared_norm, projection
        ):
            for p in params:
                _drop_adam_state(self.state[p])

    def _step_per_layer(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        foreach = use_foreach(group["foreach"], params)
        adam_params: list[Tensor] = []
        adam_grads: list[Tensor] = []
        for p, g in zip(params, grads, strict=True):
            state = self.state[p]
            if state.get("switch_step") is None:
                adam_params.append(p)
                adam_grads.append(g)
            else:
                self._sgd(group, [p], [g], _sgd_lr(group, state), foreach)
        if not adam_params:
            return
        adam_steps = self._adam(group, adam_params, adam_grads, foreach)
        squared_norms, projections = adam_steps.projections()
        for index, p in enumerate(adam_params):
            state = self.state[p]
            if self._track_and_test(
                group, state, "step", "lambda_avg", squared_norms[index], projections[index]
            ):
                _drop_adam_state(state)

    def _track_and_test(
        self,
        group: dict[str, Any],
        unit: dict[str, Any],
        step_key: str,
        average_key: str,
        squared_norm: float,
        projection: float,
    ) -> bool:
        """Fold this step's gamma into the unit's average; switch the unit if the test passes."""
        beta2 = group["betas"][1]
        step = unit[step_key]
        unit.setdefault(average_key, 0.0)
        if projection == 0.0:
            return False
        gamma = squared_norm / -projection
        if not math.isfinite(gamma):
            return False
        unit[average_key] = beta2 * unit[average_key] + (1 - beta2) * gamma
        estimate = unit[average_key] / (1 - beta2**step)
        if step < group["switch_min_steps"] or not _criterion_fires(
            gamma, estimate, group["switch_rule"], group["switch_threshold"]
        ):
            return False
        unit["switch_step"] = step
        unit["switch_lambda"] = estimate
        unit["lr_at_switch"] = group["lr"]
        return True

    def _adam(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], foreach: bool
    ) -> AdamSteps:
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adam_step = _multi_tensor_adam if foreach else _single_tensor_adam
        return adam_step(
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
        )

    def _sgd(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        lr: float,
        foreach: bool,
    ) -> None:
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        sgd(
            params,
            grads,
            buffers,
            foreach=foreach,
            weight_decay=group["weight_decay"],
            momentum=group["betas"][0],
            lr=lr,
            dampening=0.0,
            nesterov=False,
            maximize=False,
        )
        for p, buffer in zip(params, buffers, strict=True):
            self.state[p]["momentum_buffer"] = buffer


def _criterion_fires(gamma: float, estimate: float, rule: str, threshold: float) -> bool:
    # A negative or zero Lambda is no SGD learning rate, however well gamma agrees with it.
    if not estimate > 0.0:
        return False
    gap = abs(estimate - gamma)
    if rule == "relative":
        return gap < threshold * estimate
    return gap < threshold


def _sgd_lr(group: dict[str, Any], unit: dict[str, Any]) -> float:
    beta1 = group["betas"][0]
    lr_at_switch = unit["lr_at_switch"]
    # The ratio first: it is exactly 1.0 while the lr is unchanged, so the SGD phase then uses
    # exactly (1 - beta1) * Lambda.
    scale = group["lr"] / lr_at_switch if lr_at_switch else 1.0
    lr: float = (1 - beta1) * unit["switch_lambda"] * scale
    return lr


def _drop_adam_state(state: dict[str, Any]) -> None:
    state.pop("exp_avg", None)
    state.pop("exp_avg_sq", None)


def _status(
    group_index: int,
    param_index: int | None,
    group: dict[str, Any],
    unit: dict[str, Any],
    step_key: str,
    average_key: str,
) -> SwitchStatus:
    switch_step = unit.get("switch_step")
    if switch_step is not None:
        return SwitchStatus(
            group_index, param_index, True, switch_step, unit["switch_lambda"], _sgd_lr(group, unit)
        )
    step = unit.get(step_key, 0)
    estimate = None
    if step > 0 and average_key in unit:
        estimate = unit[average_key] / (1 - group["betas"][1] ** step)
    return SwitchStatus(group_index, param_index, False, None, estimate, None)


def _single_tensor_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: Iterable[int],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    weight_decay: float,
) -> AdamSteps:
    """torch.optim.Adam's for-loop update, op for op, keeping what gamma needs.

    The direction r = m / denom is computed in the memory of ``denom`` once the parameter is
    updated (p_k = -step_size * r is never allocated); the result holds r . r and r . g_k.
    """
    result = AdamSteps()
    for param, grad, exp_avg, exp_avg_sq, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, steps, strict=True
    ):
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        # Reduced right away, so each temporary is freed before the next tensor's, as in
        # torch's loop (keeping them all alive costs fresh memory and page faults every step).
        result.add(torch.div(exp_avg, denom, out=denom), grad, step_size)
    return result


def _multi_tensor_adam(
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
) -> AdamSteps:
    """The ``torch._foreach_*`` twin of :func:`_single_tensor_adam`: torch's foreach Adam."""
    directions: list[Tensor | None] = [None] * len(params)
    used_grads: list[Tensor | None] = [None] * len(params)
    step_sizes = [lr / (1 - beta1**step) for step in steps]
    chunks = group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs])
    for (chunk_params, chunk_grads, chunk_exp_avgs, chunk_exp_avg_sqs), indices in chunks:
        chunk_steps = [steps[i] for i in indices]
        if weight_decay != 0:
            chunk_grads = list(torch._foreach_add(chunk_grads, chunk_params, alpha=weight_decay))
        torch._foreach_lerp_(chunk_exp_avgs, chunk_grads, 1 - beta1)
        torch._foreach_mul_(chunk_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(chunk_exp_avg_sqs, chunk_grads, chunk_grads, 1 - beta2)
        bias_corrections2_sqrt = [(1 - beta2**step) ** 0.5 for step in chunk_steps]
        denoms = torch._foreach_sqrt(chunk_exp_avg_sqs)
        torch._foreach_div_(denoms, bias_corrections2_sqrt)
        torch._foreach_add_(denoms, eps)
        neg_step_sizes = [-step_sizes[i] for i in indices]
        torch._foreach_addcdiv_(chunk_params, chunk_exp_avgs, denoms, neg_step_sizes)
        for position, index in enumerate(indices):
            # In place over the denominator: no foreach op divides into its divisor.
            directions[index] = torch.div(
                chunk_exp_avgs[position], denoms[position], out=denoms[position]
            )
            used_grads[index] = chunk_grads[position]
    result = AdamSteps()
    for direction, grad, step_size in zip(
        _filled(directions), _filled(used_grads), step_sizes, strict=True
    ):
        result.add(direction, grad, step_size)
    return result


def _filled(tensors: list[Tensor | None]) -> list[Tensor]:
    return [t for t in tensors if t is not None]
