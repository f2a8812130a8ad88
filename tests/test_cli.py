"""The ``optdiag`` command: help, argument errors, and every demo scenario end to end."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_optdiag.cli import DEMO_SCENARIOS, main
from lightning_optdiag.demo import SCENARIOS, run_demo


def optdiag(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lightning_optdiag.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_help_is_fast_and_lists_the_scenarios() -> None:
    started = time.perf_counter()
    result = optdiag("demo", "--help")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0
    for scenario in SCENARIOS:
        assert scenario in result.stdout
    assert elapsed < 5.0  # no torch or Lightning import just to print help


def test_version_is_the_package_version() -> None:
    from lightning_optdiag import __version__

    result = optdiag("--version")
    assert result.returncode == 0
    assert result.stdout.split() == ["optdiag", __version__]


def test_help_does_not_import_torch() -> None:
    probe = "import sys, lightning_optdiag.cli; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--scenario", "bogus"], "invalid choice: 'bogus'"),
        (["demo", "--steps", "0"], "invalid value 0: expected a number >= 1"),
        (["demo", "--steps", "ten"], "invalid value 'ten'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_2_with_a_reason(args: list[str], message: str) -> None:
    result = optdiag(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_healthy_scenario_reports_nothing(tmp_path: Path) -> None:
    result = run_demo("healthy", logdir=tmp_path)
    assert result.steps == 240
    assert result.monitor.events == []
    assert result.guard.events == []
    assert result.stopped is None
    events = EventAccumulator(str(result.logdir))
    events.Reload()
    totals = events.Scalars("optdiag/grad_norm/total")
    assert [point.step for point in totals] == list(range(0, 240, 10))


def test_exploding_scenario_flags_exactly_the_outlier_steps(tmp_path: Path) -> None:
    result = run_demo("exploding", logdir=tmp_path)
    spikes = [event.step for event in result.monitor.events if event.kind == "spike"]
    assert spikes == [60, 120, 180]
    assert result.guard.events == []


def test_nan_scenario_skips_non_finite_steps_and_stops(tmp_path: Path) -> None:
    result = run_demo("nan", logdir=tmp_path)
    assert result.guard.events
    assert all(event.action == "skipped" for event in result.guard.events)
    assert result.guard.skipped_steps == len(result.guard.events)
    assert result.stopped is not None
    assert "10 consecutive steps skipped" in result.stopped
    assert result.steps < 240
    # Skipping kept every weight finite, although the loss overflowed.
    first = result.guard.events[0]
    assert first.kind in ("gradient", "loss")
    assert first.parameters


def test_demo_command_prints_the_findings_and_the_log_directory(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--scenario", "exploding", "--logdir", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "What was found" in output
    assert output.count("spike") >= 3
    assert str(tmp_path) in output.replace("\n", "")


def test_the_command_offers_every_demo_scenario() -> None:
    # The command keeps its own one-line descriptions so that --help needs no torch import.
    assert list(DEMO_SCENARIOS) == list(SCENARIOS)


def test_demo_command_prints_the_doctors_report(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--scenario", "saddle", "--logdir", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "optdiag report" in output
    assert "saddle_point" in output
    assert "lambda_min" in output


def test_healthy_demo_command_reports_no_problem(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--scenario", "healthy", "--steps", "120", "--logdir", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "No problems diagnosed." in output


def test_switch_scenario_switches_once_from_adam_to_sgd(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--scenario", "switch", "--logdir", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert output.count("Adam -> sgdm") == 1
    result = run_demo("switch", logdir=tmp_path / "again")
    switches = [action for action in result.doctor.actions if action["kind"] == "optimizer_switch"]
    assert len(switches) == 1
    assert result.doctor.diagnoses == []
    assert result.final_loss < 0.1  # training stayed stable after the switch
