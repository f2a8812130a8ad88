"""Diagnosis records and the fixed vocabulary of what they can say."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["KINDS", "SEVERITIES", "Diagnosis", "Finding"]

KINDS: dict[str, str] = {
    "plateau": "The training loss stopped improving (trend test on batch-mean losses).",
    "saddle_point": "Stationary at a point with clearly negative curvature: a saddle.",
    "local_minimum": "Stationary with no significant negative curvature: a (local) minimum.",
    "lr_too_high": "The loss is stuck while the gradient stays large and the sharpness is at or "
    "above the optimizer's stability threshold: the iterates bounce between ravine walls.",
    "lr_too_small": "Slow progress with the sharpness far below the stability threshold and a "
    "strong gradient signal: a larger learning rate would be stable and faster.",
    "gradient_noise": "Mini-batch gradients are dominated by noise (gradient noise scale far "
    "above the batch size) and the loss has stalled.",
    "nonfinite": "NaN or inf appeared in the loss, gradients, parameters or optimizer state.",
    "exploding_gradients": "Gradient-norm spikes far above the running median.",
    "vanishing_gradients": "Some layers' gradients collapsed relative to the others.",
    "overfitting": "The validation loss rises while the training loss keeps falling.",
    "model_bias": "The training loss stalled at a high value with no optimization problem in "
    "sight: the model may be unable to express the solution.",
    "needs_warmup": "Early instability under an adaptive optimizer without learning-rate warm-up.",
}
"""The diagnosis vocabulary: ``kind -> what it means``. Every record's ``kind`` is one of these."""

SEVERITIES = ("info", "warning", "error")
"""``info``: worth knowing; ``warning``: training is being held back; ``error``: training is
broken (non-finite values)."""


@dataclass(frozen=True)
class Finding:
    """What one rule concludes from one set of observations.

    Attributes:
        kind: one of :data:`KINDS`.
        severity: one of :data:`SEVERITIES`.
        confidence: heuristic confidence in ``[0, 1]``: how clearly the evidence passes its
            thresholds (p-values for statistical tests, margins for the others).
        evidence: the numbers the conclusion rests on.
        message: one sentence stating the finding with its key numbers.
        recommendation: what to do about it.
    """

    kind: str
    severity: str
    confidence: float
    evidence: dict[str, Any]
    message: str
    recommendation: str

    def __post_init__(self) -> None:
        _check_record(self.kind, self.severity, self.confidence)


@dataclass
class Diagnosis:
    """A finding over its lifetime: reported when it appears and again when it clears.

    Attributes:
        kind: one of :data:`KINDS`.
        step: ``trainer.global_step`` when it was reported. ``global_step`` counts completed
            optimizer steps, so an event in step 60 (as the monitors number it) is reported at
            61.
        severity: one of :data:`SEVERITIES`.
        confidence: see :class:`Finding`.
        evidence: the numbers when it appeared (for counted events, non-finite values and
            gradient explosions, kept current while active: how many, the latest step).
        message: one sentence with the key numbers.
        recommendation: what to do.
        epoch: the epoch at which it appeared.
        cleared_step: the step at which the condition was no longer found (``None``: active).
    """

    kind: str
    step: int
    severity: str
    confidence: float
    evidence: dict[str, Any]
    message: str
    recommendation: str
    epoch: int = 0
    cleared_step: int | None = field(default=None)

    def __post_init__(self) -> None:
        _check_record(self.kind, self.severity, self.confidence)

    @property
    def active(self) -> bool:
        """Whether the condition still holds."""
        return self.cleared_step is None

    @property
    def span(self) -> str:
        """The steps it covers, for people: ``"since step 10"`` or ``"steps 10–20"``."""
        if self.cleared_step is None:
            return f"since step {self.step}"
        return f"steps {self.step}–{self.cleared_step}"

    @classmethod
    def from_finding(cls, finding: Finding, step: int, epoch: int = 0) -> Diagnosis:
        return cls(
            kind=finding.kind,
            step=step,
            severity=finding.severity,
            confidence=finding.confidence,
            evidence=dict(finding.evidence),
            message=finding.message,
            recommendation=finding.recommendation,
            epoch=epoch,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite evidence becomes ``None``)."""
        record = asdict(self)
        record["evidence"] = {key: _json_value(value) for key, value in self.evidence.items()}
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Diagnosis:
        return cls(**record)


def _check_record(kind: Any, severity: Any, confidence: Any) -> None:
    if kind not in KINDS:
        raise ValueError(f"Invalid kind: {kind!r} (expected one of {', '.join(KINDS)})")
    if severity not in SEVERITIES:
        raise ValueError(
            f"Invalid severity: {severity!r} (expected one of {', '.join(SEVERITIES)})"
        )
    if isinstance(confidence, bool) or not isinstance(confidence, int | float):
        raise TypeError(
            f"Invalid confidence: {confidence!r} (expected a number in [0, 1], "
            f"got {type(confidence).__name__})"
        )
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"Invalid confidence: {confidence} (expected a number in [0, 1])")


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    return value
