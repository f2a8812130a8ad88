"""The gradient noise scale against simulated per-example gradients with a known mean and
covariance (McCandlish et al. 2018, appendix A.1)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_optdiag.signals import GradientNoiseScale, NoiseScaleEstimate

DIM = 20


class GradientModel:
    """Per-example gradients ``g_i = G + L z_i`` with ``z_i`` standard normal: mean ``G`` and
    covariance ``Sigma = L L^T``."""

    def __init__(self, gradient_sq: float, noise_trace: float, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        direction = rng.standard_normal(DIM)
        self.mean = math.sqrt(gradient_sq) * direction / np.linalg.norm(direction)
        factor = rng.standard_normal((DIM, DIM)) / math.sqrt(DIM)
        factor *= math.sqrt(noise_trace / np.sum(factor**2))  # tr(L L^T) = ||L||_F^2
        self.factor = factor
        self.covariance = factor @ factor.T

    def per_example(self, rng: np.random.Generator, num_batches: int, batch: int) -> np.ndarray:
        """Per-example gradients, shape ``(num_batches, batch, DIM)``."""
        noise = rng.standard_normal((num_batches, batch, DIM)) @ self.factor.T
        return self.mean + noise


def simulate_norms(
    model: GradientModel,
    num: int,
    small: int,
    big: int,
    nested: bool,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Squared norms of ``num`` pairs of mini-batch mean gradients at two batch sizes: from
    independent examples, or with the small batch a subset of the big one."""
    rng = np.random.default_rng(seed)
    big_examples = model.per_example(rng, num, big)
    small_examples = big_examples[:, :small] if nested else model.per_example(rng, num, small)
    small_sq = np.sum(small_examples.mean(axis=1) ** 2, axis=1)
    big_sq = np.sum(big_examples.mean(axis=1) ** 2, axis=1)
    return small_sq, big_sq


def single_pair(
    small_sq: np.ndarray, small: float, big_sq: np.ndarray, big: float
) -> tuple[np.ndarray, np.ndarray]:
    """The unbiased one-pair estimates of ``|G|^2`` and ``tr(Sigma)`` (the paper's A.1)."""
    gradient_sq = (big * big_sq - small * small_sq) / (big - small)
    noise_trace = (small_sq - big_sq) / (1.0 / small - 1.0 / big)
    return gradient_sq, noise_trace


def ema_weights(num: int, decay: float) -> np.ndarray:
    """Normalised weights of a bias-corrected exponential moving average over ``num`` values."""
    weights = (1.0 - decay) * decay ** np.arange(num - 1, -1, -1, dtype=np.float64)
    return weights / weights.sum()


def feed(scale: GradientNoiseScale, small_sq, small, big_sq, big) -> None:
    for s, b in zip(small_sq, big_sq, strict=True):
        scale.update(small_sq_norm=float(s), small_batch=small, big_sq_norm=float(b), big_batch=big)


