"""Is a noisy loss curve still going down? A trend test on block means."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from lightning_optdiag._validation import check_int

__all__ = ["TrendTest", "trend_test"]

DEFAULT_NUM_BLOCKS = 10


@dataclass(frozen=True)
class TrendTest:
    """Ordinary least-squares trend of a series of losses, fitted on block means.

    Attributes:
        slope: change per step of the fitted line (negative: falling).
        standard_error: standard error of ``slope``.
        p_decreasing: one-sided p-value of "the series is not falling" (``slope >= 0``); small
            values mean a significant decrease.
        p_increasing: one-sided p-value of "the series is not rising" (``slope <= 0``).
        relative_change: the fitted change over the whole window divided by the mean absolute
            level: ``-0.1`` is a 10% decrease across the window.
        mean: mean of the series.
        num_values: how many values went in.
        num_blocks: how many block means the line was fitted on.
    """

    slope: float
    standard_error: float
    p_decreasing: float
    p_increasing: float
    relative_change: float
    mean: float
    num_values: int
    num_blocks: int

    def is_improving(self, alpha: float, min_relative_decrease: float) -> bool:
        """Falling both significantly (``p_decreasing < alpha``) and by a meaningful amount
        (``-relative_change >= min_relative_decrease``)."""
        return self.p_decreasing < alpha and -self.relative_change >= min_relative_decrease


def trend_test(
    values: Sequence[float] | np.ndarray, num_blocks: int = DEFAULT_NUM_BLOCKS
) -> TrendTest:
    """Fit a line to the block means of ``values`` and test the sign of its slope.

    Consecutive mini-batch losses are autocorrelated (each step starts where the last one ended),
    which makes an OLS fit on the raw series overconfident. Averaging over ``num_blocks``
    contiguous blocks first, then fitting the block means against their centre steps, keeps
    the test honest for short-range correlation (the batch-means method). The slope's
    t statistic gives one-sided p-values through :func:`scipy.stats.linregress`.

    A perfectly flat series (zero residual variance) has slope 0 and p-values of 1; a perfectly
    straight falling one has ``p_decreasing = 0``.

    Args:
        values: finite losses in step order (at least ``3`` per block are recommended).
        num_blocks: how many block means to fit (at least 3; capped at ``len(values)``).

    Returns:
        A :class:`TrendTest`.

    Raises:
        ValueError: fewer than three values, or non-finite values.

    References:
        Flegal & Jones (2010), "Batch means and spectral variance estimators in Markov chain
        Monte Carlo", Annals of Statistics 38(2).
    """
    series = np.asarray(values, dtype=np.float64).reshape(-1)
    if series.size < 3:
        raise ValueError(f"Invalid values: {series.size} values (expected at least 3)")
    if not np.all(np.isfinite(series)):
        raise ValueError("Invalid values: the series contains NaN or infinite values")
    check_int("num_blocks", num_blocks, minimum=3)
    blocks = min(num_blocks, series.size)
    edges = np.linspace(0, series.size, blocks + 1).round().astype(np.int64)
    centres = np.array([(lo + hi - 1) / 2.0 for lo, hi in itertools.pairwise(edges)])
    means = np.array([series[lo:hi].mean() for lo, hi in itertools.pairwise(edges)])
    level = float(np.mean(np.abs(series)))
    slope, p_decreasing, p_increasing, error = _slope_test(centres, means)
    span = float(series.size - 1)
    relative = slope * span / level if level > 0 else 0.0
    return TrendTest(
        slope=slope,
        standard_error=error,
        p_decreasing=p_decreasing,
        p_increasing=p_increasing,
        relative_change=relative,
        mean=float(series.mean()),
        num_values=int(series.size),
        num_blocks=int(blocks),
    )


def _slope_test(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    if np.ptp(y) == 0.0:
        return 0.0, 1.0, 1.0, 0.0
    fit = stats.linregress(x, y)
    slope, error = float(fit.slope), float(fit.stderr)
    if error == 0.0 or not math.isfinite(error):  # an exact line
        return slope, float(slope >= 0), float(slope <= 0), 0.0
    t = stats.t(df=x.size - 2)
    statistic = slope / error
    # H0 "not falling" is rejected when the statistic is very negative, and vice versa.
    return slope, float(t.cdf(statistic)), float(t.sf(statistic)), error
