"""``optdiag lr-find``: the curve and suggestion on success (exit 0), one line on bad input (2)."""

from __future__ import annotations

import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from lightning_optdiag.cli import LR_FIND_MODES, main
from lightning_optdiag.lr_range import MODES

ROOT = Path(__file__).resolve().parents[1]
TARGET = "tests.lr_find_target"
QUICK = ["--min-lr", "1e-4", "--max-lr", "10", "--num-training", "40"]


def optdiag(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lightning_optdiag.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )


def test_help_is_fast_and_lists_the_options() -> None:
    started = time.perf_counter()
    result = optdiag("lr-find", "--help")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0
    for option in ("TARGET", "--datamodule", "--min-lr", "--max-lr", "--num-training", "--mode"):
        assert option in result.stdout
    assert "--png" in result.stdout
    assert "--init-args" in result.stdout
    assert elapsed < 5.0  # no torch or Lightning import just to print help


def test_the_command_offers_the_library_modes() -> None:
    # The command keeps its own copy so that --help needs no torch import.
    assert LR_FIND_MODES == MODES


def test_prints_the_curve_and_the_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lr-find", f"{TARGET}:TinyRegression", *QUICK]) == 0
    output = capsys.readouterr().out
    assert "LR range test" in output
    assert "loss " in output
    assert "← suggestion" in output
    assert "Suggested learning rate: " in output


def test_init_args_reach_the_module(capsys: pytest.CaptureFixture[str]) -> None:
    # Full batches of 64 samples: 40 steps then cover 40 epochs of one batch each.
    args = ["lr-find", f"{TARGET}:TinyRegression", "--init-args", '{"batch_size": 64}', *QUICK]
    assert main([*args, "--early-stop-threshold", "none", "--mode", "linear"]) == 0
    assert "linear sweep 0.0001 → 10 · 40 of 40 steps" in capsys.readouterr().out


def test_datamodule_supplies_the_data(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["lr-find", f"{TARGET}:RegressionWithoutData", "--datamodule", f"{TARGET}:TinyData"]
    assert main([*args, "--datamodule-init-args", '{"batch_size": 32}', *QUICK]) == 0
    assert "Suggested learning rate: " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no_such_package.models:Net"], "TARGET: cannot import 'no_such_package.models'"),
        ([TARGET], f"TARGET: invalid value {TARGET!r} (expected package.module:ClassName)"),
        ([f"{TARGET}:Missing"], f"TARGET: module {TARGET!r} has no attribute 'Missing'"),
        ([f"{TARGET}:NotAModule"], f"TARGET: {TARGET}:NotAModule is not a LightningModule"),
        ([f"{TARGET}:divergence_lr"], "is not a LightningModule"),
        (
            [f"{TARGET}:RegressionWithoutData"],
            f"{TARGET}:RegressionWithoutData defines no train_dataloader()",
        ),
        (
            [f"{TARGET}:TinyRegression", "--datamodule", f"{TARGET}:TinyRegression"],
            "--datamodule: tests.lr_find_target:TinyRegression is not a LightningDataModule",
        ),
        (
            [f"{TARGET}:TinyRegression", "--min-lr", "-1"],
            "Invalid min_lr: -1.0 (expected a finite number > 0)",
        ),
        (
            [f"{TARGET}:TinyRegression", "--min-lr", "1e-2", "--max-lr", "1e-3"],
            "Invalid max_lr: 0.001 (expected a finite number > 0.01)",
        ),
        (
            [f"{TARGET}:TinyRegression", "--max-lr", "inf"],
            "Invalid max_lr: inf (expected a finite number > 1e-08)",
        ),
        (
            [f"{TARGET}:TinyRegression", "--num-training", "1"],
            "Invalid num_training: 1 (expected an integer >= 2)",
        ),
        (
            [f"{TARGET}:TinyRegression", "--early-stop-threshold", "0.5"],
            "Invalid early_stop_threshold: 0.5 (expected a finite number > 1)",
        ),
        ([f"{TARGET}:TinyRegression", "--init-args", "{"], "--init-args: invalid JSON '{'"),
        (
            [f"{TARGET}:TinyRegression", "--init-args", "[1]"],
            "--init-args: expected a JSON object of keyword arguments, got '[1]'",
        ),
        (
            [f"{TARGET}:TinyRegression", "--init-args", '{"bogus": 1}'],
            f"cannot create {TARGET}:TinyRegression(**{{'bogus': 1}}): TypeError:",
        ),
        (
            [f"{TARGET}:BrokenInit"],
            f"cannot create {TARGET}:BrokenInit(**{{}}): RuntimeError: cannot build this module",
        ),
        (
            [f"{TARGET}:TinyRegression", "--datamodule-init-args", '{"batch_size": 8}'],
            "--datamodule-init-args given without --datamodule",
        ),
        (
            [f"{TARGET}:TwoOptimizers", *QUICK],
            "Lightning cannot run the finder on tests.lr_find_target:TwoOptimizers: "
            "`model.configure_optimizers()` returned 2, but learning rate finder only works "
            "with single optimizer",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["lr-find", *args]) == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert "\n" not in error
    assert error.startswith("optdiag lr-find: error: ")
    assert message in error
    assert "Suggested" not in captured.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-lr", "tiny"], "argument --min-lr: invalid float value: 'tiny'"),
        (["--num-training", "2.5"], "argument --num-training: invalid int value: '2.5'"),
        (["--mode", "cubic"], "argument --mode: invalid choice: 'cubic'"),
        (["--early-stop-threshold", "x"], "invalid value 'x': expected a number or 'none'"),
    ],
)
def test_unparsable_numbers_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["lr-find", f"{TARGET}:TinyRegression", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_separate_process_exits_2_on_an_unimportable_target() -> None:
    result = optdiag("lr-find", "no_such_package:Net")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "optdiag lr-find: error: TARGET: cannot import 'no_such_package': "
        "ModuleNotFoundError: No module named 'no_such_package'"
    )


def test_png_without_matplotlib_exits_2_before_the_sweep(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    started = time.perf_counter()
    assert main(["lr-find", f"{TARGET}:TinyRegression", "--png", "curve.png"]) == 2
    assert time.perf_counter() - started < 5.0
    captured = capsys.readouterr()
    assert "--png: plotting the LR range test needs matplotlib" in captured.err
    assert "pip install matplotlib" in captured.err
    assert captured.out == ""


def test_png_is_written_with_matplotlib(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved: list[Any] = []

    class Figure:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def subplots(self) -> Any:
            return types.SimpleNamespace(
                **{
                    name: lambda *args, **kwargs: None
                    for name in ("plot", "set_xscale", "set_xlabel", "set_ylabel", "set_ylim")
                },
                set_title=lambda *args, **kwargs: None,
                legend=lambda *args, **kwargs: None,
            )

        def savefig(self, path: Path, **kwargs: Any) -> None:
            saved.append(path)
            Path(path).write_bytes(b"\x89PNG")

    figure = types.ModuleType("matplotlib.figure")
    figure.Figure = Figure  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "matplotlib", types.ModuleType("matplotlib"))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", figure)
    target = tmp_path / "curve.png"
    assert main(["lr-find", f"{TARGET}:TinyRegression", *QUICK, "--png", str(target)]) == 0
    assert saved == [target]
    assert target.read_bytes() == b"\x89PNG"
    assert "Plot written to" in capsys.readouterr().out