# --- recovery of the true quantities ----------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize(("small", "big", "decay"), [(8, 64, 0.99), (4, 32, 0.995)])
def test_recovers_gradient_norm_noise_trace_and_noise_scale(
    small: int, big: int, decay: float, nested: bool
) -> None:
    gradient_sq, noise_trace, num = 1.5, 60.0, 3000
    model = GradientModel(gradient_sq, noise_trace, seed=small)
    small_sq, big_sq = simulate_norms(model, num, small, big, nested, seed=big + nested)
    scale = GradientNoiseScale(decay=decay)
    feed(scale, small_sq, small, big_sq, big)
    estimate = scale.estimate
    assert estimate is not None
    assert estimate.measurements == num
    assert estimate.batch_size == big

    # The estimate is exactly the bias-corrected EMA of the one-pair estimates...
    g_pairs, t_pairs = single_pair(small_sq, small, big_sq, big)
    weights = ema_weights(num, decay)
    assert estimate.gradient_sq == pytest.approx(weights @ g_pairs, rel=1e-9)
    assert estimate.noise_trace == pytest.approx(weights @ t_pairs, rel=1e-9)
    # ... and the one-pair estimates are unbiased: their average over 3000 pairs is close.
    n_eff = 1.0 / np.sum(weights**2)
    assert g_pairs.mean() == pytest.approx(gradient_sq, abs=5 * g_pairs.std() / math.sqrt(num))
    assert t_pairs.mean() == pytest.approx(noise_trace, abs=5 * t_pairs.std() / math.sqrt(num))

    # Within five standard errors of a weighted average of n_eff independent pairs.
    g_error = g_pairs.std() / math.sqrt(n_eff)
    t_error = t_pairs.std() / math.sqrt(n_eff)
    assert estimate.gradient_sq == pytest.approx(gradient_sq, abs=5 * g_error)
    assert estimate.noise_trace == pytest.approx(noise_trace, abs=5 * t_error)
    # The ratio's relative error is at most the sum of the two relative errors (first order).
    b_simple = noise_trace / gradient_sq
    ratio_error = b_simple * (g_error / gradient_sq + t_error / noise_trace)
    assert estimate.simple_noise_scale == pytest.approx(b_simple, abs=5 * ratio_error)
    assert 5 * ratio_error < 0.5 * b_simple  # the check above is not vacuous
    assert estimate.simple_noise_scale == estimate.noise_trace / estimate.gradient_sq
    assert estimate.noise_to_signal == pytest.approx(estimate.simple_noise_scale / big)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_exact_expected_norms_give_the_exact_answer(decay: float) -> None:
    # E|g_B|^2 = |G|^2 + tr(Sigma) / B: feeding expectations must return the two terms exactly,
    # whatever the batch sizes of each measurement.
    gradient_sq, noise_trace = 0.75, 12.0
    scale = GradientNoiseScale(decay=decay)
    for small, big in [(2, 8), (16, 64), (3, 5), (32, 512), (1, 2)]:
        scale.update(
            small_sq_norm=gradient_sq + noise_trace / small,
            small_batch=small,
            big_sq_norm=gradient_sq + noise_trace / big,
            big_batch=big,
        )
    estimate = scale.estimate
    assert estimate is not None
    assert estimate.gradient_sq == pytest.approx(gradient_sq, rel=1e-12)
    assert estimate.noise_trace == pytest.approx(noise_trace, rel=1e-12)
    assert estimate.simple_noise_scale == pytest.approx(16.0, rel=1e-12)
    assert estimate.batch_size == 2.0  # the latest big batch
    assert estimate.noise_to_signal == pytest.approx(8.0, rel=1e-12)
    assert estimate.measurements == 5


# --- smoothing --------------------------------------------------------------------------------


def test_decay_zero_keeps_only_the_last_pair() -> None:
    scale = GradientNoiseScale(decay=0.0)
    scale.update(small_sq_norm=9.0, small_batch=2, big_sq_norm=1.0, big_batch=100)
    scale.update(small_sq_norm=4.1, small_batch=16, big_sq_norm=1.3, big_batch=64)
    estimate = scale.estimate
    assert estimate is not None
    # By hand: |G|^2 = (64 * 1.3 - 16 * 4.1) / 48 = 17.6 / 48,
    # tr(Sigma) = (4.1 - 1.3) / (1/16 - 1/64) = 2.8 * 64 / 3.
    assert estimate.gradient_sq == pytest.approx(17.6 / 48)
    assert estimate.noise_trace == pytest.approx(2.8 * 64 / 3)
    assert estimate.simple_noise_scale == pytest.approx((2.8 * 64 / 3) / (17.6 / 48))
    assert estimate.batch_size == 64.0
    assert estimate.noise_to_signal == pytest.approx((2.8 * 64 / 3) / (17.6 / 48) / 64)
    assert estimate.measurements == 2


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
def test_first_estimate_is_the_single_pair_formula(decay: float) -> None:
    # Bias correction: one measurement is not shrunk toward the zero the averages start from.
    scale = GradientNoiseScale(decay=decay)
    assert scale.estimate is None
    scale.update(small_sq_norm=4.1, small_batch=16, big_sq_norm=1.3, big_batch=64)
    estimate = scale.estimate
    assert estimate is not None
    assert estimate.gradient_sq == pytest.approx(17.6 / 48, rel=1e-12)
    assert estimate.noise_trace == pytest.approx(2.8 * 64 / 3, rel=1e-12)
    assert estimate.measurements == 1


