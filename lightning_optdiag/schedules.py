"""Learning-rate schedules recommended from diagnoses, built from ``torch.optim.lr_scheduler``.

Each diagnosis that a schedule addresses maps to one recommendation, with its reason; the
schedule itself is always a ``torch.optim.lr_scheduler`` class (never re-implemented), built
against the optimizer when it is installed. No Lightning here: the
:class:`~lightning_optdiag.callbacks.ScheduleAdvisor` callback installs them.

- ``needs_warmup``: ``LinearLR`` from 1% over ``2 / (1 - beta2)`` steps, since Adam's second
  moments are unreliable for about that long (Ma & Yarats 2019, arXiv:1910.04209).
- ``lr_too_high``: ``LambdaLR`` at ``1 / (1.5 ratio)``, so that the sharpness falls below the
  stability threshold (Cohen et al. 2021, arXiv:2103.00065).
- ``lr_too_small``: ``OneCycleLR`` up to ``min(10, headroom / 2)`` times the current rate: a
  larger rate stays stable and one cycle anneals back down (Smith & Topin 2017,
  arXiv:1708.07120).
- ``saddle_point``: ``CyclicLR`` between 1x and 3x the current rate: brief larger steps leave
  along the negative-curvature direction (Smith 2017, arXiv:1506.01186).
- ``gradient_noise``: ``CosineAnnealingLR`` over the remaining steps, down to 1% of the smallest
  group's rate (``eta_min`` is one number for all groups): a smaller rate averages the noise
  out (McCandlish et al. 2018, arXiv:1812.06162).
- a converged ``plateau``: ``CosineAnnealingWarmRestarts``: warm restarts (SGDR) can leave the
  basin for a lower one (Loshchilov & Hutter 2016, arXiv:1608.03983).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    CyclicLR,
    LambdaLR,
    LinearLR,
    OneCycleLR,
)

from lightning_optdiag.diagnosis import Diagnosis

__all__ = ["ScheduleRecommendation", "build_schedule", "recommend_schedules"]

SCHEDULES = ("warmup", "decay", "one_cycle", "cyclical", "cosine", "warm_restarts")


@dataclass(frozen=True)
class ScheduleRecommendation:
    """A learning-rate schedule to install, and why.

    Attributes:
        schedule: ``"warmup"``, ``"decay"``, ``"one_cycle"``, ``"cyclical"``, ``"cosine"`` or
            ``"warm_restarts"``.
        diagnosis: the kind of diagnosis it answers.
        reason: one sentence.
        settings: the arguments of :func:`build_schedule` (steps, factors).
    """

    schedule: str
    diagnosis: str
    reason: str
    settings: dict[str, Any] = field(default_factory=dict)

    def build(self, optimizer: Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """The ``torch.optim.lr_scheduler`` object, starting from the optimizer's current
        learning rates."""
        return build_schedule(self.schedule, optimizer, **self.settings)


def recommend_schedules(
    diagnoses: Sequence[Diagnosis],
    *,
    remaining_steps: int,
    warmup_steps: int | None = None,
    answer: Sequence[str] | None = None,
) -> list[ScheduleRecommendation]:
    """Schedules answering the active ``diagnoses``, most urgent first, one per diagnosis.

    Args:
        diagnoses: the doctor's diagnoses (inactive ones are ignored); all of them count when
            deciding whether a plateau has converged.
        answer: recommend only for these kinds (e.g. the ones that just appeared); ``None``:
            all.
        remaining_steps: optimizer steps left in the run (schedules that anneal span them).
        warmup_steps: the warm-up length, ``2 / (1 - beta2)`` for Adam-family optimizers
            (:func:`lightning_optdiag.signals.warmup_horizon`); ``None``: no warm-up advice.

    Returns:
        The recommendations, in the order of the list in this module's docstring.
    """
    remaining = max(int(remaining_steps), 2)
    active = {d.kind: d for d in diagnoses if d.active}
    found: list[ScheduleRecommendation] = []
    if "needs_warmup" in active and warmup_steps:
        steps = min(int(warmup_steps), remaining)
        found.append(
            ScheduleRecommendation(
                "warmup",
                "needs_warmup",
                f"warm the learning rate up linearly from 1% over {steps} steps "
                "(2 / (1 - beta2)): Adam's second moments are unreliable before",
                {"steps": steps},
            )
        )
    if "lr_too_high" in active:
        ratio = float(active["lr_too_high"].evidence.get("sharpness_ratio") or 2.0)
        factor = 1.0 / max(2.0, 1.5 * ratio)
        found.append(
            ScheduleRecommendation(
                "decay",
                "lr_too_high",
                f"multiply the learning rate by {factor:.3g}: the sharpness is {ratio:.2f}x "
                "the stability threshold",
                {"factor": factor},
            )
        )
    if "lr_too_small" in active:
        small_ratio = active["lr_too_small"].evidence.get("sharpness_ratio")
        if small_ratio is None:
            headroom = 20.0  # lr_too_small needs a ratio below 0.05: at least 20x headroom
        else:
            headroom = 1.0 / float(small_ratio) if float(small_ratio) > 0 else math.inf
        peak = min(10.0, headroom / 2.0)
        found.append(
            ScheduleRecommendation(
                "one_cycle",
                "lr_too_small",
                f"one cycle up to {peak:.3g}x the current learning rate over the remaining "
                f"{remaining} steps: {headroom:.3g}x would still be stable",
                {"peak_factor": peak, "steps": remaining},
            )
        )
    if "saddle_point" in active:
        cycle = max(2, min(remaining // 4, 200))
        found.append(
            ScheduleRecommendation(
                "cyclical",
                "saddle_point",
                f"cycle the learning rate between 1x and 3x every {2 * cycle} steps: larger "
                "steps leave the saddle along its negative-curvature direction",
                {"max_factor": 3.0, "half_cycle": cycle},
            )
        )
    if "gradient_noise" in active:
        found.append(
            ScheduleRecommendation(
                "cosine",
                "gradient_noise",
                f"anneal the learning rate to 1% along a cosine over the remaining {remaining} "
                "steps: smaller steps average the gradient noise out",
                {"steps": remaining},
            )
        )
    converged = "plateau" in active and not (
        set(active) & {"lr_too_high", "lr_too_small", "saddle_point", "gradient_noise"}
    )
    if converged and "model_bias" not in active:
        period = max(2, min(remaining // 3, 1000))
        found.append(
            ScheduleRecommendation(
                "warm_restarts",
                "plateau",
                f"cosine annealing with warm restarts every {period} steps (SGDR): each "
                "restart can leave the current basin for a lower one",
                {"period": period},
            )
        )
    if answer is not None:
        found = [item for item in found if item.diagnosis in set(answer)]
    return found


def build_schedule(
    schedule: str, optimizer: Optimizer, **settings: Any
) -> torch.optim.lr_scheduler.LRScheduler:
    """Build ``schedule`` (see :data:`SCHEDULES`) on ``optimizer`` from its current rates.

    Raises:
        ValueError: an unknown ``schedule``.
    """
    builders: dict[str, Callable[..., Any]] = {
        "warmup": lambda steps: LinearLR(optimizer, start_factor=0.01, total_iters=steps),
        "decay": lambda factor: LambdaLR(optimizer, lambda _: factor),
        "one_cycle": lambda peak_factor, steps: OneCycleLR(
            optimizer,
            max_lr=[group["lr"] * peak_factor for group in optimizer.param_groups],
            total_steps=steps,
            cycle_momentum=False,  # a learning-rate schedule: leave momentum and betas alone
        ),
        "cyclical": lambda max_factor, half_cycle: CyclicLR(
            optimizer,
            base_lr=[group["lr"] for group in optimizer.param_groups],
            max_lr=[group["lr"] * max_factor for group in optimizer.param_groups],
            step_size_up=half_cycle,
            cycle_momentum=False,
        ),
        "cosine": lambda steps: CosineAnnealingLR(
            optimizer, T_max=steps, eta_min=0.01 * min(g["lr"] for g in optimizer.param_groups)
        ),
        "warm_restarts": lambda period: CosineAnnealingWarmRestarts(optimizer, T_0=period),
    }
    if schedule not in builders:
        raise ValueError(f"Invalid schedule: {schedule!r} (expected one of {', '.join(SCHEDULES)})")
    # torch's schedulers take their base from an existing ``initial_lr`` (an earlier scheduler
    # leaves one behind): start from where training is instead.
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return builders[schedule](**settings)
