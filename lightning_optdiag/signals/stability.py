"""The curvature an optimizer can tolerate: stability thresholds and preconditioners.

On a quadratic with Hessian ``H``, a first-order method with update ``-lr * P^-1 g`` (plus
momentum) is stable exactly when ``lr * lambda_max(P^-1 H) < c``, where the constant ``c``
depends on the momentum scheme:

- gradient descent: ``c = 2``;
- heavy-ball momentum ``beta`` with dampening ``d``: ``c = 2 (1 + beta) / (1 - d)``;
- Nesterov momentum ``beta``: ``c = 2 (1 + beta) / (1 + 2 beta)``;
- Adam-family with ``beta1`` (preconditioner ``P = sqrt(v_hat) + eps`` frozen):
  ``c = (2 + 2 beta1) / (1 - beta1)``, 38 for ``beta1 = 0.9`` (Cohen et al., 2022).

Full-batch training drifts to the edge of this threshold and hovers there (Cohen et al., 2021),
so ``sharpness / threshold`` is a scale-free measure of how hard the learning rate is pushing:
about 1 at the edge of stability, well above 1 when the iterates bounce between the walls of a
ravine, far below 1 when the step is too timid for the curvature.

``P^-1 H`` is not symmetric, but it has the eigenvalues of ``D^1/2 H D^1/2`` with
``D = P^-1``, so Lanczos applies to the symmetrised operator. Parameter groups with different
learning rates are folded into ``D`` too (``D = (lr_group / lr) P^-1``).

References:
    Cohen, Kaur, Li, Kolter, Talwalkar (2021), "Gradient Descent on Neural Networks Typically
    Occurs at the Edge of Stability", arXiv:2103.00065.
    Cohen, Ghorbani, Krishnan et al. (2022), "Adaptive Gradient Methods at the Edge of
    Stability", arXiv:2207.14484.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["StabilityRule", "optimizer_family", "stability_rule", "warmup_horizon"]


@dataclass(frozen=True)
class StabilityRule:
    """How the stability of one optimizer's current step is measured.

    Attributes:
        family: ``"sgd"``, ``"heavy_ball"``, ``"nesterov"``, ``"adam"``, ``"rmsprop"`` or
            ``"adagrad"``.
        constant: ``c`` in ``lr * lambda_max(D H) < c``.
        lr: the reference learning rate (the largest over the parameter groups).
        scale: ``D^1/2`` per parameter (aligned with the parameters passed in), or ``None``
            when ``D`` is the identity and the sharpness is the plain ``lambda_max(H)``.
    """

    family: str
    constant: float
    lr: float
    scale: list[Tensor] | None

    @property
    def threshold(self) -> float:
        """The largest stable sharpness, ``c / lr`` (``inf`` at ``lr = 0``)."""
        return self.constant / self.lr if self.lr > 0 else math.inf

    def ratio(self, sharpness: float) -> float:
        """``sharpness / threshold``: 1 at the edge of stability."""
        return sharpness * self.lr / self.constant


def stability_rule(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
) -> StabilityRule | None:
    """The stability rule of ``optimizer`` for the Hessian over ``params``.

    Supported: :class:`torch.optim.SGD` (plain, heavy-ball, Nesterov) and optimizers with the
    same group keys (such as ``SGDW``); the Adam family (state ``exp_avg_sq`` with ``betas``:
    Adam, AdamW, AMSGrad, and SWATS before its switch; AdaBound too, whose step clipping is not
    modelled); RMSprop; Adagrad; wrappers exposing ``base_optimizer`` (Lookahead: its
    slow-weight averaging does not change the fast weights' stability). Not supported: NAdam
    and RAdam (their momentum schedule and rectification change the threshold), layer-wise
    trust-ratio methods (LARS, LAMB) and second-order methods.

    Adam's constant holds once the bias correction of its first moment has faded (after about
    ``1 / (1 - beta1)`` steps); in the very first steps the full preconditioned step is taken
    and the effective constant is closer to 2.

    Parameters the optimizer does not hold get ``D = 0`` (they never move).

    Returns:
        The rule, or ``None`` when the optimizer is unsupported, or adaptive but without
        state yet (before its first step), or every learning rate is zero.
    """
    base = getattr(optimizer, "base_optimizer", None)
    if isinstance(base, torch.optim.Optimizer):
        return stability_rule(base, params)
    name = type(optimizer).__name__
    if name in ("LAMB", "LARS") or isinstance(optimizer, _UNMODELLED):
        return None
    if getattr(optimizer, "switched", False):
        return None
    owner: dict[int, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            owner[id(param)] = group
    groups = [owner.get(id(p)) for p in params]
    present = [g for g in groups if g is not None]
    if not present:
        return None
    lr = max(float(g["lr"]) for g in present)
    if not lr > 0:
        return None
    family, constant = _family(present[0], optimizer)
    if family is None:
        return None
    constant = min(_family(g, optimizer)[1] or constant for g in present)  # the strictest group
    adaptive = family in ("adam", "rmsprop", "adagrad")
    uniform = all(g is not None and float(g["lr"]) == lr for g in groups)
    if not adaptive and uniform:
        return StabilityRule(family, constant, lr, None)
    scale = []
    for param, owner_group in zip(params, groups, strict=True):
        if owner_group is None:
            scale.append(torch.zeros_like(param))
            continue
        relative = float(owner_group["lr"]) / lr
        if adaptive:
            inverse = _inverse_preconditioner(family, optimizer.state.get(param, {}), owner_group)
            if inverse is None:
                return None  # no second-moment estimate yet
            scale.append((inverse * relative).sqrt())
        else:
            scale.append(torch.full_like(param, math.sqrt(relative)))
    return StabilityRule(family, constant, lr, scale)


def _family(group: dict[str, Any], optimizer: torch.optim.Optimizer) -> tuple[str | None, float]:
    if "betas" in group and (
        isinstance(optimizer, _ADAM_LIKE) or _has_state(optimizer, "exp_avg_sq")
    ):
        beta1 = float(group["betas"][0])
        return "adam", (2.0 + 2.0 * beta1) / (1.0 - beta1)
    if isinstance(optimizer, torch.optim.RMSprop):
        momentum = float(group.get("momentum", 0.0))
        return "rmsprop", 2.0 * (1.0 + momentum)
    if isinstance(optimizer, torch.optim.Adagrad):
        return "adagrad", 2.0
    if "momentum" in group and "betas" not in group:
        momentum = float(group["momentum"])
        if momentum == 0.0:
            return "sgd", 2.0
        if group.get("nesterov", False):
            return "nesterov", 2.0 * (1.0 + momentum) / (1.0 + 2.0 * momentum)
        dampening = float(group.get("dampening", 0.0))
        return "heavy_ball", 2.0 * (1.0 + momentum) / (1.0 - dampening)
    return None, math.nan


_ADAM_LIKE = (torch.optim.Adam, torch.optim.AdamW)
# Updates the rules above do not describe: NAdam's Nesterov-style momentum schedule is stable only
# at about a tenth of Adam's threshold, RAdam's rectification rescales (or drops) the
# preconditioned step, LBFGS is second-order.
_UNMODELLED = (torch.optim.NAdam, torch.optim.RAdam, torch.optim.LBFGS)


def _has_state(optimizer: torch.optim.Optimizer, key: str) -> bool:
    return any(key in state for state in optimizer.state.values())


def _inverse_preconditioner(
    family: str, state: dict[str, Any], group: dict[str, Any]
) -> Tensor | None:
    """``1 / P`` elementwise for one parameter, from the optimizer's own statistics."""
    eps = float(group.get("eps", 1e-8))
    if family == "adam":
        second = state.get("max_exp_avg_sq") if group.get("amsgrad") else None
        second = state.get("exp_avg_sq") if second is None else second
        if second is None or "step" not in state:
            return None
        step = float(state["step"])
        beta2 = float(group["betas"][1])
        corrected = second / (1.0 - beta2**step) if step > 0 else second
        return 1.0 / (corrected.sqrt() + eps)
    if family == "rmsprop":
        square = state.get("square_avg")
        if square is None:
            return None
        if group.get("centered") and "grad_avg" in state:
            square = square - state["grad_avg"] ** 2
        return 1.0 / (square.clamp_min(0).sqrt() + eps)
    accumulated = state.get("sum")  # adagrad
    step = float(state.get("step", 0))
    if accumulated is None or step == 0:
        return None  # torch's Adagrad creates its sums in the constructor: wait for a step
    decay = 1.0 / (1.0 + max(step - 1.0, 0.0) * float(group.get("lr_decay", 0.0)))
    return decay / (accumulated.sqrt() + eps)


