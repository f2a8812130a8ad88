"""The Mann-Kendall trend test on block medians, against an exact null distribution computed
independently (Mahonian numbers) and a Theil-Sen slope by hand, and calibrated under noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal, stats

from lightning_optdiag.signals import TrendTest, trend_test

ALPHA = 0.05


# --- independent references -------------------------------------------------------------------


def inversion_distribution(n: int) -> np.ndarray:
    """``P(k inversions)`` of a uniformly random permutation of ``n``: the coefficients of
    ``prod_{i=1}^{n} (1 + q + ... + q^{i-1}) / n!`` (Mahonian numbers)."""
    counts = np.array([1.0])
    for i in range(1, n + 1):
        counts = np.convolve(counts, np.ones(i))
    return counts / counts.sum()


def kendall_s(values: np.ndarray) -> int:
    """Mann-Kendall ``S = sum_{i<j} sign(x_j - x_i)``: concordant minus discordant pairs."""
    n = values.size
    return int(sum(np.sign(values[j] - values[i]) for i in range(n) for j in range(i + 1, n)))


def exact_p_values(values: np.ndarray) -> tuple[float, float, float]:
    """``tau``, ``P(S <= s)`` and ``P(S >= s)`` under the null of exchangeable, untied values.
    With ``M = n (n - 1) / 2`` pairs and ``k`` inversions, ``S = M - 2 k``."""
    n = values.size
    pairs = n * (n - 1) // 2
    s = kendall_s(values)
    inversions = (pairs - s) // 2
    distribution = inversion_distribution(n)
    p_less = float(distribution[inversions:].sum())  # S <= s  <=>  k >= inversions
    p_greater = float(distribution[: inversions + 1].sum())
    return s / pairs, p_less, p_greater


def block_medians(values: np.ndarray, num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre steps and medians of equal blocks (the length must be a multiple)."""
    size = values.size // num_blocks
    assert size * num_blocks == values.size
    centres = size * np.arange(num_blocks) + (size - 1) / 2.0
    return centres, np.median(values.reshape(num_blocks, size), axis=1)


def theil_sen(x: np.ndarray, y: np.ndarray) -> float:
    """The median of all pairwise slopes."""
    i, j = np.triu_indices(x.size, k=1)
    return float(np.median((y[j] - y[i]) / (x[j] - x[i])))


