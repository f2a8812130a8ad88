"""``optdiag report`` end to end: exit codes, output, ``--json``, ``--latest`` and bad input on
event files written here with ``SummaryWriter``; then on the logs of real demo runs (healthy, and
one that blows up), cross-checked against what the demo's own callbacks recorded."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_optdiag.cli import main
from lightning_optdiag.demo import DemoResult, run_demo
from lightning_optdiag.diagnosis import KINDS, Diagnosis
from lightning_optdiag.report.logdir import read_logdir
from lightning_optdiag.report.record import RECORD_TAG, encode_record
from lightning_optdiag.report.summary import run_verdict
from tests.report.test_logdir import event_file as event_file_at

ERROR_PREFIX = "optdiag report: error: "


@pytest.fixture(autouse=True)
def plain_wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich output without escape codes, wide enough that nothing is cut."""
    monkeypatch.setenv("COLUMNS", "160")
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


def event_file(
    run_dir: Path, name: str = "events.out.tfevents.1"
) -> AbstractContextManager[SummaryWriter]:
    return event_file_at(run_dir / name)


def diagnosis(kind: str, step: int, cleared_step: int | None = None) -> Diagnosis:
    return Diagnosis(
        kind=kind,
        step=step,
        severity="error" if kind == "nonfinite" else "warning",
        confidence=0.8,
        evidence={"p_value": 0.01, "ratio": math.nan},
        message=f"{kind} message",
        recommendation=f"{kind} recommendation",
        cleared_step=cleared_step,
    )


def write_run(
    run_dir: Path,
    diagnoses: Sequence[Diagnosis] | None = (),
    nonfinite: int = 0,
    steps: int = 100,
    final: bool = True,
) -> Path:
    """A run as the callbacks write it: losses, per-kind scalars, the record (``None``: no
    doctor) and NonFiniteGuard's counts."""
    with event_file(run_dir) as writer:
        for step in range(0, steps + 1, 10):
            writer.add_scalar("optdiag/loss/train", 1.0 / (1 + step), step)
            writer.add_scalar("optdiag/grad_norm/total", 0.5 + step % 3, step)
            if diagnoses is not None:
                for kind in KINDS:
                    active = any(
                        d.kind == kind
                        and d.step <= step
                        and (d.cleared_step is None or step < d.cleared_step)
                        for d in diagnoses
                    )
                    writer.add_scalar(f"optdiag/diagnosis/{kind}", float(active), step)
        for count in range(1, nonfinite + 1):
            writer.add_scalar("optdiag/nonfinite/events", float(count), 10 + count)
            writer.add_scalar("optdiag/nonfinite/skipped_steps", float(count), 10 + count)
        if diagnoses is not None:
            writer.add_text(RECORD_TAG, encode_record(diagnoses, [], steps, final=final), steps)
    return run_dir


def report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["report", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def report_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[Any]]:
    code, out, err = report(capsys, *args, "--json")
    assert err == ""
    return code, json.loads(out)


# ----------------------------------------------------------------------- synthetic event files
def test_a_healthy_run_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "run")
    code, out, err = report(capsys, str(run))
    assert code == 0
    assert err == ""
    assert "No problems diagnosed" in out
    assert str(run) in out
    assert "training loss" in out
    assert "gradient norm" in out


def test_a_run_with_a_diagnosis_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "run", [diagnosis("plateau", 40), diagnosis("overfitting", 20, 60)])
    code, out, err = report(capsys, str(run))
    assert code == 1
    assert err == ""
    for text in ("plateau", "plateau message", "plateau recommendation", "overfitting"):
        assert text in out
    assert "2 diagnoses, 1 active" in out


def test_non_finite_events_alone_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "run", nonfinite=3)
    code, out, _ = report(capsys, str(run))
    assert code == 1
    assert "NonFiniteGuard: 3 non-finite events, 3 steps skipped" in out
    assert "No problems diagnosed" in out  # the doctor saw nothing; the guard did


def test_per_kind_scalars_without_a_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    with event_file(run) as writer:
        for step, value in [(0, 0.0), (20, 1.0), (40, 0.0)]:
            writer.add_scalar("optdiag/diagnosis/saddle_point", value, step)
    code, payload = report_json(capsys, str(run))
    assert code == 1
    (entry,) = payload
    assert entry["source"] == "scalars"
    assert [(d["kind"], d["step"], d["cleared_step"]) for d in entry["diagnoses"]] == [
        ("saddle_point", 20, 40)
    ]


