"""The benchmark scripts keep working (in their quick modes; their figures live in docs/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_curvature_benchmark_quick_mode_runs_every_comparison() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "curvature.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    for method in ("Lanczos", "power iteration", "eigsh"):
        assert method in result.stdout
    assert "one HVP <= 3x one gradient (transformer)" in result.stdout


@pytest.mark.slow
def test_curvature_monitor_benchmark_quick_mode_compares_every_configuration() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "curvature_monitor.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    for table in ("Amortised overhead at the defaults", "Checks every 50 steps", "Warm against"):
        assert table in result.stdout
    assert "with a power-iteration tool costs 50-90% here" in result.stdout
    assert "<= 5% of training time (amortised)" in result.stdout
