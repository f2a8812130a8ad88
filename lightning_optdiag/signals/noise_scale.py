"""The gradient noise scale from gradient norms measured at two batch sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightning_optdiag._validation import check_float

__all__ = ["GradientNoiseScale", "NoiseScaleEstimate"]


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """Smoothed estimates of the true gradient's size and of the per-example noise.

    Attributes:
        gradient_sq: ``|G|^2``, the squared norm of the expected gradient.
        noise_trace: ``tr(Sigma)``, the trace of the per-example gradient covariance.
        simple_noise_scale: ``B_simple = tr(Sigma) / |G|^2`` (``inf`` when ``|G|^2 <= 0``: the
            signal is lost in the noise).
        batch_size: the larger batch size of the latest measurement (the training batch).
        noise_to_signal: ``B_simple / batch_size``: above 1 the noise in a mini-batch
            gradient outweighs its signal.
        measurements: how many pairs of norms went into the averages.
    """

    gradient_sq: float
    noise_trace: float
    simple_noise_scale: float
    batch_size: float
    noise_to_signal: float
    measurements: int


class GradientNoiseScale:
    r"""Running estimate of the simple gradient noise scale (McCandlish et al., 2018).

    For a mini-batch gradient of size ``B``, ``E|g_B|^2 = |G|^2 + tr(Sigma) / B``. Two batch sizes
    ``B_s < B_b`` measured on the same parameters give unbiased estimates of both terms:

    .. math::

        |G|^2 \approx \frac{B_b |g_b|^2 - B_s |g_s|^2}{B_b - B_s}, \qquad
        \operatorname{tr}\Sigma \approx \frac{|g_s|^2 - |g_b|^2}{1/B_s - 1/B_b}.

    Each is noisy and the ratio of noisy estimates is biased, so the two are smoothed
    separately with an exponential moving average (with bias correction) before dividing.

    Args:
        decay: weight of the past in the moving averages, in ``[0, 1)``.

    Raises:
        TypeError: ``decay`` is not a real number.
        ValueError: ``decay`` is outside ``[0, 1)``.

    Example::

        scale = GradientNoiseScale()
        scale.update(small_sq_norm=4.1, small_batch=16, big_sq_norm=1.3, big_batch=64)
        print(scale.estimate.simple_noise_scale)

    References:
        McCandlish, Kaplan, Amodei et al. (2018), "An Empirical Model of Large-Batch Training",
        arXiv:1812.06162, appendix A.1.
    """

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = check_float("decay", decay, minimum=0.0, maximum=1.0)
        if self.decay >= 1.0:
            raise ValueError(f"Invalid decay: {decay} (expected a number in [0, 1))")
        self._gradient_sq = 0.0
        self._noise_trace = 0.0
        self._weight = 0.0
        self._count = 0
        self._batch = float("nan")

    def update(
        self, small_sq_norm: float, small_batch: float, big_sq_norm: float, big_batch: float
    ) -> None:
        """Add one pair of squared gradient norms measured at batch sizes ``small_batch`` and
        ``big_batch`` on the same parameters; non-finite norms are ignored.

        Raises:
            ValueError: the batch sizes are not positive with ``small_batch < big_batch``.
        """
        if not 0 < small_batch < big_batch:
            raise ValueError(
                f"Invalid batch sizes: small_batch={small_batch}, big_batch={big_batch} "
                "(expected 0 < small_batch < big_batch)"
            )
        if not (math.isfinite(small_sq_norm) and math.isfinite(big_sq_norm)):
            return
        gradient_sq = (big_batch * big_sq_norm - small_batch * small_sq_norm) / (
            big_batch - small_batch
        )
        noise_trace = (small_sq_norm - big_sq_norm) / (1.0 / small_batch - 1.0 / big_batch)
        keep = self.decay
        self._gradient_sq = keep * self._gradient_sq + (1 - keep) * gradient_sq
        self._noise_trace = keep * self._noise_trace + (1 - keep) * noise_trace
        self._weight = keep * self._weight + (1 - keep)
        self._count += 1
        self._batch = float(big_batch)

    @property
    def estimate(self) -> NoiseScaleEstimate | None:
        """The current estimate (``None`` before the first measurement)."""
        if self._count == 0:
            return None
        gradient_sq = self._gradient_sq / self._weight
        noise_trace = max(self._noise_trace / self._weight, 0.0)
        scale = noise_trace / gradient_sq if gradient_sq > 0 else math.inf
        if noise_trace == 0.0 and gradient_sq <= 0:
            scale = math.nan  # neither signal nor noise: a zero gradient everywhere
        return NoiseScaleEstimate(
            gradient_sq=gradient_sq,
            noise_trace=noise_trace,
            simple_noise_scale=scale,
            batch_size=self._batch,
            noise_to_signal=scale / self._batch,
            measurements=self._count,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "gradient_sq": self._gradient_sq,
            "noise_trace": self._noise_trace,
            "weight": self._weight,
            "count": self._count,
            "batch": self._batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._gradient_sq = float(state["gradient_sq"])
        self._noise_trace = float(state["noise_trace"])
        self._weight = float(state["weight"])
        self._count = int(state["count"])
        self._batch = float(state["batch"])
