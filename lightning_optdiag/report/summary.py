"""A run read back from its event files, as a rich report: key curves and the diagnoses.

This is what ``optdiag report LOGDIR`` prints. The diagnoses come from the doctor's record when
there is one; from the per-kind scalars ``optdiag/diagnosis/<kind>`` (without the evidence) when
only those were logged; and a run without a doctor still shows its curves and its non-finite
events.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from lightning_optdiag.diagnosis.records import KINDS, SEVERITIES, Diagnosis
from lightning_optdiag.report.console import full_report
from lightning_optdiag.report.logdir import RunLog

__all__ = ["KEY_CURVES", "RunVerdict", "run_report", "run_verdict", "sparkline"]

KEY_CURVES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "training loss",
        ("optdiag/loss/train", "train_loss", "train_loss_step", "train/loss", "loss"),
    ),
    ("validation loss", ("optdiag/loss/val", "val_loss", "val_loss_epoch", "val/loss")),
    ("learning rate", ("optdiag/lr",)),
    ("gradient norm", ("optdiag/grad_norm/total",)),
    ("λ_max", ("optdiag/hessian/lambda_max",)),
    ("λ_min", ("optdiag/hessian/lambda_min",)),
    ("sharpness ratio", ("optdiag/hessian/sharpness_ratio",)),
    ("noise scale", ("optdiag/hessian/noise_scale",)),
    ("Hessian trace", ("optdiag/hessian/trace",)),
)
"""``(label, tags)``: each curve shows the best-resolved of its tags the run has; the loss
curves fall back on the usual names of a module's own logged losses. Without the doctor's
``optdiag/lr``, LearningRateMonitor's ``lr-*`` tags stand in; under manual optimization with
several optimizers, each optimizer's ``optdiag/grad_norm/total_optimizer<i>`` is a curve."""

_LEVELS = "▁▂▃▄▅▆▇█"
_FLAT = 1e-3  # a series whose range is below this fraction of its size is drawn flat
_LOG_SPAN = 100.0  # a positive curve spanning this ratio or more is drawn on a log scale
_NONFINITE_TAG = "optdiag/nonfinite/events"
_SKIPPED_TAG = "optdiag/nonfinite/skipped_steps"
_DIAGNOSIS_PREFIX = "optdiag/diagnosis/"
_PER_OPTIMIZER = "optdiag/grad_norm/total_"  # + "optimizer<i>", GradientMonitor's per-optimizer
# Without the record, a kind's usual severity (the rules': plateau and noise are "info").
_DEFAULT_SEVERITY = {"nonfinite": "error", "plateau": "info", "gradient_noise": "info"}
_WATCHED_CURVES = frozenset({"training loss", "validation loss", "gradient norm"})
_COLUMN_GAP = 3  # " │ " between the columns of the curves table


@dataclass
class RunVerdict:
    """What a run's logs say, in numbers.

    Attributes:
        diagnoses: every diagnosis of the run (``None``: no TrainingDoctor data).
        source: where they came from: ``"record"`` (the doctor's record, with evidence),
            ``"scalars"`` (the per-kind scalars only) or ``"none"``.
        nonfinite_events: NonFiniteGuard's event count (0 when it was not attached).
        skipped_steps: steps NonFiniteGuard skipped.
        actions: optimizer switches and schedules installed, from the doctor's record.
        nonfinite_curves: key curves (losses, gradient norm) with NaN/inf values, so that a run
            without NonFiniteGuard or TrainingDoctor that diverged is not called healthy.
    """

    diagnoses: list[Diagnosis] | None
    source: str
    nonfinite_events: int = 0
    skipped_steps: int = 0
    actions: list[dict[str, Any]] = field(default_factory=list)
    nonfinite_curves: list[str] = field(default_factory=list)

    def problems(self, fail_on: str = "warning") -> bool:
        """Whether a diagnosis of severity ``fail_on`` or worse was made (active or cleared),
        a non-finite event was logged, or a key curve went non-finite.

        Raises:
            ValueError: ``fail_on`` is not a severity.
        """
        if fail_on not in SEVERITIES:
            raise ValueError(
                f"Invalid fail_on: {fail_on!r} (expected one of {', '.join(SEVERITIES)})"
            )
        level = SEVERITIES.index(fail_on)
        diagnosed = any(SEVERITIES.index(d.severity) >= level for d in self.diagnoses or ())
        return diagnosed or self.nonfinite_events > 0 or bool(self.nonfinite_curves)

    @property
    def healthy(self) -> bool:
        """Nothing worse than ``info`` (a converged run's plateau is worth knowing, not a
        problem), no non-finite event, no non-finite key curve."""
        return not self.problems("warning")

    @property
    def exit_code(self) -> int:
        """``optdiag report``'s exit code for this run: 0 healthy, 1 problems diagnosed."""
        return 0 if self.healthy else 1