def test_several_runs_exit_with_the_worst_and_list_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    healthy = write_run(tmp_path / "logs" / "version_0")
    sick = write_run(tmp_path / "logs" / "version_1", [diagnosis("saddle_point", 30)])
    code, out, err = report(capsys, str(tmp_path / "logs"))
    assert code == 1
    assert err == ""
    assert out.index(str(healthy)) < out.index(str(sick))
    assert "2 runs: 1 healthy, 1 with problems" in out
    # All healthy: 0.
    write_run(tmp_path / "ok" / "version_0")
    write_run(tmp_path / "ok" / "version_1")
    code, out, _ = report(capsys, str(tmp_path / "ok"))
    assert code == 0
    assert "2 runs: 2 healthy, 0 with problems" in out


def test_json_matches_the_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    found = [diagnosis("plateau", 40, cleared_step=70), diagnosis("nonfinite", 50)]
    sick = write_run(tmp_path / "a", found, nonfinite=2, steps=90, final=False)
    healthy = write_run(tmp_path / "b")
    no_doctor = write_run(tmp_path / "c", diagnoses=None)

    code, payload = report_json(capsys, str(tmp_path))

    assert code == 1
    assert [entry["run"] for entry in payload] == [str(sick), str(healthy), str(no_doctor)]
    first = payload[0]
    assert first == {
        "run": str(sick),
        "last_step": 90,
        "healthy": False,
        "source": "record",
        "diagnoses": [d.to_dict() for d in found],
        "actions": [],
        "nonfinite_events": 2,
        "skipped_steps": 2,
        "warnings": [],
        "final": False,
        "stopped": None,
        "nonfinite_curves": [],
    }
    assert first["diagnoses"][0]["evidence"] == {"p_value": 0.01, "ratio": None}
    assert payload[1]["healthy"] is True
    assert payload[1]["diagnoses"] == []
    assert payload[2]["source"] == "none"
    assert payload[2]["diagnoses"] is None
    assert payload[2]["healthy"] is True
    # The same exit status as without --json.
    assert report(capsys, str(tmp_path))[0] == code


@pytest.mark.parametrize("newest", ["version_0", "version_1"])
def test_latest_picks_the_most_recently_modified_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], newest: str
) -> None:
    runs = {
        "version_0": write_run(tmp_path / "version_0", [diagnosis("plateau", 10)]),
        "version_1": write_run(tmp_path / "version_1"),
    }
    for name, run in runs.items():
        stamp = 2_000_000_000 if name == newest else 1_000_000_000
        for path in run.iterdir():
            os.utime(path, (stamp, stamp))
        os.utime(run, (3_000_000_000 - stamp, 3_000_000_000 - stamp))  # directories don't count

    code, payload = report_json(capsys, str(tmp_path), "--latest")
    assert [entry["run"] for entry in payload] == [str(runs[newest])]
    assert code == (1 if newest == "version_0" else 0)
    code, out, _ = report(capsys, str(tmp_path), "--latest")
    assert str(runs[newest]) in out
    assert str(next(r for n, r in runs.items() if n != newest)) not in out
    assert "2 runs" not in out


def test_width_sets_the_sparkline_width(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    with event_file(run) as writer:
        for step in range(100):
            writer.add_scalar("optdiag/loss/train", float(step), step)
    for width in (1, 10, 33):
        code, out, _ = report(capsys, str(run), "--width", str(width))
        assert code == 0
        (line,) = [line for line in out.splitlines() if line.startswith("training loss")]
        assert len(line.split("│")[1].strip()) == width


def test_a_truncated_file_is_reported_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "run")
    path = run / "events.out.tfevents.1"
    path.write_bytes(path.read_bytes()[:-5])
    code, out, err = report(capsys, str(run))
    assert code == 0
    assert err == ""
    assert "warning: events.out.tfevents.1: the last" in out
    code, payload = report_json(capsys, str(run))
    assert len(payload[0]["warnings"]) == 1


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "events.out.tfevents.1"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x07garbage\x00" * 20)
    return path


