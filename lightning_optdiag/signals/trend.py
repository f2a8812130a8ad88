"""Is a noisy loss curve still going down? A Mann-Kendall trend test on block medians."""

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
    """The monotone trend of a series of losses, tested on block medians.

    Attributes:
        tau: Kendall's tau between step and block median (``-1``: every block below the one
            before it; ``0``: no monotone trend; ``nan`` when all blocks are equal).
        p_decreasing: one-sided p-value of "the series is not falling" (Mann-Kendall test);
            small values mean a significant decrease.
        p_increasing: one-sided p-value of "the series is not rising".
        slope: Theil-Sen slope of the block medians per step (negative: falling).
        relative_change: ``slope`` times the window length, divided by the median absolute
            level: ``-0.1`` is a 10% decrease across the window.
        mean: mean of the series.
        num_values: how many values went in.
        num_blocks: how many block medians were tested.
    """

    tau: float
    p_decreasing: float
    p_increasing: float
    slope: float
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
    """Test whether ``values`` trend down (or up), robustly to noise, outliers and curvature.

    Consecutive mini-batch losses are autocorrelated (each step starts where the last one
    ended), which makes any test on the raw series overconfident. The series is first cut into
    ``num_blocks`` contiguous blocks and each is summarised by its median (the batch-means
    idea, with medians so that one outlier batch cannot fake or hide a trend). The block
    medians are then tested with the Mann-Kendall test (Kendall's tau against time, exact
    p-values from :func:`scipy.stats.kendalltau`), which detects any monotone trend, including
    the fast-then-slow decay of a loss curve that a straight-line fit handles badly; the size
    of the trend is the Theil-Sen slope (:func:`scipy.stats.theilslopes`).

    Args:
        values: finite losses in step order (a few per block at least).
        num_blocks: how many blocks to cut the series into (at least 3; capped at the number
            of values). The smallest p-value ``n`` blocks can give is ``1 / n!``: 3 blocks can
            never reach 0.05, 4 barely; the default 10 gives ample resolution.

    Returns:
        A :class:`TrendTest`.

    Raises:
        TypeError: ``num_blocks`` is not an integer.
        ValueError: fewer than three values, non-finite values, or ``num_blocks < 3``.

    References:
        Mann (1945), "Nonparametric tests against trend", Econometrica 13(3).
        Sen (1968), "Estimates of the regression coefficient based on Kendall's tau", JASA 63.
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
    medians = np.array([np.median(series[lo:hi]) for lo, hi in itertools.pairwise(edges)])
    if np.ptp(medians) == 0.0:
        tau, p_decreasing, p_increasing, slope = math.nan, 1.0, 1.0, 0.0
    else:
        tau = float(stats.kendalltau(centres, medians).statistic)
        p_decreasing = float(stats.kendalltau(centres, medians, alternative="less").pvalue)
        p_increasing = float(stats.kendalltau(centres, medians, alternative="greater").pvalue)
        slope = float(stats.theilslopes(medians, centres).slope)
    level = float(np.median(np.abs(series)))
    relative = slope * float(series.size - 1) / level if level > 0 else 0.0
    return TrendTest(
        tau=tau,
        p_decreasing=p_decreasing,
        p_increasing=p_increasing,
        slope=slope,
        relative_change=relative,
        mean=float(series.mean()),
        num_values=int(series.size),
        num_blocks=int(blocks),
    )
