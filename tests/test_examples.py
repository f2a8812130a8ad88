"""The runnable examples work end to end (in a fast mode)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_optdiag.diagnosis import KINDS
from tests.ddp import _clean_environment

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, ddp: bool = False) -> subprocess.CompletedProcess[str]:
    """Run an example; with ``ddp``, from an environment without Lightning's leftovers of
    earlier tests (tests/ddp.py) and in its own session, so that a hang kills the ranks too."""
    command = [sys.executable, str(ROOT / script), *args]
    if not ddp:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=300, check=False, cwd=ROOT
        )
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=_clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{script} hung")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_curvature_quickstart_tells_a_saddle_from_a_minimum() -> None:
    result = run("examples/curvature_quickstart.py", "--steps", "20", "--every", "10")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("deep linear net" in line and "saddle point" in line for line in lines)
    assert any("linear regression" in line and "minimum" in line for line in lines)
    assert "Spectral density" in result.stdout
    assert result.stderr == ""


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
    assert result.stderr == ""  # no warnings, no Lightning INFO lines


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
    assert result.stderr == ""


# ------------------------------------------------------------------ callbacks in real set-ups
def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of ``log_dir``: tag -> [(step, value)]."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(point.step, point.value) for point in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def logged_dir(stdout: str) -> Path:
    (line,) = [line for line in stdout.splitlines() if line.startswith("TensorBoard logs: ")]
    return Path(line.removeprefix("TensorBoard logs: "))


def assert_diagnoses_file(path: Path) -> list[dict[str, Any]]:
    record = json.loads(path.read_text())
    assert set(record["vocabulary"]) == set(KINDS)
    assert all(d["kind"] in KINDS for d in record["diagnoses"])
    assert set(record["active"]) <= {d["kind"] for d in record["diagnoses"]}
    return record["diagnoses"]


@pytest.mark.slow
def test_attach_all_callbacks_logs_to_tensorboard_and_writes_the_diagnoses(
    tmp_path: Path,
) -> None:
    result = run("examples/attach_all_callbacks.py", "--fast", "--logdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warnings, no Lightning INFO lines
    log_dir = logged_dir(result.stdout)
    assert log_dir.parent == tmp_path / "attach_all"
    names = ("GradientMonitor", "NonFiniteGuard", "CurvatureMonitor", "TrainingDoctor")
    names += ("OptimizerSwitch", "ScheduleAdvisor")
    assert all(any(line.startswith(name) for line in result.stdout.splitlines()) for name in names)
    assert "NonFiniteGuard    0 events, 0 steps skipped" in result.stdout

    diagnoses = assert_diagnoses_file(log_dir / "diagnoses.json")
    # A healthy run (the training loss falls from about 1 to 0.02, the validation loss with it):
    # nothing to report, and no false alarm on the way.
    assert diagnoses == []
    assert "No problems diagnosed." in result.stdout
    record = json.loads((log_dir / "diagnoses.json").read_text())
    recommended = [a for a in record["actions"] if a["kind"] == "schedule_recommended"]
    assert len(recommended) == result.stdout.count("optdiag · schedule · ")  # printed as well

    logged = scalars(log_dir)
    assert [step for step, _ in logged["optdiag/grad_norm/total"]] == list(range(0, 500, 10))
    assert all(math.isfinite(value) and value > 0 for _, value in logged["optdiag/grad_norm/total"])
    for layer in ("net.0", "net.2", "net.4"):
        assert f"optdiag/grad_norm/{layer}" in logged
        assert f"optdiag/update_ratio/{layer}" in logged
    assert [step for step, _ in logged["optdiag/hessian/lambda_max"]][:4] == [100, 200, 300, 400]
    assert {f"optdiag/diagnosis/{kind}" for kind in KINDS} <= set(logged)
    assert all(value == 0.0 for kind in KINDS for _, value in logged[f"optdiag/diagnosis/{kind}"])
    training = [value for _, value in logged["train_loss"]]
    assert max(training[-5:]) < 0.2 * min(training[:5])  # 0.98 -> about 0.05

    # optdiag report reads the same run back: healthy, exit status 0.
    report = subprocess.run(
        [sys.executable, "-m", "lightning_optdiag.cli", "report", str(log_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert report.returncode == 0, report.stderr
    assert "No problems diagnosed." in report.stdout


@pytest.mark.slow
def test_lightning_cli_config_turns_the_callbacks_on(tmp_path: Path) -> None:
    result = run(
        "examples/lightning_cli/train.py",
        "fit",
        "--config",
        "examples/lightning_cli/config.yaml",
        "--trainer.max_steps",
        "100",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    log_dir = tmp_path / "lightning_cli" / "version_0"
    saved = (log_dir / "config.yaml").read_text()  # LightningCLI saves the resolved config
    for name in ("GradientMonitor", "NonFiniteGuard", "CurvatureMonitor", "TrainingDoctor"):
        assert f"class_path: lightning_optdiag.callbacks.{name}" in saved
    assert f"written to {log_dir / 'diagnoses.json'}" in result.stdout

    record = json.loads((log_dir / "diagnoses.json").read_text())
    assert_diagnoses_file(log_dir / "diagnoses.json")
    assert record["thresholds"]["saddle_tau"] == 0.03  # init_args.thresholds from the YAML

    logged = scalars(log_dir)
    assert [step for step, _ in logged["optdiag/grad_norm/total"]] == list(range(0, 100, 10))
    assert [step for step, _ in logged["optdiag/hessian/lambda_max"]] == [100]
    assert "optdiag/hessian/sharpness_ratio" in logged  # Adam's preconditioned sharpness
    assert "val_loss" in logged


@pytest.mark.slow
def test_manual_optimization_records_gradient_norms_for_each_optimizer(tmp_path: Path) -> None:
    result = run("examples/manual_optimization.py", "--fast", "--logdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "non-finite events: 0, skipped steps: 0" in result.stdout

    logged = scalars(logged_dir(result.stdout))
    totals = [logged[f"optdiag/grad_norm/total_optimizer{i}"] for i in (0, 1)]
    # Each optimizer counts its own steps: 200 batches, two optimizer steps each, every 10th
    # step of each optimizer logged; the discriminator steps first in each batch.
    assert [step for step, _ in totals[1]] == list(range(0, 400, 20))
    assert [step for step, _ in totals[0]] == list(range(1, 400, 20))
    assert all(math.isfinite(v) and v > 0 for series in totals for _, v in series)
    assert "optdiag/grad_norm/total" not in logged
    for layer in ("generator.0", "generator.4", "discriminator.0", "discriminator.4"):
        assert f"optdiag/grad_norm/{layer}" in logged
    # The discriminator's Hessian, through loss_fn, every 100 optimizer steps.
    assert [step for step, _ in logged["optdiag/hessian/lambda_max"]] == [100, 200, 300, 400]
    for index, name in ((0, "generator"), (1, "discriminator")):
        assert f"optimizer {index} ({name}): gradient norm" in result.stdout


@pytest.mark.slow
def test_mixed_precision_trains_without_false_nonfinite_alarms() -> None:
    result = run("examples/mixed_precision.py", "--fast")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    runs = re.findall(
        r"^(\S+): (\d+) steps, loss ([\d.]+) -> ([\d.]+) \(all finite: (\w+)\)\n"
        r"  NonFiniteGuard: (\d+) events, (\d+) scaler skips, final loss scale (\S+)$",
        result.stdout,
        flags=re.MULTILINE,
    )
    found = {run[0]: run[1:] for run in runs}
    assert set(found) == {"bf16-mixed", "16-mixed"}
    for precision, (steps, start, end, finite, events, *_) in found.items():
        assert (steps, finite, events) == ("150", "True", "0"), precision
        assert float(end) < 0.5 * float(start), precision  # it trained
    bf16, fp16 = found["bf16-mixed"], found["16-mixed"]
    assert (bf16[5], bf16[6]) == ("0", "-")  # bf16: no scaler
    # fp16: the scaler's burst of overflows at the start is counted, not reported.
    assert int(fp16[5]) > 0
    assert float(fp16[6]) == 2.0**20 / 2 ** int(fp16[5])
    assert "TrainingDoctor: no diagnoses" in result.stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_launch_runs_both_ranks_and_prints_on_rank_zero(tmp_path: Path) -> None:
    result = run("examples/ddp_launch.py", "--fast", "--record", str(tmp_path), ddp=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no per-rank Lightning INFO lines or warnings either
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["global_step"] == 120 for r in ranks)
    assert ranks[0]["pid"] != ranks[1]["pid"]
    # Synchronised gradients, averaged Hessian products and losses: the ranks agree.
    for key in ("grad_norm", "curvature", "diagnoses", "switches", "nonfinite_events"):
        assert ranks[0][key] == ranks[1][key], key
    assert [c["step"] for c in ranks[0]["curvature"]] == [50, 100]
    assert all(d["kind"] in KINDS for d in ranks[0]["diagnoses"])
    # Only rank 0 printed: one summary, one doctor's report.
    assert result.stdout.count("[rank 0 of 2] 120 steps") == 1
    assert "[rank 1" not in result.stdout
    assert result.stdout.count("optdiag report") == 1