@settings(max_examples=30, deadline=None)
@given(
    decay=st.floats(0.0, 0.99),
    pairs=st.lists(
        st.tuples(
            st.floats(0.0, 100.0),
            st.floats(0.0, 100.0),
            st.integers(1, 64),
            st.integers(1, 64),
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_estimate_is_the_bias_corrected_average_of_pair_estimates(
    decay: float, pairs: list[tuple[float, float, int, int]]
) -> None:
    scale = GradientNoiseScale(decay=decay)
    g_pairs, t_pairs = [], []
    for small_sq, big_sq, small, extra in pairs:
        big = small + extra
        scale.update(small_sq_norm=small_sq, small_batch=small, big_sq_norm=big_sq, big_batch=big)
        g, t = single_pair(np.array(small_sq), small, np.array(big_sq), big)
        g_pairs.append(float(g))
        t_pairs.append(float(t))
    weights = ema_weights(len(pairs), decay)
    estimate = scale.estimate
    assert estimate is not None
    size = max(map(abs, g_pairs + t_pairs)) + 1.0
    assert estimate.gradient_sq == pytest.approx(weights @ g_pairs, abs=1e-9 * size)
    # The noise trace is a variance: a negative average is reported as zero.
    expected_trace = max(float(weights @ t_pairs), 0.0)
    assert estimate.noise_trace == pytest.approx(expected_trace, abs=1e-9 * size)
    assert estimate.noise_trace >= 0.0
    assert estimate.measurements == len(pairs)
    assert estimate.batch_size == pairs[-1][2] + pairs[-1][3]


# --- degenerate signals -----------------------------------------------------------------------


def test_zero_gradient_everywhere_has_no_noise_scale() -> None:
    scale = GradientNoiseScale()
    for _ in range(3):
        scale.update(small_sq_norm=0.0, small_batch=8, big_sq_norm=0.0, big_batch=64)
    estimate = scale.estimate
    assert estimate is not None
    assert estimate.gradient_sq == 0.0
    assert estimate.noise_trace == 0.0
    assert math.isnan(estimate.simple_noise_scale)
    assert math.isnan(estimate.noise_to_signal)


def test_pure_noise_has_an_infinite_noise_scale() -> None:
    # G = 0: E|g_B|^2 = tr(Sigma) / B exactly (40/8 and 40/64 are exact in binary).
    scale = GradientNoiseScale()
    scale.update(small_sq_norm=40.0 / 8, small_batch=8, big_sq_norm=40.0 / 64, big_batch=64)
    estimate = scale.estimate
    assert estimate is not None
    assert estimate.gradient_sq == 0.0
    assert estimate.noise_trace == pytest.approx(40.0)
    assert estimate.simple_noise_scale == math.inf
    assert estimate.noise_to_signal == math.inf


def test_simulated_pure_noise_is_infinite_or_huge() -> None:
    # With G = 0 the |G|^2 estimate scatters around 0; when it is negative the scale is inf,
    # otherwise it is far above any batch size.
    model = GradientModel(gradient_sq=0.0, noise_trace=30.0, seed=3)
    small_sq, big_sq = simulate_norms(model, 200, 4, 32, nested=False, seed=4)
    scale = GradientNoiseScale(decay=0.9)
    feed(scale, small_sq, 4, big_sq, 32)
    estimate = scale.estimate
    assert estimate is not None
    g_pairs, _ = single_pair(small_sq, 4, big_sq, 32)
    if estimate.gradient_sq <= 0:
        assert estimate.simple_noise_scale == math.inf
    else:
        assert estimate.noise_to_signal > 1.0
    assert estimate.noise_trace == pytest.approx(30.0, rel=0.5)
    assert abs(estimate.gradient_sq) < 5 * g_pairs.std() / math.sqrt(19)  # n_eff of 0.9 is 19


def test_a_negative_gradient_estimate_means_infinite_scale() -> None:
    scale = GradientNoiseScale(decay=0.0)
    # |G|^2 = (64 * 0.5 - 8 * 5.0) / 56 < 0 (noise beat the signal in this pair).
    scale.update(small_sq_norm=5.0, small_batch=8, big_sq_norm=0.5, big_batch=64)
    estimate = scale.estimate
    assert estimate is not None
    assert estimate.gradient_sq == pytest.approx(-8.0 / 56)
    assert estimate.simple_noise_scale == math.inf


def test_pure_signal_has_zero_noise_scale() -> None:
    scale = GradientNoiseScale()
    scale.update(small_sq_norm=2.0, small_batch=8, big_sq_norm=2.0, big_batch=64)
    estimate = scale.estimate
    assert estimate is not None
    assert estimate.gradient_sq == pytest.approx(2.0)
    assert estimate.noise_trace == 0.0
    assert estimate.simple_noise_scale == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_norms_are_ignored(bad: float) -> None:
    scale = GradientNoiseScale(decay=0.5)
    scale.update(small_sq_norm=bad, small_batch=8, big_sq_norm=1.0, big_batch=64)
    scale.update(small_sq_norm=2.0, small_batch=8, big_sq_norm=bad, big_batch=64)
    assert scale.estimate is None
    scale.update(small_sq_norm=4.1, small_batch=16, big_sq_norm=1.3, big_batch=64)
    before = scale.estimate
    scale.update(small_sq_norm=bad, small_batch=2, big_sq_norm=bad, big_batch=1000)
    assert scale.estimate == before
    assert before is not None
    assert before.measurements == 1
    assert before.batch_size == 64.0


# --- validation and state ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("small", "big"),
    [(0, 64), (-8, 64), (64, 64), (128, 64), (8, 0), (8, -1), (math.nan, 64), (8, math.nan)],
)
def test_invalid_batch_sizes_are_rejected(small: float, big: float) -> None:
    scale = GradientNoiseScale()
    with pytest.raises(ValueError, match="Invalid batch sizes"):
        scale.update(small_sq_norm=1.0, small_batch=small, big_sq_norm=0.5, big_batch=big)
    assert scale.estimate is None


@pytest.mark.parametrize(
    ("decay", "error"),
    [
        (-0.1, ValueError),
        (1.0, ValueError),
        (1.5, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("0.9", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
)
def test_invalid_decay_is_rejected(decay: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="Invalid decay"):
        GradientNoiseScale(decay=decay)  # type: ignore[arg-type]


def test_state_dict_round_trip_gives_the_identical_estimate() -> None:
    model = GradientModel(gradient_sq=1.0, noise_trace=10.0, seed=5)
    small_sq, big_sq = simulate_norms(model, 40, 8, 64, nested=True, seed=6)
    original = GradientNoiseScale(decay=0.8)
    feed(original, small_sq[:30], 8, big_sq[:30], 64)
    state = json.loads(json.dumps(original.state_dict()))  # plain numbers only
    restored = GradientNoiseScale(decay=0.8)
    restored.load_state_dict(state)
    assert restored.estimate == original.estimate
    assert isinstance(restored.estimate, NoiseScaleEstimate)
    # The two continue identically.
    feed(original, small_sq[30:], 8, big_sq[30:], 64)
    feed(restored, small_sq[30:], 8, big_sq[30:], 64)
    assert restored.estimate == original.estimate
    assert restored.state_dict() == original.state_dict()


def test_state_dict_of_a_fresh_estimator_round_trips() -> None:
    restored = GradientNoiseScale()
    restored.load_state_dict(copy.deepcopy(GradientNoiseScale().state_dict()))
    assert restored.estimate is None
    restored.update(small_sq_norm=4.1, small_batch=16, big_sq_norm=1.3, big_batch=64)
    assert restored.estimate is not None
    assert restored.estimate.gradient_sq == pytest.approx(17.6 / 48)
