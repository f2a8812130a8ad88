"""The SWATS switch test, on plain numbers: when has Adam's step settled on an SGD rate?"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["SwatsCriterion"]


@dataclass
class SwatsCriterion:
    r"""Keskar & Socher's test for switching from Adam to SGD, one step at a time.

    After each Adam step :math:`p_k` taken with gradient :math:`g_k`, the SGD learning rate
    whose step would have the same projection on :math:`p_k` is
    :math:`\gamma_k = p_k^\top p_k / (-p_k^\top g_k)`; its exponential average with bias
    correction is :math:`\Lambda_k = \lambda_k / (1 - \beta_2^k)`,
    :math:`\lambda_k = \beta_2 \lambda_{k-1} + (1 - \beta_2) \gamma_k`. The test fires once
    ``k >= min_steps``, :math:`\Lambda_k > 0` and :math:`|\Lambda_k - \gamma_k| < \epsilon
    \Lambda_k` (relative: the paper's absolute :math:`\epsilon = 10^{-9}` practically never
    fires). Exactly the rule of :class:`lightning_optdiag.optim.SWATS` in ``"global"`` mode.

    Attributes:
        beta2: Adam's second-moment decay, used for the average.
        threshold: relative tolerance :math:`\epsilon`.
        min_steps: first step at which the test may fire.
        steps: Adam steps seen.
        average: the running average :math:`\lambda_k` (before bias correction).
        last_gamma: :math:`\gamma_k` of the latest step with a usable projection.

    References:
        Keskar & Socher (2017), "Improving Generalization Performance by Switching from Adam
        to SGD", arXiv:1712.07628.
    """

    beta2: float = 0.999
    threshold: float = 5e-3
    min_steps: int = 10
    steps: int = 0
    average: float = 0.0
    last_gamma: float | None = None

    @property
    def estimate(self) -> float | None:
        """The bias-corrected SGD learning rate :math:`\\Lambda_k` (``None`` before a step)."""
        if self.steps == 0 or self.last_gamma is None:
            return None
        return self.average / (1.0 - self.beta2**self.steps)

    def update(self, squared_norm: float, projection: float) -> bool:
        """Fold one step's :math:`p^\\top p` and :math:`p^\\top g` in; return whether the test
        fires at this step."""
        self.steps += 1
        if projection == 0.0:
            return False
        gamma = squared_norm / -projection
        if not math.isfinite(gamma):
            return False
        self.last_gamma = gamma
        self.average = self.beta2 * self.average + (1.0 - self.beta2) * gamma
        estimate = self.average / (1.0 - self.beta2**self.steps)
        if self.steps < self.min_steps or not estimate > 0.0:
            return False
        return abs(estimate - gamma) < self.threshold * estimate

    def state_dict(self) -> dict[str, Any]:
        return {
            "beta2": self.beta2,
            "steps": self.steps,
            "average": self.average,
            "last_gamma": self.last_gamma,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta2 = float(state.get("beta2", self.beta2))
        self.steps = int(state["steps"])
        self.average = float(state["average"])
        self.last_gamma = None if state["last_gamma"] is None else float(state["last_gamma"])
