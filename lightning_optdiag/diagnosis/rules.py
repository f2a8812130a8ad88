"""Diagnosis rules: observations of a training run in, findings out. No Lightning here.

The rules follow the course's decision tree (field guide section 1): when the training loss
stops falling, first look at the gradient. A large gradient with the sharpness at or above the
optimizer's stability threshold means the learning rate is too high for the curvature; only a
genuinely vanished (or noise-dominated) gradient means a critical point, which the sign of the
smallest Hessian eigenvalue, relative to the largest, classifies as a saddle or a minimum.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_optdiag.diagnosis.records import Finding
from lightning_optdiag.diagnosis.thresholds import Thresholds
from lightning_optdiag.signals import NoiseScaleEstimate, TrendTest, trend_test

__all__ = ["CurvatureObservation", "Observations", "diagnose"]

MIN_TREND_VALUES = 10
RECENT = 5  # steps whose median stands for "the gradient norm now"


@dataclass(frozen=True)
class CurvatureObservation:
    """The latest curvature measurement, as the rules need it.

    Attributes:
        step: when it was measured.
        lambda_max: largest Hessian eigenvalue.
        lambda_min: smallest Hessian eigenvalue.
        sharpness: the sharpness the optimizer sees (``lambda_max``, or ``lambda_max(P^-1 H)``
            for adaptive optimizers); ``None`` when unknown.
        threshold: the optimizer's stability threshold for it; ``None`` when unknown.
        grad_norm: gradient norm on the probe batch.
    """

    step: int
    lambda_max: float
    lambda_min: float
    sharpness: float | None = None
    threshold: float | None = None
    grad_norm: float | None = None

    @property
    def sharpness_ratio(self) -> float | None:
        if self.sharpness is None or self.threshold is None or not self.threshold > 0:
            return None
        return self.sharpness / self.threshold


@dataclass(frozen=True)
class Observations:
    """Everything the rules look at, collected by the doctor (or built by hand in tests).

    Attributes:
        step: the current optimizer step.
        losses: per-step training losses over the recent window, oldest first.
        initial_loss: mean training loss over the first steps of the run.
        grad_norms: per-step total gradient norms over the same window.
        peak_grad_norm: the largest gradient norm seen so far.
        curvature: the latest curvature measurement, if recent enough to describe now.
        recent_sharpness_ratios: sharpness ratios of the recent curvature checks (the test for
            "sustained" uses their median).
        noise: the gradient noise-scale estimate.
        val_losses: validation loss per validation epoch, oldest first.
        train_epoch_losses: mean training loss of the matching epochs.
        nonfinite_steps: steps with non-finite events within the event window.
        nonfinite_detail: what went non-finite at the latest of them.
        spike_steps: steps with gradient-norm spikes within the event window.
        spike_ratio: largest spike relative to its running median.
        vanishing_layers: layers whose gradients currently vanish.
        optimizer_family: ``"adam"``, ``"sgd"``, ... (see
            :func:`~lightning_optdiag.signals.stability_rule`), or ``None``.
        warmup_horizon: ``2 / (1 - beta2)`` steps for adaptive optimizers.
        has_warmup: the learning rate rose during the first steps (a warm-up is in place).
        early_max_loss: the largest training loss within the warm-up horizon (of a rolling
            median, so that one outlier batch does not count).
        first_loss: the training loss of the very first step, the reference for early
            instability (``initial_loss`` may already include a blow-up).
        active: the kinds diagnosed at the previous evaluation. Some rules use them for
            hysteresis, so that a condition at the edge of its threshold does not flap: an
            active plateau clears only when the loss falls by twice ``plateau_min_decrease``;
            active overfitting only when the validation loss reaches a new best.
    """

    step: int
    losses: Sequence[float] = ()
    initial_loss: float | None = None
    grad_norms: Sequence[float] = ()
    peak_grad_norm: float | None = None
    curvature: CurvatureObservation | None = None
    recent_sharpness_ratios: Sequence[float] = ()
    noise: NoiseScaleEstimate | None = None
    val_losses: Sequence[float] = ()
    train_epoch_losses: Sequence[float] = ()
    nonfinite_steps: Sequence[int] = ()
    nonfinite_detail: str = ""
    spike_steps: Sequence[int] = ()
    spike_ratio: float | None = None
    vanishing_layers: Sequence[str] = ()
    optimizer_family: str | None = None
    warmup_horizon: int | None = None
    has_warmup: bool = False
    early_max_loss: float | None = None
    first_loss: float | None = None
    active: frozenset[str] = frozenset()


def diagnose(observations: Observations, thresholds: Thresholds | None = None) -> list[Finding]:
    """Apply every rule to ``observations``; returns the findings, at most one per kind.

    Args:
        observations: what the run looks like now.
        thresholds: the numbers the rules compare against (defaults: :class:`Thresholds`).
    """
    obs, th = observations, thresholds or Thresholds()
    state = _State.of(obs, th)
    rules = (
        _nonfinite,
        _exploding,
        _vanishing,
        _needs_warmup,
        _plateau,
        _lr_too_high,
        _lr_too_small,
        _critical_point,
        _model_bias,
        _gradient_noise,
        _overfitting,
    )
    findings: list[Finding] = []
    for rule in rules:
        finding = rule(obs, th, state, findings)
        if finding is not None:
            findings.append(finding)
    return findings


@dataclass(frozen=True)
class _State:
    """Quantities several rules share, derived once."""

    trend: TrendTest | None
    plateau: bool
    grad_now: float | None
    grad_fraction: float | None  # grad_now / peak
    ratio: float | None  # sustained sharpness ratio
    noise_to_signal: float | None
    stationary: bool
    loss_now: float | None

    @classmethod
    def of(cls, obs: Observations, th: Thresholds) -> _State:
        finite = [value for value in obs.losses if math.isfinite(value)]
        tail = finite[-max(1, len(finite) // 10) :]
        loss_now = statistics.fmean(tail) if tail else None
        small = loss_now is not None and _loss_is_small(loss_now, obs.initial_loss, th)
        trend = trend_test(finite) if len(finite) >= MIN_TREND_VALUES and not small else None
        needed = th.plateau_min_decrease * (2.0 if "plateau" in obs.active else 1.0)
        plateau = (
            trend is not None
            and not trend.is_improving(th.plateau_alpha, needed)
            # A steep fitted decrease that noise keeps from significance is noisy progress.
            and -trend.relative_change < th.plateau_max_decrease
        )
        grad_now = _recent_gradient(obs)
        peak = obs.peak_grad_norm
        fraction = None
        if grad_now is not None and peak is not None and math.isfinite(peak):
            fraction = grad_now / peak if peak > 0 else (0.0 if grad_now == 0 else math.inf)
        ratios = [r for r in obs.recent_sharpness_ratios if math.isfinite(r)]
        ratio = statistics.median(ratios) if ratios else None
        if ratio is None and obs.curvature is not None:
            ratio = obs.curvature.sharpness_ratio
        if ratio is not None and not math.isfinite(ratio):
            ratio = None
        trusted = obs.noise is not None and obs.noise.measurements >= th.noise_min_measurements
        noise = obs.noise.noise_to_signal if trusted and obs.noise is not None else None
        noise = noise if noise is not None and not math.isnan(noise) else None
        stationary = (fraction is not None and fraction <= th.stationary_grad_ratio) or (
            noise is not None and noise >= th.noise_dominance
        )
        return cls(trend, plateau, grad_now, fraction, ratio, noise, stationary, loss_now)


def _loss_is_small(loss: float, initial: float | None, th: Thresholds) -> bool:
    if th.target_loss is not None:
        return loss <= th.target_loss
    return initial is not None and initial > 0 and loss < th.small_loss_fraction * initial


def _recent_gradient(obs: Observations) -> float | None:
    recent = [g for g in list(obs.grad_norms)[-RECENT:] if math.isfinite(g)]
    if recent:
        return statistics.median(recent)
    if obs.curvature is not None and obs.curvature.grad_norm is not None:
        return obs.curvature.grad_norm
    return None


def _beyond(value: float, threshold: float) -> float:
    """Heuristic confidence for ``value >= threshold > 0``: 0.5 at the threshold, towards 1
    as the margin grows (0.75 at twice the threshold)."""
    if not threshold > 0 or not value >= threshold:
        return 0.5
    return min(0.99, 1.0 - 0.5 * threshold / value)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


# ------------------------------------------------------------------------ event-based rules
def _nonfinite(obs: Observations, th: Thresholds, s: _State, f: list[Finding]) -> Finding | None:
    if not obs.nonfinite_steps:
        return None
    steps = sorted(obs.nonfinite_steps)
    return Finding(
        kind="nonfinite",
        severity="error",
        confidence=0.99,
        evidence={"steps": steps[-20:], "count": len(steps), "detail": obs.nonfinite_detail},
        message=f"Non-finite values at {len(steps)} step(s)"
        + (f", first {steps[0]}, latest {steps[-1]}" if len(steps) > 1 else f", at {steps[0]}")
        + (f": {obs.nonfinite_detail}" if obs.nonfinite_detail else "."),
        recommendation="Lower the learning rate or clip gradients "
        "(Trainer(gradient_clip_val=...)); check the inputs of the offending batches for NaN; "
        "under fp16 prefer bf16. "
        "NonFiniteGuard(action='skip', locate=True) keeps training past such steps and names "
        "the first module whose output overflows.",
    )


def _exploding(obs: Observations, th: Thresholds, s: _State, f: list[Finding]) -> Finding | None:
    if not obs.spike_steps:
        return None
    ratio = obs.spike_ratio
    return Finding(
        kind="exploding_gradients",
        severity="warning",
        confidence=0.9,
        evidence={
            "steps": sorted(obs.spike_steps)[-20:],
            "count": len(obs.spike_steps),
            "max_ratio_to_median": ratio,
        },
        message=f"{len(obs.spike_steps)} gradient-norm spike(s), up to {_fmt(ratio)}x the "
        "running median.",
        recommendation="Clip gradients (Trainer(gradient_clip_val=...) at a few times the median "
        "norm), lower the learning rate or add warm-up; look for outliers in the offending "
        "batches.",
    )


def _vanishing(obs: Observations, th: Thresholds, s: _State, f: list[Finding]) -> Finding | None:
    if not obs.vanishing_layers:
        return None
    layers = sorted(obs.vanishing_layers)
    return Finding(
        kind="vanishing_gradients",
        severity="warning",
        confidence=0.8,
        evidence={"layers": layers},
        message=f"Vanishing gradients in {len(layers)} layer(s): {', '.join(layers[:5])}"
        + (" ..." if len(layers) > 5 else "."),
        recommendation="Use normalization layers or residual connections, ReLU-family "
        "activations instead of saturating ones, and a variance-preserving initialization "
        "(He/Xavier); check that these layers are meant to train.",
    )


def _needs_warmup(obs: Observations, th: Thresholds, s: _State, f: list[Finding]) -> Finding | None:
    adaptive = obs.optimizer_family == "adam"
    if not adaptive or obs.has_warmup or obs.warmup_horizon is None:
        return None
    rise = None
    reference = obs.first_loss if obs.first_loss is not None else obs.initial_loss
    if obs.early_max_loss is not None and reference is not None and reference > 0:
        rise = obs.early_max_loss / reference - 1.0
    early_spikes = [step for step in obs.spike_steps if step <= obs.warmup_horizon]
    early_nonfinite = [step for step in obs.nonfinite_steps if step <= obs.warmup_horizon]
    unstable = (rise is not None and rise > th.warmup_loss_rise) or early_spikes or early_nonfinite
    if not unstable:
        return None
    return Finding(
        kind="needs_warmup",
        severity="warning",
        confidence=_beyond(rise, th.warmup_loss_rise) if rise is not None and rise > 0 else 0.7,
        evidence={
            "early_loss_rise": rise,
            "early_spike_steps": early_spikes[:20],
            "early_nonfinite_steps": early_nonfinite[:20],
            "warmup_horizon": obs.warmup_horizon,
        },
        message="Unstable start under an adaptive optimizer without warm-up"
        + (f": the loss rose {rise:.0%} above its initial value." if rise else "."),
        recommendation=f"Warm the learning rate up linearly over about {obs.warmup_horizon} "
        "steps (2 / (1 - beta2)), e.g. torch.optim.lr_scheduler.LinearLR(optimizer, "
        f"start_factor=0.01, total_iters={obs.warmup_horizon}).",
    )


# --------------------------------------------------------------------- stuck-training rules
def _plateau(obs: Observations, th: Thresholds, s: _State, f: list[Finding]) -> Finding | None:
    if not s.plateau or s.trend is None:
        return None
    t = s.trend
    size = max(0.0, -t.relative_change) / th.plateau_min_decrease
    confidence = min(0.99, t.p_decreasing + (1.0 - t.p_decreasing) * max(0.0, 1.0 - size))
    return Finding(
        kind="plateau",
        severity="info",
        confidence=max(0.5, confidence),
        evidence={
            "window_steps": t.num_values,
            "relative_change": t.relative_change,
            "p_value_not_decreasing": t.p_decreasing,
            "slope_per_step": t.slope,
            "kendall_tau": t.tau,
            "mean_loss": t.mean,
        },
        message=f"The training loss stopped improving over the last {t.num_values} steps "
        + (
            f"(change {t.relative_change:+.2%}: a real decrease, p = {t.p_decreasing:.2g}, but "
            f"below the {th.plateau_min_decrease:.0%} that counts as progress)."
            if t.p_decreasing < th.plateau_alpha
            else f"(change {t.relative_change:+.2%}, p = {t.p_decreasing:.2g} for a decrease)."
        ),
        recommendation="See the accompanying diagnosis for the cause; if none, the run may have "
        "converged: check the validation loss, then decay the learning rate or stop early.",
    )


def _lr_too_high(obs: Observations, th: Thresholds, s: _State, f: list[Finding]) -> Finding | None:
    if not s.plateau or s.ratio is None or s.ratio < th.lr_high_ratio:
        return None
    if s.grad_fraction is None or s.grad_fraction < th.large_grad_ratio:
        return None  # a small gradient: a critical point, not oscillation
    curvature = obs.curvature
    return Finding(
        kind="lr_too_high",
        severity="warning",
        confidence=_beyond(s.ratio, th.lr_high_ratio),
        evidence={
            "sharpness_ratio": s.ratio,
            "sharpness": None if curvature is None else curvature.sharpness,
            "stability_threshold": None if curvature is None else curvature.threshold,
            "grad_norm": s.grad_now,
            "grad_norm_fraction_of_peak": s.grad_fraction,
        },
        message=f"Stuck with a large gradient ({_fmt(s.grad_fraction)} of its peak) and the "
        f"sharpness at {s.ratio:.2f}x the optimizer's stability threshold: the iterates bounce "
        "between the walls of a ravine.",
        recommendation=f"Lower the learning rate by at least {max(2.0, 1.5 * s.ratio):.3g}x (a "
        "decay schedule or ReduceLROnPlateau), or standardize the input features so the "
        "curvature is less elongated.",
    )


def _lr_too_small(obs: Observations, th: Thresholds, s: _State, f: list[Finding]) -> Finding | None:
    t = s.trend
    if t is None or s.ratio is None or s.ratio >= th.lr_low_ratio:
        return None
    if -t.relative_change >= th.slow_progress:
        return None  # progressing well enough
    if t.p_increasing < th.plateau_alpha or obs.spike_steps or obs.nonfinite_steps:
        return None  # a rising or unstable loss is not a timid step
    strong = (s.noise_to_signal is not None and s.noise_to_signal < 1.0) or (
        s.noise_to_signal is None
        and s.grad_fraction is not None
        and s.grad_fraction >= th.large_grad_ratio
    )
    if not strong:
        return None
    headroom = th.lr_high_ratio / s.ratio if s.ratio > 0 else math.inf
    return Finding(
        kind="lr_too_small",
        severity="warning",
        confidence=_beyond(th.lr_low_ratio, s.ratio) if s.ratio > 0 else 0.99,
        evidence={
            "sharpness_ratio": s.ratio,
            "relative_change": t.relative_change,
            "grad_norm_fraction_of_peak": s.grad_fraction,
            "noise_to_signal": s.noise_to_signal,
        },
        message=f"Slow progress ({t.relative_change:+.2%} over {t.num_values} steps) with the "
        f"sharpness at only {s.ratio:.2g}x the stability threshold and a strong gradient.",
        recommendation=f"Raise the learning rate: up to about {headroom:.3g}x stays below the "
        "stability threshold; try 3-10x first, or run the LR range test (Lightning's "
        "learning-rate finder).",
    )


def _gradient_noise(
    obs: Observations, th: Thresholds, s: _State, f: list[Finding]
) -> Finding | None:
    if not s.plateau or s.noise_to_signal is None or s.noise_to_signal < th.noise_dominance:
        return None
    if {finding.kind for finding in f} & {"saddle_point", "model_bias", "lr_too_high"}:
        return None  # the noise is a symptom there, not the cause
    assert obs.noise is not None
    return Finding(
        kind="gradient_noise",
        severity="info",
        confidence=_beyond(s.noise_to_signal, th.noise_dominance),
        evidence={
            "simple_noise_scale": obs.noise.simple_noise_scale,
            "batch_size": obs.noise.batch_size,
            "noise_to_signal": s.noise_to_signal,
        },
        message=(
            f"The gradient noise scale is {s.noise_to_signal:.3g}x the batch size"
            if math.isfinite(s.noise_to_signal)
            else "No mean gradient is measurable above the noise"
        )
        + ": mini-batch gradients are mostly noise and the loss has stalled.",
        recommendation="Decay the learning rate (step or cosine decay), grow the batch size "
        + (
            f"towards the noise scale (about {obs.noise.simple_noise_scale:.3g}), "
            if math.isfinite(obs.noise.simple_noise_scale)
            else ""
        )
        + "or switch from Adam to SGD with momentum for the final phase (SWATS).",
    )


def _critical_point(
    obs: Observations, th: Thresholds, s: _State, f: list[Finding]
) -> Finding | None:
    curvature = obs.curvature
    if not (s.plateau and s.stationary) or curvature is None:
        return None
    if any(finding.kind == "lr_too_high" for finding in f):
        return None  # the gradient is large for the curvature: not a critical point
    top, bottom = curvature.lambda_max, curvature.lambda_min
    evidence = {
        "lambda_max": top,
        "lambda_min": bottom,
        "negative_ratio": bottom / top if top > 0 else None,
        "grad_norm_fraction_of_peak": s.grad_fraction,
        "noise_to_signal": s.noise_to_signal,
        "curvature_step": curvature.step,
    }
    if bottom < -th.saddle_tau * max(top, 0.0) and bottom < 0:
        depth = -bottom / (th.saddle_tau * top) if top > 0 else math.inf
        return Finding(
            kind="saddle_point",
            severity="warning",
            confidence=_beyond(depth, 1.0),
            evidence=evidence,
            message=f"Stationary at a saddle point: lambda_min = {bottom:.3g} against "
            f"lambda_max = {top:.3g} (a direction of clearly negative curvature).",
            recommendation="Escape along the negative-curvature direction: add gradient noise "
            "or use smaller batches, use momentum, raise the learning rate briefly; a symmetric "
            "or zero initialization causes such saddles: use a random one (He/Xavier).",
        )
    high = _loss_is_high(obs, th, s)
    return Finding(
        kind="local_minimum",
        severity="warning" if high else "info",
        confidence=0.8 if bottom >= 0 else 0.7,
        evidence={**evidence, "loss": s.loss_now, "loss_is_high": high},
        message=f"Stationary with no significant negative curvature (lambda_min = {bottom:.3g}, "
        f"lambda_max = {top:.3g}): a local minimum"
        + (" with the loss still high." if high else "."),
        recommendation=(
            "The optimizer has found a minimum the model cannot improve on: see model_bias."
            if high
            else "Training has converged: stop, or decay the learning rate for a final gain."
        ),
    )


def _loss_is_high(obs: Observations, th: Thresholds, s: _State) -> bool:
    if s.loss_now is None:
        return False
    if th.target_loss is not None:
        return s.loss_now > th.target_loss
    # A fraction of the initial loss only means something for losses bounded below by zero.
    initial = obs.initial_loss
    return initial is not None and initial > 0 and s.loss_now > th.high_loss_fraction * initial


def _model_bias(obs: Observations, th: Thresholds, s: _State, f: list[Finding]) -> Finding | None:
    if not s.plateau or not _loss_is_high(obs, th, s):
        return None
    found = {finding.kind for finding in f}
    if found & {"lr_too_high", "lr_too_small", "saddle_point", "nonfinite", "exploding_gradients"}:
        return None  # an optimization issue explains the high loss
    if s.grad_fraction is not None and not s.stationary:
        return None  # still moving: not yet settled at what the model can do
    gap = None
    if obs.val_losses and obs.train_epoch_losses:
        gap = obs.val_losses[-1] - obs.train_epoch_losses[-1]
    evidence = {
        "loss": s.loss_now,
        "initial_loss": obs.initial_loss,
        "target_loss": th.target_loss,
        "validation_gap": gap,
        "local_minimum": "local_minimum" in found,
    }
    reference = (
        f"the target {th.target_loss:.3g}"
        if th.target_loss is not None
        else f"{s.loss_now / obs.initial_loss:.0%} of the initial loss"
        if obs.initial_loss and s.loss_now is not None
        else "high"
    )
    return Finding(
        kind="model_bias",
        severity="warning",
        confidence=0.8 if "local_minimum" in found else 0.6,
        evidence=evidence,
        message=f"The training loss stalled at {_fmt(s.loss_now)} ({reference}) with no "
        "optimization problem in sight: the model may be too simple for the task.",
        recommendation="Make the model more expressive (wider or deeper, better features). To "
        "rule out an optimization issue first, train a smaller model: if it reaches a lower "
        "training loss, the larger one is failing to optimize (He et al. 2015).",
    )


def _overfitting(obs: Observations, th: Thresholds, s: _State, f: list[Finding]) -> Finding | None:
    val, train = list(obs.val_losses), list(obs.train_epoch_losses)
    if len(val) < th.overfit_patience + 1:
        return None
    best_epoch = min(range(len(val)), key=val.__getitem__)
    best, now = val[best_epoch], val[-1]
    since = len(val) - 1 - best_epoch
    rise = 0.0 if "overfitting" in obs.active else th.overfit_min_rise
    if since < th.overfit_patience or not now - best > rise * abs(best):
        return None
    if len(train) == len(val) and not train[-1] <= train[best_epoch]:
        return None  # the training loss rose too: not overfitting
    return Finding(
        kind="overfitting",
        severity="warning",
        confidence=_beyond((now - best) / abs(best), th.overfit_min_rise) if best else 0.5,
        evidence={
            "best_val_loss": best,
            "best_epoch_index": best_epoch,
            "val_loss": now,
            "train_loss": train[-1] if train else None,
            "epochs_since_best": since,
        },
        message=f"The validation loss rose from {best:.3g} to {now:.3g} over {since} validation "
        "epochs while the training loss kept falling.",
        recommendation="Keep the best checkpoint (ModelCheckpoint(monitor='val_loss')) or stop "
        "early (EarlyStopping); add data or augmentation, weight decay or dropout, or use a "
        "smaller model. If more data does not help, check for a train/validation mismatch.",
    )