def _flipped(tmp_path: Path) -> Path:
    run = write_run(tmp_path / "run")
    path = run / "events.out.tfevents.1"
    data = bytearray(path.read_bytes())
    frames = []  # (offset, data length) of each TFRecord
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        frames.append((offset, length))
        offset += 8 + 4 + length + 4
    offset, length = frames[len(frames) // 2]
    data[offset + 12 + length // 2] ^= 0xFF  # inside a middle record's data
    path.write_bytes(bytes(data))
    return path


def _non_optdiag(tmp_path: Path) -> Path:
    with event_file(tmp_path / "run") as writer:
        writer.add_scalar("train_loss", 1.0, 0)
    return tmp_path


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _not_event_file(tmp_path: Path) -> Path:
    path = tmp_path / "losses.csv"
    path.write_text("0,1.0\n")
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp_path: tmp_path / "missing", "no such file or directory"),
        (_empty, "no TensorBoard event files found"),
        (_non_optdiag, "no optdiag data in 1 event file"),
        (_not_event_file, "not a TensorBoard event file"),
        (_garbage, "corrupt event file"),
        (_flipped, "corrupt event file"),
    ],
    ids=["missing", "empty", "no-optdiag-data", "not-an-event-file", "garbage", "checksum"],
)
def test_bad_input_exits_2_with_one_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, message: str
) -> None:
    path = make(tmp_path)
    for extra in ([], ["--json"], ["--latest"]):
        code, out, err = report(capsys, str(path), *extra)
        assert code == 2
        assert out == ""
        assert err.endswith("\n")
        assert err.count("\n") == 1, err
        assert err.startswith(ERROR_PREFIX + str(path))
        assert message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "0"], "invalid value 0: expected a number >= 1"),
        (["--width", "wide"], "invalid value 'wide'"),
        ([], "the following arguments are required: LOGDIR"),
    ],
)
def test_argument_errors_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["report", *args] + (["somewhere"] if args else []))
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_an_80_column_terminal_shows_every_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    run = tmp_path / "run"
    with event_file(run) as writer:  # what a diverging run logs
        losses = [3.62e25, 1e28, 6.38e33, 5e33] + [math.inf] * 9
        for step, loss in enumerate(losses, start=10):
            writer.add_scalar("optdiag/loss/train", loss, step)
    code, out, _ = report(capsys, str(run))
    assert code == 1  # no guard, no doctor, but the logged loss itself is not finite
    assert "Non-finite values in the logged training loss" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    (line,) = [line for line in out.splitlines() if line.startswith("training loss")]
    assert "3.62e+25 → inf" in line
    assert "10–22" in line


# ------------------------------------------------------------------------- real demo training
@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoResult]:
    """The healthy and the nan scenario, 120 steps each, into one parent directory."""
    logdir = tmp_path_factory.mktemp("demos")
    return {name: run_demo(name, steps=120, logdir=logdir) for name in ("healthy", "nan")}


def test_demo_logs_land_where_documented(demos: dict[str, DemoResult]) -> None:
    for name, result in demos.items():
        assert result.logdir.parent.name == name
        assert result.logdir.name == "version_0"
        assert result.logdir.parent.parent == demos["healthy"].logdir.parent.parent


def test_report_on_the_healthy_demo(
    demos: dict[str, DemoResult], capsys: pytest.CaptureFixture[str]
) -> None:
    healthy = demos["healthy"]
    assert healthy.doctor.diagnoses == []  # the premise
    code, out, err = report(capsys, str(healthy.logdir))
    assert code == 0
    assert err == ""
    assert "No problems diagnosed" in out
    assert f"up to step {healthy.steps}" in out
    for label in ("training loss", "gradient norm", "λ_max", "sharpness ratio"):
        assert label in out
    assert "did not reach the end of fit" not in out


def test_report_on_the_nan_demo(
    demos: dict[str, DemoResult], capsys: pytest.CaptureFixture[str]
) -> None:
    nan = demos["nan"]
    assert nan.stopped  # the premise: NonFiniteGuard stopped it
    code, out, err = report(capsys, str(nan.logdir))
    assert code == 1
    assert err == ""
    assert "nonfinite" in out
    assert f"The run stopped at step {nan.steps}" in out
    assert f"NonFiniteGuard: {len(nan.guard.events)} non-finite events" in out


def test_report_on_both_demos(
    demos: dict[str, DemoResult], capsys: pytest.CaptureFixture[str]
) -> None:
    parent = demos["healthy"].logdir.parent.parent
    code, out, err = report(capsys, str(parent))
    assert code == 1
    assert err == ""
    assert out.index(str(demos["healthy"].logdir)) < out.index(str(demos["nan"].logdir))
    assert "2 runs: 1 healthy, 1 with problems" in out


def test_the_logs_tell_what_the_demo_callbacks_recorded(demos: dict[str, DemoResult]) -> None:
    runs = {run.path: run for run in read_logdir(demos["healthy"].logdir.parent.parent)}
    assert set(runs) == {result.logdir for result in demos.values()}
    for name, result in demos.items():
        run = runs[result.logdir]
        verdict = run_verdict(run)
        assert verdict.source == "record", name
        assert run.record is not None
        assert run.warnings == []
        doctor = result.doctor
        assert [(d.kind, d.step, d.cleared_step) for d in verdict.diagnoses or []] == [
            (d.kind, d.step, d.cleared_step) for d in doctor.diagnoses
        ], name
        # Everything else too, as JSON sees it (non-finite evidence is null in both).
        assert [d.to_dict() for d in verdict.diagnoses or []] == [
            d.to_dict() for d in doctor.diagnoses
        ]
        assert verdict.actions == doctor.actions
        assert verdict.nonfinite_events == len(result.guard.events)
        assert verdict.skipped_steps == result.guard.skipped_steps
        assert run.record.step == result.steps
        assert run.last_step == result.steps
        if result.stopped:
            assert run.record.final is False
            assert run.record.stopped is not None
            assert result.stopped in run.record.stopped
        else:
            assert run.record.final is True
            assert run.record.stopped is None
    assert {d.kind for d in demos["nan"].doctor.diagnoses} >= {"nonfinite"}