def run_verdict(run: RunLog) -> RunVerdict:
    """The diagnoses, actions and non-finite counts of ``run``."""
    events = int(_last_value(run, _NONFINITE_TAG) or 0)
    skipped = int(_last_value(run, _SKIPPED_TAG) or 0)
    bad_curves = [
        label
        for label, points in _key_curves(run)
        if label.split(" (")[0] in _WATCHED_CURVES
        and not all(math.isfinite(value) for _, value in points)
    ]
    if run.record is not None:
        diagnoses = list(run.record.diagnoses)
        actions = list(run.record.actions)
        return RunVerdict(diagnoses, "record", events, skipped, actions, bad_curves)
    from_scalars = _diagnoses_from_scalars(run)
    if from_scalars is not None:
        return RunVerdict(from_scalars, "scalars", events, skipped, [], bad_curves)
    return RunVerdict(None, "none", events, skipped, [], bad_curves)


def run_report(run: RunLog, width: int | None = None, max_width: int = 80) -> RenderableType:
    """The report of one run: a heading, warnings, the key curves and the diagnoses.

    ``width`` is the sparklines' width (``None``: as wide as ``max_width``, the console width,
    allows, at most 40)."""
    verdict = run_verdict(run)
    parts: list[RenderableType] = []
    files = len(run.files)
    heading = Text()
    heading.append(str(run.path), style="bold")
    heading.append(f"  ·  up to step {run.last_step}  ·  {files} event file{'s' * (files != 1)}")
    parts.append(heading)
    if run.record is not None and run.record.stopped:
        parts.append(
            Text(
                f"The run stopped at step {run.record.step}: {run.record.stopped}",
                style="bold red",
            )
        )
    elif run.record is not None and not run.record.final:
        parts.append(
            Text(
                f"The run did not reach the end of fit (the doctor's last record is from step "
                f"{run.record.step}): it was killed, or is still training.",
                style="yellow",
            )
        )
    parts.extend(Text(f"warning: {message}", style="yellow") for message in run.warnings)
    curves = curves_table(run, width, max_width)
    if curves is not None:
        parts.append(curves)
    if verdict.nonfinite_curves:
        advice = (
            " (attach NonFiniteGuard to catch it as it happens)"
            if verdict.nonfinite_events == 0
            else ""
        )
        names = ", ".join(verdict.nonfinite_curves)
        parts.append(
            Text(
                f"Non-finite values in the logged {names}: the run diverged{advice}.",
                style="bold red",
            )
        )
    if verdict.nonfinite_events:
        parts.append(
            Text(
                f"NonFiniteGuard: {verdict.nonfinite_events} non-finite event"
                f"{'s' * (verdict.nonfinite_events != 1)}, {verdict.skipped_steps} step"
                f"{'s' * (verdict.skipped_steps != 1)} skipped",
                style="bold red",
            )
        )
    if verdict.diagnoses is None:
        parts.append(
            Text(
                "No TrainingDoctor data in this run: curves only (attach TrainingDoctor for "
                "diagnoses).",
                style="dim",
            )
        )
    else:
        if verdict.source == "scalars":
            parts.append(
                Text(
                    "Diagnoses from the per-kind scalars only (no doctor record, so no evidence "
                    "or recommendations; TrainingDoctor(tensorboard=True) writes them).",
                    style="dim",
                )
            )
        parts.append(full_report(verdict.diagnoses, run.last_step, verdict.actions))
    return Group(*parts)


def curves_table(run: RunLog, width: int | None = None, max_width: int = 80) -> Table | None:
    """One row per key curve the run has: sparkline, first and last value, range, steps.

    The sparklines are ``width`` wide; ``None`` makes them as wide as fits in ``max_width``
    columns next to the other cells (at most 40); when even 8 do not fit, the range column is
    left out to make room."""
    curves = _key_curves(run)
    if not curves:
        return None
    headers = ("curve", "trend", "first → last", "min … max", "steps")
    rows: list[tuple[str, list[float], str, str, str]] = []
    for label, points in curves:
        values = [value for _, value in points]
        finite = [value for value in values if math.isfinite(value)]
        span = f"{_fmt(min(finite))} … {_fmt(max(finite))}" if finite else "no finite value"
        ends = f"{_fmt(values[0])} → {_fmt(values[-1])}"
        rows.append((label, values, ends, span, f"{points[0][0]}–{points[-1][0]}"))
    with_range = True
    if width is None:
        # The log-scale suffix, as the widest sparklines would have it, counts in the label.
        labels = [row[0] + (" (log)" if sparkline(row[1], 40)[1] else "") for row in rows]
        widths = [max(len(text) for text in (headers[0], *labels))]
        widths += [
            max(len(text) for text in (headers[i], *(row[i] for row in rows))) for i in (2, 3, 4)
        ]
        room = max_width - sum(widths) - _COLUMN_GAP * (len(headers) - 1)
        if room < 8:
            with_range = False
            room += widths[2] + _COLUMN_GAP
        width = max(8, min(40, room))
    table = Table(title="key curves", title_justify="left", show_edge=False, pad_edge=False)
    for header in headers:
        if header == "min … max" and not with_range:
            continue
        justify = "left" if header in ("curve", "trend") else "right"
        table.add_column(header, no_wrap=True, justify=justify)  # type: ignore[arg-type]
    for label, values, ends, span, steps in rows:
        line, log_scale = sparkline(values, width)
        label_cell = label + (" (log)" if log_scale else "")
        if with_range:
            table.add_row(label_cell, line, ends, span, steps)
        else:
            table.add_row(label_cell, line, ends, steps)
    return table


