"""The runnable examples work end to end (in a fast mode)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_curvature_quickstart_tells_a_saddle_from_a_minimum() -> None:
    result = run("examples/curvature_quickstart.py", "--steps", "20", "--every", "10")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("deep linear net" in line and "saddle point" in line for line in lines)
    assert any("linear regression" in line and "minimum" in line for line in lines)
    assert "Spectral density" in result.stdout
    assert "Warning" not in result.stderr


def test_curvature_quickstart_rejects_bad_arguments() -> None:
    result = run("examples/curvature_quickstart.py", "--every", "0")
    assert result.returncode == 2
    assert "--every >= 1" in result.stderr


def test_diagnose_training_finds_the_saddle_of_a_zero_initialisation(tmp_path: Path) -> None:
    report = tmp_path / "diagnoses.json"
    result = run("examples/diagnose_training.py", "--init", "zeros", "--json", str(report))
    assert result.returncode == 0, result.stderr
    assert "saddle_point" in result.stdout
    diagnoses = json.loads(report.read_text())["diagnoses"]
    assert {d["kind"] for d in diagnoses} == {"plateau", "saddle_point"}
    saddle = next(d for d in diagnoses if d["kind"] == "saddle_point")
    assert saddle["evidence"]["lambda_min"] < -0.5 * saddle["evidence"]["lambda_max"]


def test_diagnose_training_reports_nothing_for_a_healthy_initialisation(tmp_path: Path) -> None:
    report = tmp_path / "diagnoses.json"
    result = run("examples/diagnose_training.py", "--init", "default", "--json", str(report))
    assert result.returncode == 0, result.stderr
    assert "No problems diagnosed." in result.stdout
    assert json.loads(report.read_text())["diagnoses"] == []


def test_swats_switch_example_switches_and_compares(tmp_path: Path) -> None:
    result = run("examples/swats_switch.py", "--steps", "200")
    assert result.returncode == 0, result.stderr
    rows = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    assert set(rows) >= {"Adam throughout", "SWATS", "SWATS gated on a stall"}
    assert "step " in rows["SWATS"]  # the ungated test fires within 200 steps
    assert rows["Adam throughout"].split()[2] == "-"
    assert "Warning" not in result.stderr