def optimizer_family(optimizer: torch.optim.Optimizer) -> str | None:
    """The family of ``optimizer`` for recommendations, judged from its first parameter group
    and usable before the first step: ``"adam"`` for every optimizer with ``betas`` (the ones
    that want a warm-up), else as :func:`stability_rule` names it (``None``: none of these).
    Unlike :func:`stability_rule`, it does not say whether a stability threshold is known."""
    base = getattr(optimizer, "base_optimizer", None)
    if isinstance(base, torch.optim.Optimizer):
        return optimizer_family(base)
    if not optimizer.param_groups:
        return None
    group = optimizer.param_groups[0]
    if "betas" in group:
        return "adam"
    return _family(group, optimizer)[0]


def warmup_horizon(optimizer: torch.optim.Optimizer) -> int | None:
    """``2 / (1 - beta2)`` steps for optimizers with ``betas`` (Ma & Yarats, 2019,
    arXiv:1910.04209), ``None`` for the others."""
    base = getattr(optimizer, "base_optimizer", None)
    if isinstance(base, torch.optim.Optimizer):
        return warmup_horizon(base)
    if not optimizer.param_groups or "betas" not in optimizer.param_groups[0]:
        return None
    beta2 = float(optimizer.param_groups[0]["betas"][1])
    return max(1, round(2.0 / (1.0 - beta2))) if beta2 < 1.0 else None