def sparkline(values: Sequence[float], width: int = 40) -> tuple[Text, bool]:
    """``values`` as one line of block characters, at most ``width`` wide.

    Consecutive values are averaged into ``width`` columns (one column per value when there are
    fewer); a column with a non-finite value is a red ``x``. A positive series spanning two
    decades or more is drawn on a log scale. Returns the line and whether the scale is log.

    Raises:
        ValueError: ``width`` is smaller than 1.
    """
    if width < 1:
        raise ValueError(f"Invalid width: {width} (expected a number >= 1)")
    columns: list[float] = []
    count = len(values)
    buckets = min(width, count)
    for index in range(buckets):
        chunk = values[index * count // buckets : (index + 1) * count // buckets]
        finite = [value for value in chunk if math.isfinite(value)]
        columns.append(sum(finite) / len(finite) if len(finite) == len(chunk) else math.nan)
    finite = [value for value in columns if math.isfinite(value)]
    log_scale = bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= _LOG_SPAN
    scaled = [math.log(value) if log_scale and math.isfinite(value) else value for value in columns]
    finite_scaled = [value for value in scaled if math.isfinite(value)]
    low, high = (min(finite_scaled), max(finite_scaled)) if finite_scaled else (0.0, 0.0)
    if high - low <= _FLAT * max(abs(low), abs(high)):
        high = low  # equal to the printed precision: draw it flat, not as noise blown up
    line = Text()
    for value in scaled:
        if not math.isfinite(value):
            line.append("x", style="red")
            continue
        fraction = 0.0 if high == low else (value - low) / (high - low)
        line.append(_LEVELS[round(fraction * (len(_LEVELS) - 1))], style="cyan")
    return line, log_scale


def _key_curves(run: RunLog) -> list[tuple[str, list[tuple[int, float]]]]:
    rows: list[tuple[str, list[tuple[int, float]]]] = []
    for label, tags in KEY_CURVES:
        # The best-resolved of the candidates: the doctor logs losses once per check, a module
        # may log its own every few steps.
        present = [tag for tag in tags if run.scalars.get(tag)]
        if present:
            rows.append((label, max((run.scalars[tag] for tag in present), key=len)))
        elif label == "learning rate":
            rows.extend(
                (f"learning rate ({tag[3:]})", points)
                for tag, points in run.scalars.items()
                if tag.startswith("lr-") and points
            )
        elif label == "gradient norm":
            rows.extend(
                (f"gradient norm ({tag[len(_PER_OPTIMIZER) :].replace('_', ' ')})", points)
                for tag, points in run.scalars.items()
                if tag.startswith(_PER_OPTIMIZER) and points
            )
    return rows


def _diagnoses_from_scalars(run: RunLog) -> list[Diagnosis] | None:
    series = {
        tag[len(_DIAGNOSIS_PREFIX) :]: points
        for tag, points in run.scalars.items()
        if tag.startswith(_DIAGNOSIS_PREFIX) and tag[len(_DIAGNOSIS_PREFIX) :] in KINDS
    }
    if not series:
        return None
    diagnoses: list[Diagnosis] = []
    for kind, points in series.items():
        current: Diagnosis | None = None
        for step, value in points:
            if value >= 0.5 and current is None:
                current = Diagnosis(
                    kind=kind,
                    step=step,
                    severity=_DEFAULT_SEVERITY.get(kind, "warning"),
                    confidence=1.0,
                    evidence={},
                    message=KINDS[kind],
                    recommendation="(not recorded in the logs)",
                )
                diagnoses.append(current)
            elif value < 0.5 and current is not None:
                current.cleared_step = step
                current = None
    return sorted(diagnoses, key=lambda diagnosis: diagnosis.step)


def _last_value(run: RunLog, tag: str) -> float | None:
    points = run.scalars.get(tag)
    return points[-1][1] if points else None


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}"
