"""The report of one run: sparklines, the verdict (diagnoses, non-finite counts, exit code) and
the rendered report. Runs are built directly as :class:`RunLog` objects with known scalars, so
every expectation here is computed by hand."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console, RenderableType

from lightning_optdiag.diagnosis import KINDS, Diagnosis
from lightning_optdiag.report.logdir import RunLog
from lightning_optdiag.report.record import DoctorRecord
from lightning_optdiag.report.summary import (
    KEY_CURVES,
    curves_table,
    run_report,
    run_verdict,
    sparkline,
)

Points = list[tuple[int, float]]


def render(renderable: RenderableType, width: int = 120) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def series(values: Sequence[float], start: int = 0, every: int = 1) -> Points:
    return [(start + index * every, float(value)) for index, value in enumerate(values)]


def make_diagnosis(kind: str, step: int, cleared_step: int | None = None) -> Diagnosis:
    return Diagnosis(
        kind=kind,
        step=step,
        severity="error" if kind == "nonfinite" else "warning",
        confidence=0.75,
        evidence={"x": 1.0},
        message=f"the {kind} message",
        recommendation=f"the {kind} recommendation",
        cleared_step=cleared_step,
    )


def make_run(
    scalars: dict[str, Points] | None = None, record: DoctorRecord | None = None, **kwargs: Any
) -> RunLog:
    return RunLog(Path("logs/version_0"), scalars=scalars or {}, record=record, **kwargs)


# ---------------------------------------------------------------------------------- sparkline
def test_sparkline_one_column_per_value_spans_every_level() -> None:
    line, log_scale = sparkline(list(range(8)), width=8)
    assert line.plain == "▁▂▃▄▅▆▇█"
    assert log_scale is False


def test_sparkline_is_relative_to_the_series_range() -> None:
    assert sparkline([-7.0, -3.5, 0.0], width=10)[0].plain == "▁▅█"  # 3.5/7*7 = 3.5 -> 4
    assert sparkline([100.0, 101.0], width=10)[0].plain == "▁█"
    assert sparkline([5.0, 5.0, 5.0], width=10)[0].plain == "▁▁▁"  # a flat series


def test_sparkline_averages_consecutive_values_into_columns() -> None:
    # Pairs averaged: 0, 1, 2, 3 -> levels 0, 7/3, 14/3, 7 -> 0, 2, 5, 7.
    assert sparkline([0, 0, 1, 1, 2, 2, 3, 3], width=4)[0].plain == "▁▃▆█"
    # Ten values into four columns: [0,1], [2,3,4], [5,6], [7,8,9] -> means 0.5, 3, 5.5, 8.
    assert sparkline(list(range(10)), width=4)[0].plain == "▁▃▆█"
    # Never wider than asked.
    assert len(sparkline([float(v % 5) for v in range(1000)], width=40)[0].plain) == 40


def test_sparkline_marks_non_finite_columns() -> None:
    line, _ = sparkline([0.0, math.nan, 2.0], width=3)
    assert line.plain == "▁x█"
    assert sparkline([0.0, math.inf, -math.inf, 7.0], width=4)[0].plain == "▁xx█"
    # A nan poisons the column it is averaged into; the other column alone is flat.
    assert sparkline([0.0, math.nan, 2.0, 4.0], width=2)[0].plain == "x▁"
    assert sparkline([math.nan, math.nan], width=5)[0].plain == "xx"
    # The x is styled apart from the bars.
    x_spans = [span for span in line.spans if line.plain[span.start : span.end] == "x"]
    assert x_spans
    assert "red" in str(x_spans[0].style)


def test_sparkline_switches_to_a_log_scale_at_a_hundredfold_span() -> None:
    decades = [1.0, 10.0, 100.0, 1000.0]
    line, log_scale = sparkline(decades, width=4)
    assert log_scale is True
    assert line.plain == "▁▃▆█"  # evenly spaced decades: 0, 7/3, 14/3, 7
    # Exactly 100x is enough; 99x is not.
    line, log_scale = sparkline([1.0, 2.0, 100.0], width=3)
    assert log_scale is True
    assert line.plain == "▁▂█"  # log: ln2/ln100*7 = 1.05
    line, log_scale = sparkline([1.0, 2.0, 99.0], width=3)
    assert log_scale is False
    assert line.plain == "▁▁█"  # linear: 1/98*7 = 0.07


@pytest.mark.parametrize(
    "values",
    [[0.0, 10.0, 100.0, 1000.0], [-1.0, 10.0, 100.0, 1000.0], [-1000.0, -10.0, -1.0]],
    ids=["zero", "negative", "all-negative"],
)
def test_sparkline_stays_linear_when_a_value_is_not_positive(values: list[float]) -> None:
    line, log_scale = sparkline(values, width=10)
    assert log_scale is False
    low, high = min(values), max(values)
    expected = "".join("▁▂▃▄▅▆▇█"[round((v - low) / (high - low) * 7)] for v in values)
    assert line.plain == expected


def test_sparkline_log_scale_ignores_non_finite_values() -> None:
    line, log_scale = sparkline([1.0, math.nan, 1000.0], width=3)
    assert log_scale is True
    assert line.plain == "▁x█"


def test_sparkline_of_nothing_is_empty() -> None:
    line, log_scale = sparkline([], width=10)
    assert line.plain == ""
    assert log_scale is False


@pytest.mark.parametrize("width", [0, -3])
def test_sparkline_rejects_a_width_below_one(width: int) -> None:
    with pytest.raises(ValueError, match=f"Invalid width: {width}"):
        sparkline([1.0, 2.0], width=width)


# ------------------------------------------------------------------------------------ verdict
def test_verdict_from_the_record() -> None:
    diagnoses = [make_diagnosis("plateau", 40, cleared_step=80), make_diagnosis("overfitting", 90)]
    actions = [{"kind": "optimizer_switch", "step": 50, "message": "switched", "details": {}}]
    run = make_run(
        # The per-kind scalars disagree on purpose: the record, with evidence, wins.
        {"optdiag/diagnosis/saddle_point": series([1, 1])},
        DoctorRecord(step=100, final=True, diagnoses=diagnoses, actions=actions),
    )

    verdict = run_verdict(run)

    assert verdict.source == "record"
    assert verdict.diagnoses == diagnoses
    assert verdict.actions == actions
    assert verdict.nonfinite_events == 0
    assert verdict.skipped_steps == 0
    assert verdict.healthy is False
    assert verdict.exit_code == 1


def test_a_record_with_only_cleared_diagnoses_is_still_unhealthy() -> None:
    record = DoctorRecord(step=100, final=True, diagnoses=[make_diagnosis("plateau", 10, 20)])
    assert run_verdict(make_run(record=record)).exit_code == 1


def test_an_empty_final_record_is_healthy() -> None:
    verdict = run_verdict(make_run(record=DoctorRecord(step=100, final=True)))
    assert verdict.source == "record"
    assert verdict.diagnoses == []
    assert verdict.healthy is True
    assert verdict.exit_code == 0


def test_verdict_from_per_kind_scalars_intervals() -> None:
    plateau = [(0, 0.0), (20, 1.0), (40, 1.0), (60, 0.0), (80, 0.0), (100, 1.0), (120, 1.0)]
    run = make_run(
        {
            "optdiag/diagnosis/plateau": plateau,
            "optdiag/diagnosis/nonfinite": [(0, 0.0), (30, 1.0), (50, 0.0)],
            "optdiag/diagnosis/overfitting": series([0, 0, 0], every=20),
            "optdiag/diagnosis/not_a_kind": series([1, 1]),  # unknown kinds are ignored
            "optdiag/loss/train": series([1.0, 0.5]),
        }
    )

    verdict = run_verdict(run)

    assert verdict.source == "scalars"
    assert verdict.diagnoses is not None
    assert [(d.kind, d.step, d.cleared_step) for d in verdict.diagnoses] == [
        ("plateau", 20, 60),
        ("nonfinite", 30, 50),
        ("plateau", 100, None),
    ]
    nonfinite = verdict.diagnoses[1]
    assert nonfinite.severity == "error"
    assert verdict.diagnoses[0].severity == "info"  # the rules' severity for a plateau
    assert nonfinite.message == KINDS["nonfinite"]
    assert nonfinite.evidence == {}
    assert verdict.actions == []
    assert verdict.exit_code == 1


def test_all_zero_per_kind_scalars_are_healthy() -> None:
    run = make_run({f"optdiag/diagnosis/{kind}": series([0, 0, 0]) for kind in KINDS})
    verdict = run_verdict(run)
    assert verdict.source == "scalars"
    assert verdict.diagnoses == []
    assert verdict.exit_code == 0


def test_no_doctor_data_is_source_none_and_healthy() -> None:
    run = make_run(
        {"optdiag/grad_norm/total": series([1, 2]), "optdiag/diagnosis/bogus": series([1])}
    )
    verdict = run_verdict(run)
    assert verdict.source == "none"
    assert verdict.diagnoses is None
    assert verdict.healthy is True
    assert verdict.exit_code == 0


def test_non_finite_counts_alone_make_a_run_unhealthy() -> None:
    run = make_run(
        {
            "optdiag/nonfinite/events": [(9, 1.0), (11, 2.0), (13, 3.0)],
            "optdiag/nonfinite/skipped_steps": [(9, 1.0), (11, 2.0), (13, 2.0)],
            "optdiag/nonfinite/scaler_skips": [(9, 0.0)],
        },
        DoctorRecord(step=20, final=True),  # a doctor that saw nothing
    )
    verdict = run_verdict(run)
    assert verdict.diagnoses == []
    assert (verdict.nonfinite_events, verdict.skipped_steps) == (3, 2)  # the last values
    assert verdict.healthy is False
    assert verdict.exit_code == 1
    # Without any doctor data as well.
    no_doctor = make_run({"optdiag/nonfinite/events": [(5, 1.0)]})
    assert run_verdict(no_doctor).exit_code == 1


@pytest.mark.parametrize(
    ("tag", "label"),
    [
        ("optdiag/loss/train", "training loss"),
        ("val_loss", "validation loss"),
        ("optdiag/grad_norm/total", "gradient norm"),
    ],
)
def test_a_non_finite_loss_or_gradient_curve_makes_a_run_unhealthy(tag: str, label: str) -> None:
    run = make_run({tag: series([1.0, 0.5, math.inf, math.nan])})  # no guard, no doctor
    verdict = run_verdict(run)
    assert verdict.nonfinite_curves == [label]
    assert verdict.exit_code == 1
    assert f"Non-finite values in the logged {label}" in render(run_report(run))


def test_a_non_finite_curvature_curve_alone_is_not_a_verdict() -> None:
    # lambda_max is diagnostic data, not the run's health: the doctor judges it.
    run = make_run({"optdiag/hessian/lambda_max": series([1.0, math.nan])})
    assert run_verdict(run).nonfinite_curves == []
    assert run_verdict(run).exit_code == 0


@pytest.mark.parametrize("max_width", [80, 100, 140])
def test_the_curves_table_fits_the_console(max_width: int) -> None:
    run = make_run(
        {
            "optdiag/loss/train": series([3.62e25, 1e28, 6.38e33, math.inf] * 50, start=10),
            "optdiag/hessian/sharpness_ratio": series([0.0123456, 1.5e-7] * 40, start=100),
        }
    )
    table = curves_table(run, max_width=max_width)
    assert table is not None
    text = render(table, width=1000)  # rendered unconstrained: the table's own width
    widest = max(len(line.rstrip()) for line in text.splitlines())
    assert widest <= max_width
    assert "3.62e+25 → inf" in text  # nothing truncated
    full = curves_table(run, width=40)
    assert full is not None
    if max_width == 140:  # room for the widest sparklines (40 characters)
        assert widest == max(len(line.rstrip()) for line in render(full, 1000).splitlines())
    else:  # narrower sparklines, as wide as fits
        assert widest >= max_width - 1


# ------------------------------------------------------------------------------------- report
def test_report_shows_the_curves_and_the_diagnoses() -> None:
    run = make_run(
        {
            "optdiag/loss/train": series([2.0, 1.5, 1.0, 0.75], every=10),
            "optdiag/loss/val": series([2.5, 2.0], every=20),
            "lr-Adam": series([1e-3, 1e-3, 5e-4], every=10),
            "optdiag/grad_norm/total": series([1.0, 3.0], every=10),
            "optdiag/hessian/lambda_max": series([10.0, 12.0], start=50, every=50),
            "optdiag/hessian/lambda_min": series([-1.0, -0.5], start=50, every=50),
            "optdiag/hessian/sharpness_ratio": series([0.2, 0.3], start=50, every=50),
            "optdiag/hessian/noise_scale": series([100.0, 80.0], start=50, every=50),
            "optdiag/hessian/trace": series([40.0, 41.0], start=50, every=50),
        },
        DoctorRecord(
            step=100,
            final=True,
            diagnoses=[make_diagnosis("overfitting", 60), make_diagnosis("plateau", 20, 40)],
            actions=[{"kind": "schedule_installed", "step": 70, "message": "cosine installed"}],
        ),
        files=[Path("logs/version_0/events.out.tfevents.1")],
    )

    text = render(run_report(run, width=20))

    assert "logs/version_0" in text.splitlines()[0]
    assert "up to step 100" in text
    assert "1 event file" in text
    lines = {line.split("│")[0].strip(): line for line in text.splitlines() if "│" in line}
    for label in (
        "training loss",
        "validation loss",
        "learning rate (Adam)",
        "gradient norm",
        "λ_max",
        "λ_min",
        "sharpness ratio",
        "noise scale",
        "Hessian trace",
    ):
        assert label in lines, label
    assert "2 → 0.75" in lines["training loss"]
    assert "0.75 … 2" in lines["training loss"]
    assert "0–30" in lines["training loss"]
    assert "50–100" in lines["λ_max"]
    # The order of KEY_CURVES, with the learning rates after the losses.
    order = [label for label in lines if label in {*dict(KEY_CURVES), "learning rate (Adam)"}]
    assert order[:3] == ["training loss", "validation loss", "learning rate (Adam)"]
    for kind in ("overfitting", "plateau"):
        assert kind in text
        assert f"the {kind} message" in text
        assert f"the {kind} recommendation" in text
    assert "cosine installed" in text
    assert "No problems diagnosed" not in text
    assert "did not reach the end of fit" not in text


def test_report_of_a_healthy_run_says_so() -> None:
    run = make_run({"optdiag/loss/train": series([1.0, 0.5])}, DoctorRecord(step=1, final=True))
    assert "No problems diagnosed" in render(run_report(run))


def test_report_flags_an_unfinished_and_a_stopped_run() -> None:
    unfinished = make_run({"optdiag/loss/train": series([1.0])}, DoctorRecord(step=40))
    assert "did not reach the end of fit" in render(run_report(unfinished))
    assert "step 40" in render(run_report(unfinished))
    stopped = make_run(
        {"optdiag/loss/train": series([1.0])},
        DoctorRecord(step=24, stopped="NonFiniteError: 10 consecutive steps skipped"),
    )
    text = render(run_report(stopped))
    assert "stopped at step 24: NonFiniteError: 10 consecutive steps skipped" in text
    assert "did not reach the end of fit" not in text


def test_report_without_a_doctor_shows_curves_warnings_and_non_finite_counts() -> None:
    run = make_run(
        {
            "optdiag/grad_norm/total": series([1.0, math.inf, 2.0]),
            "optdiag/nonfinite/events": [(1, 1.0)],
            "optdiag/nonfinite/skipped_steps": [(1, 1.0)],
        },
        warnings=["events.out.tfevents.1: the last 12 bytes are an incomplete record"],
    )
    text = render(run_report(run))
    assert "gradient norm" in text
    assert "▁x█" in text
    assert "warning: events.out.tfevents.1: the last 12 bytes" in text
    assert "NonFiniteGuard: 1 non-finite event, 1 step skipped" in text
    assert "No TrainingDoctor data" in text


def test_report_from_per_kind_scalars_says_the_evidence_is_missing() -> None:
    run = make_run({"optdiag/diagnosis/plateau": [(0, 0.0), (20, 1.0)]})
    text = render(run_report(run))
    assert "per-kind scalars only" in text
    assert "plateau" in text
    assert "since step 20" in text


def test_report_marks_log_scale_curves() -> None:
    run = make_run({"optdiag/loss/train": series([1000.0, 100.0, 10.0, 1.0])})
    assert "training loss (log)" in render(run_report(run))


def test_the_loss_curve_picks_the_best_resolved_candidate_tag() -> None:
    run = make_run(
        {
            # The doctor's loss, once per check: first in KEY_CURVES but coarser.
            "optdiag/loss/train": series([9.0, 8.0, 7.0], every=20),
            # The module's own, every 5 steps: more points, so it wins.
            "train_loss": series([4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.25, 0.125], every=5),
            "loss": series([6.0]),
        }
    )
    text = render(curves_table(run, width=20) or "")
    (line,) = [line for line in text.splitlines() if line.startswith("training loss")]
    assert "4 → 0.125" in line
    assert "0–40" in line
    # With only the doctor's own tag, that is used.
    coarse = make_run({"optdiag/loss/train": series([9.0, 8.0, 7.0], every=20)})
    assert "9 → 7" in render(curves_table(coarse) or "")


def test_no_key_curve_no_table() -> None:
    assert curves_table(make_run({"optdiag/param_norm/net.0": series([1.0])})) is None
    assert curves_table(make_run({"optdiag/loss/train": []})) is None


def test_curves_table_sparkline_width_is_respected() -> None:
    run = make_run({"optdiag/loss/train": series([float(v) for v in range(100)])})
    text = render(curves_table(run, width=12) or "")
    (line,) = [line for line in text.splitlines() if line.startswith("training loss")]
    trend = line.split("│")[1].strip()
    assert len(trend) == 12
    assert trend == sparkline([float(v) for v in range(100)], 12)[0].plain


def test_an_info_diagnosis_alone_is_healthy_unless_asked_to_fail_on_info() -> None:
    plateau = Diagnosis(
        kind="plateau",
        step=40,
        severity="info",
        confidence=0.9,
        evidence={},
        message="converged",
        recommendation="stop",
    )
    verdict = run_verdict(make_run(record=DoctorRecord(step=100, final=True, diagnoses=[plateau])))
    assert verdict.healthy is True
    assert verdict.exit_code == 0
    assert verdict.problems("info") is True
    assert verdict.problems("warning") is False
    assert verdict.problems("error") is False
    with pytest.raises(ValueError, match="Invalid fail_on: 'fatal'"):
        verdict.problems("fatal")
    sick = run_verdict(
        make_run(record=DoctorRecord(step=100, diagnoses=[make_diagnosis("saddle_point", 50)]))
    )
    assert (sick.problems("warning"), sick.problems("error")) == (True, False)


def test_a_flat_series_is_drawn_flat() -> None:
    line, _ = sparkline([214.0, 214.05, 213.98, 214.01])  # equal to 0.1%
    assert line.plain == "▁▁▁▁"
    line, _ = sparkline([214.0, 216.0, 212.0])  # 2% apart: real variation
    assert line.plain == "▅█▁"  # 214 is halfway: level 3.5 rounds to 4


def test_learning_rate_and_per_optimizer_gradient_curves() -> None:
    run = make_run(
        {
            "optdiag/lr": series([0.1, 0.05]),
            "lr-Adam": series([0.1, 0.05, 0.02]),  # the doctor's own wins over the monitor's
            "optdiag/grad_norm/total_optimizer0": series([1.0, 2.0]),
            "optdiag/grad_norm/total_optimizer1": series([3.0, 4.0]),
        }
    )
    text = render(run_report(run))
    assert "learning rate " in text
    assert "(Adam)" not in text
    assert "gradient norm (optimizer0)" in text
    assert "gradient norm (optimizer1)" in text
    only_monitor = make_run({"lr-Adam": series([0.1, 0.05])})
    assert "learning rate (Adam)" in render(run_report(only_monitor))


def test_a_narrow_console_drops_the_range_column_before_truncating() -> None:
    run = make_run(
        {
            "optdiag/loss/val": series([3.62e25, 1e28, 6.38e33, 2.0e30] * 5, start=20),
            "optdiag/hessian/sharpness_ratio": series([0.0123456, 1.5e-7] * 10, start=2000),
        }
    )
    wide = render(curves_table(run, max_width=120) or "", width=1000)
    narrow = render(curves_table(run, max_width=66) or "", width=1000)
    assert "min … max" in wide
    assert "min … max" not in narrow
    assert max(len(line.rstrip()) for line in narrow.splitlines()) <= 66
    assert "2000–2019" in narrow  # the steps stay whole