def test_per_kind_scalars_agree_with_the_record(demos: dict[str, DemoResult]) -> None:
    (run,) = read_logdir(demos["nan"].logdir)
    record_view = [(d.kind, d.step, d.cleared_step) for d in run_verdict(run).diagnoses or []]
    run.record = None
    scalar_verdict = run_verdict(run)
    assert scalar_verdict.source == "scalars"
    scalar_view = [(d.kind, d.step, d.cleared_step) for d in scalar_verdict.diagnoses or []]
    assert scalar_view == record_view


def test_the_demo_command_then_the_report_command(
    demos: dict[str, DemoResult], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``optdiag demo`` as a user runs it (the nan scenario, which stops within 30 steps), then
    ``optdiag report --json`` on its logs: the same diagnoses as the seeded run above."""
    code = main(["demo", "--scenario", "nan", "--steps", "120", "--logdir", str(tmp_path)])
    demo_out = capsys.readouterr().out
    assert code == 0
    assert f"optdiag report {tmp_path / 'nan' / 'version_0'}" in demo_out

    code, payload = report_json(capsys, str(tmp_path))
    assert code == 1
    (entry,) = payload
    assert entry["run"] == str(tmp_path / "nan" / "version_0")
    expected = demos["nan"]
    assert [(d["kind"], d["step"]) for d in entry["diagnoses"]] == [
        (d.kind, d.step) for d in expected.doctor.diagnoses
    ]
    assert entry["nonfinite_events"] == len(expected.guard.events)


def test_reporting_does_not_import_torch(demos: dict[str, DemoResult]) -> None:
    parent = str(demos["healthy"].logdir.parent.parent)
    probe = (
        "import sys, lightning_optdiag.cli as cli\n"
        "code = cli.main(['report', sys.argv[1]])\n"
        "print(code, 'torch' in sys.modules, 'lightning' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, parent],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.stderr == ""
    assert result.stdout.splitlines()[-1] == "1 False False"


def test_python_dash_m_exit_status(demos: dict[str, DemoResult]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_optdiag.cli", "report", str(demos["healthy"].logdir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0
    assert "No problems diagnosed" in result.stdout
    assert result.stderr == ""


# ---------------------------------------------------------------------------- rough edges
def test_runs_without_optdiag_data_are_named_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path / "version_0")
    with event_file(tmp_path / "version_1") as writer:  # a run logged without optdiag
        writer.add_scalar("train_loss", 1.0, 0)
    code, out, err = report(capsys, str(tmp_path))
    assert code == 0
    assert err.strip() == (
        f"optdiag report: skipped 1 run without optdiag data: {tmp_path / 'version_1'}"
    )
    assert str(tmp_path / "version_0") in out
    code, runs = report_json(capsys, str(tmp_path))  # --json keeps stderr clean
    assert [run["run"] for run in runs] == [str(tmp_path / "version_0")]


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    # Far more JSON than a pipe buffers (64 KiB), so the writer really meets the closed pipe.
    many = [diagnosis("plateau", step, step + 1) for step in range(0, 4000, 2)]
    write_run(tmp_path / "run", many, steps=4000)
    command = f"{sys.executable} -m lightning_optdiag.cli report {tmp_path} --json | head -c 20"
    result = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {command}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.stdout.startswith("[\n  {")
    assert len(result.stdout) == 20
    assert "Traceback" not in result.stderr
    assert "BrokenPipeError" not in result.stderr


def test_fail_on_sets_the_least_severe_diagnosis_that_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    converged = Diagnosis(
        kind="plateau",
        step=60,
        severity="info",
        confidence=0.9,
        evidence={},
        message="The training loss stopped improving.",
        recommendation="Stop early.",
    )
    run = write_run(tmp_path / "run", [converged])
    code, out, _ = report(capsys, str(run))
    assert code == 0  # shown, but a converged run's plateau is not a problem
    assert "plateau" in out
    assert report(capsys, str(run), "--fail-on", "info")[0] == 1
    code, payload = report_json(capsys, str(run), "--fail-on", "info")
    assert (code, payload[0]["healthy"]) == (1, False)
    sick = write_run(tmp_path / "sick", [diagnosis("saddle_point", 40)])
    assert report(capsys, str(sick))[0] == 1
    assert report(capsys, str(sick), "--fail-on", "error")[0] == 0