def ar1_series(num: int, length: int, phi: float, seed: int) -> np.ndarray:
    """``num`` stationary AR(1) series ``x_t = phi x_{t-1} + e_t`` (unit innovations), as rows."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((num, length))
    noise[:, 0] /= math.sqrt(1.0 - phi**2)  # start from the stationary distribution
    return signal.lfilter([1.0], [1.0, -phi], noise, axis=1)


def test_the_reference_distribution_is_right() -> None:
    # Mahonian numbers for n = 4: 1 3 5 6 5 3 1; the permutation count by brute force.
    np.testing.assert_allclose(inversion_distribution(4) * 24, [1, 3, 5, 6, 5, 3, 1])
    assert inversion_distribution(10).size == 46
    assert inversion_distribution(10)[0] == pytest.approx(1 / math.factorial(10))


# --- agreement with the references ------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "num_blocks", "seed"), [(300, 10, 0), (120, 4, 1), (90, 3, 2), (200, 20, 3)]
)
def test_matches_mann_kendall_and_theil_sen_on_block_medians(
    length: int, num_blocks: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    values = 2.0 - 0.002 * np.arange(length) + 0.5 * rng.standard_normal(length)
    result = trend_test(values, num_blocks=num_blocks)
    centres, medians = block_medians(values, num_blocks)
    tau, p_less, p_greater = exact_p_values(medians)
    assert result.tau == pytest.approx(tau, abs=1e-12)
    assert result.p_decreasing == pytest.approx(p_less, rel=1e-9)
    assert result.p_increasing == pytest.approx(p_greater, rel=1e-9)
    slope = theil_sen(centres, medians)
    assert result.slope == pytest.approx(slope, rel=1e-9)
    level = np.median(np.abs(values))
    assert result.relative_change == pytest.approx(slope * (length - 1) / level, rel=1e-9)
    assert result.mean == pytest.approx(values.mean(), rel=1e-12)
    assert result.num_values == length
    assert result.num_blocks == num_blocks


def test_one_sided_p_values_overlap_by_the_probability_of_the_observed_statistic() -> None:
    rng = np.random.default_rng(8)
    for _ in range(20):
        values = rng.standard_normal(100)
        result = trend_test(values)
        _, medians = block_medians(values, 10)
        pairs = 45
        inversions = (pairs - kendall_s(medians)) // 2
        at_observed = inversion_distribution(10)[inversions]
        assert result.p_decreasing + result.p_increasing == pytest.approx(1 + at_observed)


# --- calibration ------------------------------------------------------------------------------


@pytest.mark.parametrize(("length", "num_blocks"), [(200, 10), (57, 5)])
def test_rejection_rates_under_iid_noise_are_the_exact_test_sizes(
    length: int, num_blocks: int
) -> None:
    num = 300
    rng = np.random.default_rng(1234 + length)
    series = 3.0 + rng.standard_normal((num, length))
    results = [trend_test(row, num_blocks=num_blocks) for row in series]
    p_dec = np.array([r.p_decreasing for r in results])
    p_inc = np.array([r.p_increasing for r in results])
    # The exact test is discrete: its size at level a is the largest attainable p-value <= a.
    attainable = np.cumsum(inversion_distribution(num_blocks)[::-1])
    for level in (0.01, ALPHA, 0.1, 0.25):
        size = float(attainable[attainable <= level + 1e-12].max(initial=0.0))
        assert size <= level
        for p in (p_dec, p_inc):
            rejections = int(np.sum(p <= level + 1e-12))
            assert stats.binomtest(rejections, num, size).pvalue > 1e-3, (level, rejections)


def test_block_medians_tame_autocorrelation_that_fools_a_naive_fit() -> None:
    num, length, phi = 200, 1000, 0.9
    series = 5.0 + ar1_series(num, length, phi, seed=7)
    steps = np.arange(length)
    block = np.mean([trend_test(row).p_decreasing < ALPHA for row in series])
    naive = np.mean(
        [stats.linregress(steps, row, alternative="less").pvalue < ALPHA for row in series]
    )
    # The naive OLS treats 1000 correlated values as independent: far too many "trends".
    assert naive > 0.25
    # Medians of blocks of 100 values are nearly independent: close to the nominal 5%.
    assert block < 0.10
    assert naive > 3 * block


# --- detection --------------------------------------------------------------------------------


def test_detects_a_clear_linear_decrease() -> None:
    rng = np.random.default_rng(3)
    steps = np.arange(500)
    for _ in range(20):
        values = 10.0 - 0.01 * steps + rng.standard_normal(500)
        result = trend_test(values)
        # Ten (nearly always strictly) falling block medians: p near its minimum, 1 / 10!.
        assert result.tau <= -0.8
        assert result.p_decreasing < 1e-4
        assert result.p_increasing > 1 - 1e-4
        assert result.slope == pytest.approx(-0.01, abs=0.002)
        expected = -0.01 * 499 / np.median(np.abs(values))
        assert result.relative_change == pytest.approx(expected, rel=0.25)
        assert result.is_improving(alpha=0.01, min_relative_decrease=0.3)


def test_detects_a_fast_then_slow_decay() -> None:
    # A loss curve that flattens out: any monotone decrease counts, not only a straight one.
    rng = np.random.default_rng(4)
    steps = np.arange(400)
    values = 0.5 + 2.0 * np.exp(-steps / 60.0) + 0.01 * rng.standard_normal(400)
    result = trend_test(values)
    assert result.tau == pytest.approx(-1.0)
    assert result.p_decreasing < 1e-6
    assert result.is_improving(alpha=0.01, min_relative_decrease=0.5)


@pytest.mark.parametrize("seed", range(5))
def test_isolated_loss_spikes_do_not_fake_a_trend(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = 1.0 + 0.1 * rng.standard_normal(200)
    spiked = values.copy()
    spiked[[3, 25]] += 50.0  # one spike in each of the first two blocks
    # A least-squares fit on block means is fooled into a "significant decrease" ...
    centres = 20 * np.arange(10) + 9.5
    means = spiked.reshape(10, 20).mean(axis=1)
    assert stats.linregress(centres, means, alternative="less").pvalue < ALPHA
    # ... block medians are not (one outlier moves a median by one order statistic at most).
    assert trend_test(spiked).p_decreasing > ALPHA
    assert trend_test(spiked).slope == pytest.approx(trend_test(values).slope, abs=0.002)


# --- exact and degenerate series --------------------------------------------------------------


@pytest.mark.parametrize(("length", "num_blocks"), [(103, 7), (31, 10), (10, 4), (5, 10), (3, 3)])
def test_a_straight_line_is_recovered_exactly_whatever_the_blocks(
    length: int, num_blocks: int
) -> None:
    # Block medians of a line lie on the line at the block centres, however the blocks fall.
    values = 7.0 - 0.25 * np.arange(length)
    result = trend_test(values, num_blocks=num_blocks)
    blocks = min(num_blocks, length)
    assert result.num_blocks == blocks
    assert result.slope == pytest.approx(-0.25, rel=1e-9)
    assert result.tau == pytest.approx(-1.0)
    assert result.p_decreasing == pytest.approx(1 / math.factorial(blocks))
    assert result.p_increasing == 1.0
    level = np.median(np.abs(values))
    assert result.relative_change == pytest.approx(-0.25 * (length - 1) / level, rel=1e-9)


def test_a_rising_line_mirrors_a_falling_one() -> None:
    rising = trend_test([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], num_blocks=4)
    assert rising.tau == pytest.approx(1.0)
    assert rising.p_increasing == pytest.approx(1 / 24)
    assert rising.p_decreasing == 1.0
    assert rising.slope == pytest.approx(1.0)
    assert not rising.is_improving(alpha=0.5, min_relative_decrease=0.0)


@pytest.mark.parametrize("level", [3.0, 0.0, -2.0])
def test_a_flat_series_has_no_trend(level: float) -> None:
    result = trend_test(np.full(50, level))
    assert math.isnan(result.tau)
    assert (result.p_decreasing, result.p_increasing) == (1.0, 1.0)
    assert (result.slope, result.relative_change) == (0.0, 0.0)
    assert (result.mean, result.num_values, result.num_blocks) == (level, 50, 10)
    assert not result.is_improving(alpha=0.5, min_relative_decrease=0.0)


def test_equal_block_medians_count_as_flat() -> None:
    # Every block of 4 is (1, 2, 2, 9): the same median 2, whatever the spread inside.
    result = trend_test(np.tile([1.0, 2.0, 2.0, 9.0], 10))
    assert math.isnan(result.tau)
    assert (result.p_decreasing, result.p_increasing, result.slope) == (1.0, 1.0, 0.0)


def test_reversing_the_series_swaps_the_one_sided_p_values() -> None:
    rng = np.random.default_rng(5)
    values = 1.0 + 0.001 * np.arange(200) + 0.3 * rng.standard_normal(200)
    forward, backward = trend_test(values), trend_test(values[::-1])
    assert backward.tau == pytest.approx(-forward.tau)
    assert backward.slope == pytest.approx(-forward.slope, rel=1e-9)
    assert backward.p_decreasing == pytest.approx(forward.p_increasing, rel=1e-9)
    assert backward.p_increasing == pytest.approx(forward.p_decreasing, rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    length=st.integers(3, 300),
    num_blocks=st.integers(3, 20),
    scale=st.floats(0.01, 100.0),
    shift=st.floats(-100.0, 100.0),
)
def test_affine_changes_of_units_leave_the_p_values_alone(
    seed: int, length: int, num_blocks: int, scale: float, shift: float
) -> None:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(length) - 0.01 * np.arange(length)
    base = trend_test(values, num_blocks=num_blocks)
    moved = trend_test(scale * values + shift, num_blocks=num_blocks)
    assert moved.slope == pytest.approx(scale * base.slope, rel=1e-6, abs=1e-12)
    assert moved.tau == pytest.approx(base.tau, abs=1e-12)
    assert moved.p_decreasing == pytest.approx(base.p_decreasing, rel=1e-9)
    assert moved.p_increasing == pytest.approx(base.p_increasing, rel=1e-9)
    assert moved.num_blocks == base.num_blocks == min(num_blocks, length)
    flipped = trend_test(-values, num_blocks=num_blocks)
    assert flipped.p_decreasing == pytest.approx(base.p_increasing, rel=1e-9)


# --- is_improving -----------------------------------------------------------------------------


def make_trend(p_decreasing: float, relative_change: float) -> TrendTest:
    return TrendTest(
        tau=-0.5,
        p_decreasing=p_decreasing,
        p_increasing=1.0 - p_decreasing,
        slope=-1.0,
        relative_change=relative_change,
        mean=1.0,
        num_values=100,
        num_blocks=10,
    )


@pytest.mark.parametrize(
    ("p_decreasing", "relative_change", "expected"),
    [
        (0.001, -0.20, True),  # significant and large
        (0.001, -0.01, False),  # significant but negligible
        (0.30, -0.50, False),  # large but not significant
        (0.30, -0.01, False),  # neither
        (0.001, 0.20, False),  # rising
        (0.05, -0.20, False),  # p equal to alpha is not below it
        (0.001, -0.10, True),  # a decrease exactly at the minimum counts
    ],
)
def test_is_improving_needs_significance_and_size(
    p_decreasing: float, relative_change: float, expected: bool
) -> None:
    trend = make_trend(p_decreasing, relative_change)
    assert trend.is_improving(alpha=0.05, min_relative_decrease=0.10) is expected


def test_is_improving_on_real_series() -> None:
    rng = np.random.default_rng(11)
    steps = np.arange(2000)
    # Significant but tiny: a 0.2% drift under very little noise.
    tiny = trend_test(100.0 - 1e-4 * steps + 0.01 * rng.standard_normal(2000))
    assert tiny.p_decreasing < 1e-6
    assert tiny.relative_change == pytest.approx(-0.002, rel=0.05)
    assert not tiny.is_improving(alpha=0.05, min_relative_decrease=0.01)
    assert tiny.is_improving(alpha=0.05, min_relative_decrease=0.001)
    # Large in relative terms but drowned in noise: 20 values, a drop of 1 under noise of 3.
    noisy = trend_test(5.0 - 0.05 * np.arange(20) + 3.0 * rng.standard_normal(20))
    assert noisy.p_decreasing > 0.05
    assert not noisy.is_improving(alpha=0.05, min_relative_decrease=0.0)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "num_blocks", "error", "name"),
    [
        ([], 10, ValueError, "values"),
        ([1.0, 2.0], 10, ValueError, "values"),
        ([1.0, math.nan, 2.0, 3.0], 10, ValueError, "values"),
        ([1.0, math.inf, 2.0, 3.0], 10, ValueError, "values"),
        ([1.0, 2.0, -math.inf], 10, ValueError, "values"),
        (list(range(20)), 2, ValueError, "num_blocks"),
        (list(range(20)), 0, ValueError, "num_blocks"),
        (list(range(20)), -5, ValueError, "num_blocks"),
        (list(range(20)), 3.0, TypeError, "num_blocks"),
        (list(range(20)), 10.5, TypeError, "num_blocks"),
        (list(range(20)), True, TypeError, "num_blocks"),
        (list(range(20)), "10", TypeError, "num_blocks"),
        (list(range(20)), None, TypeError, "num_blocks"),
    ],
)
def test_invalid_inputs_are_rejected_by_name(
    values: list[float], num_blocks: object, error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=f"Invalid {name}"):
        trend_test(values, num_blocks=num_blocks)  # type: ignore[arg-type]


def test_accepts_numpy_integers_and_any_sequence() -> None:
    values = tuple(float(v) for v in 4.0 - 0.1 * np.arange(30))
    assert trend_test(values, num_blocks=np.int64(5)).num_blocks == 5
    assert trend_test(np.array(values, dtype=np.float32)).slope == pytest.approx(-0.1, rel=1e-5)
