"""The documented, configurable thresholds behind every diagnosis rule."""

from __future__ import annotations

from dataclasses import dataclass, fields

from lightning_optdiag._validation import check_float, check_int

__all__ = ["Thresholds"]


@dataclass(frozen=True)
class Thresholds:
    """Every number the diagnosis rules compare against, with its default and source.

    Attributes:
        plateau_alpha: significance level of the trend test: the loss counts as falling only
            if the one-sided p-value of "not falling" is below it (conventional 0.05).
        plateau_min_decrease: ... and only if the fitted decrease over the window is at least
            this fraction of the loss level (1%): on noise-free curves any tiny slope is
            "significant", so an effect size is needed too.
        plateau_max_decrease: a fitted decrease over the window of at least this fraction of the
            loss level (10%) counts as progress even when the trend test cannot confirm it: with
            noisy mini-batch losses a steep but noisy descent can miss significance, and that is
            progress, not a plateau.
        slow_progress: a relative decrease over the window below this (5%) counts as slow
            progress for ``lr_too_small``.
        saddle_tau: a saddle needs ``lambda_min < -saddle_tau * lambda_max``; neural-net
            Hessians keep a bulk of small negative eigenvalues near zero even at minima (Sagun
            et al. 2017, arXiv:1706.04454), so "some eigenvalue < 0" is not enough. The field
            guide gives 0.01-0.05; default 0.02.
        stationary_grad_ratio: the gradient norm counts as vanished (a critical point) when it
            falls to this fraction of its peak (1%).
        large_grad_ratio: the gradient norm counts as large (the "stuck is not a small gradient"
            case, and a strong signal) while it stays above this fraction of its peak (10%).
        noise_dominance: the gradient is noise-dominated when the simple noise scale exceeds
            this multiple of the batch size, i.e. ``B / B_simple < 0.1`` (McCandlish et al.
            2018, arXiv:1812.06162; field guide section 4).
        lr_high_ratio: sharpness / stability threshold at or above which the learning rate is
            too high for the curvature (1: the edge of stability, Cohen et al. 2021,
            arXiv:2103.00065).
        lr_low_ratio: sharpness / threshold below which the learning rate is far too small
            (0.05: a 20x larger step would still be stable).
        high_loss_fraction: a stalled loss above this fraction of the initial loss is "still
            high" (model bias) unless ``target_loss`` is given.
        small_loss_fraction: a training loss below this fraction of the initial loss (or at
            most ``target_loss``) is small: training has done its job, and the stuck-training
            rules (plateau, critical points, learning rate, noise) stand down; the course's
            decision tree then looks at validation (overfitting) instead.
        target_loss: the loss a good model should reach (e.g. the noise floor); ``None`` uses
            ``high_loss_fraction``.
        overfit_patience: validation epochs since the best validation loss before overfitting
            is diagnosed (as in early stopping).
        overfit_min_rise: ... and the validation loss must exceed its best by this fraction.
        warmup_loss_rise: under an adaptive optimizer without warm-up, a loss that rises above
            ``(1 + warmup_loss_rise)`` times its first value (a rolling median of 3 to 5 steps,
            so that one outlier batch does not count) within the warm-up horizon
            ``2 / (1 - beta2)`` steps (Ma & Yarats 2019, arXiv:1910.04209) is early instability.
        noise_min_measurements: noise-scale measurements needed before the noise scale is
            trusted (each is one training batch cut into chunks: a single one is very noisy).
        event_window: steps after which an event-based diagnosis (non-finite values, gradient
            spikes) with no new event clears.

    Raises:
        TypeError: a field has the wrong type.
        ValueError: a field is out of range.
    """

    plateau_alpha: float = 0.05
    plateau_min_decrease: float = 0.01
    plateau_max_decrease: float = 0.1
    slow_progress: float = 0.05
    saddle_tau: float = 0.02
    stationary_grad_ratio: float = 0.01
    large_grad_ratio: float = 0.1
    noise_dominance: float = 10.0
    lr_high_ratio: float = 1.0
    lr_low_ratio: float = 0.05
    high_loss_fraction: float = 0.5
    small_loss_fraction: float = 0.01
    target_loss: float | None = None
    overfit_patience: int = 3
    overfit_min_rise: float = 0.05
    warmup_loss_rise: float = 1.0
    noise_min_measurements: int = 3
    event_window: int = 200

    def __post_init__(self) -> None:
        unit = (
            "plateau_alpha",
            "saddle_tau",
            "stationary_grad_ratio",
            "large_grad_ratio",
            "small_loss_fraction",
        )
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in ("overfit_patience", "event_window", "noise_min_measurements"):
                check_int(item.name, value, minimum=1)
            elif item.name == "target_loss":
                if value is not None:
                    check_float(item.name, value)
            elif item.name in unit:
                check_float(item.name, value, minimum=0.0, maximum=1.0, exclusive_minimum=True)
            else:
                check_float(item.name, value, minimum=0.0, exclusive_minimum=True)
        for low, high in (
            ("plateau_min_decrease", "plateau_max_decrease"),
            ("stationary_grad_ratio", "large_grad_ratio"),
            ("lr_low_ratio", "lr_high_ratio"),
        ):
            if not getattr(self, low) < getattr(self, high):
                raise ValueError(
                    f"Invalid {low}: {getattr(self, low)} (expected less than {high}="
                    f"{getattr(self, high)}: a value cannot be both below and above them)"
                )
