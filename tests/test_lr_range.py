"""The LR range test: Lightning's finder, checked against facts computed independently of it.

The module under test is a linear regression with a quadratic loss, where full-batch gradient
descent is stable exactly below ``2 / lambda_max`` (``tests/lr_find_target.py``).
"""

from __future__ import annotations

import io
import math
import random
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

from lightning_optdiag.lr_range import (
    MODES,
    LRRangeResult,
    check_sweep_arguments,
    format_lr,
    lr_range_test,
    render_lr_range,
)
from tests.lr_find_target import (
    RegressionWithoutData,
    TinyData,
    TinyRegression,
    divergence_lr,
)

BETA = 0.98  # Lightning's smoothing factor for the recorded losses


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def assert_bitwise_equal(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def rendered(result: LRRangeResult, **kwargs: Any) -> str:
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(render_lr_range(result, **kwargs))
    return console.file.getvalue()  # type: ignore[attr-defined]


# --- the sweep ------------------------------------------------------------------------------------


def test_exponential_sweep_covers_the_range_geometrically() -> None:
    result = lr_range_test(
        TinyRegression(), min_lr=1e-6, max_lr=1e-2, num_training=30, early_stop_threshold=None
    )
    n = result.num_training
    assert len(result.lrs) == len(result.losses) == n == 30
    assert not result.stopped_early
    assert result.lrs[0] == pytest.approx(1e-6, rel=1e-12)
    assert result.lrs[-1] == pytest.approx(1e-2, rel=1e-9)
    ratios = np.diff(np.log(result.lrs))
    # Lightning 2.6 skips the first rung of the ladder: min_lr, then
    # min_lr * (max_lr / min_lr) ** (k / n) for k = 2 .. n, so the first log-step is twice the
    # others. Lightning-AI/pytorch-lightning#21931 proposes n evenly spaced rungs: accept both.
    skipping = [1e-6] + [1e-6 * 1e4 ** (k / n) for k in range(2, n + 1)]
    even = [1e-6 * 1e4 ** (k / (n - 1)) for k in range(n)]
    if result.lrs == pytest.approx(skipping, rel=1e-9):
        assert ratios[1:] == pytest.approx(np.full(n - 2, math.log(1e4) / n), rel=1e-9)
        assert ratios[0] == pytest.approx(2 * math.log(1e4) / n, rel=1e-9)
    else:
        assert result.lrs == pytest.approx(even, rel=1e-9)


def test_linear_sweep_covers_the_range_linearly() -> None:
    result = lr_range_test(
        TinyRegression(), min_lr=1e-4, max_lr=1e-2, num_training=20, mode="linear"
    )
    assert result.mode == "linear"
    skipping = [1e-4] + [1e-4 + k / 20 * (1e-2 - 1e-4) for k in range(2, 21)]
    even = [1e-4 + k / 19 * (1e-2 - 1e-4) for k in range(20)]
    assert result.lrs in (pytest.approx(skipping, rel=1e-9), pytest.approx(even, rel=1e-9))


def test_first_losses_are_the_smoothed_losses_of_the_untouched_model() -> None:
    module = TinyRegression(batch_size=16)  # 4 batches per epoch, not shuffled
    batches = module.batches()
    with torch.no_grad():  # the loss of each batch before any step, computed here
        untouched = [float(module.loss(batch)) for batch in batches]
    assert len(set(untouched)) == 4  # the batches really differ
    result = lr_range_test(module, min_lr=1e-9, max_lr=1e-3, num_training=60)
    # At learning rates <= 1e-8 the first 8 steps move the weights by ~1e-8: each step's raw loss
    # is the untouched model's loss on that batch. Lightning records their exponential moving
    # average (beta = 0.98) with a bias correction 1 - beta ** (k + offset) at step k. Lightning
    # 2.6 counts the step after the optimizer step (offset 2), so the first value is only
    # 0.02 / 0.0396 = 0.505 of the loss; a textbook correction (offset 1) would give the loss.
    assert result.lrs[7] < 1e-8
    offset = 2 if result.losses[0] < 0.75 * untouched[0] else 1
    average = 0.0
    for k in range(8):
        average = BETA * average + (1 - BETA) * untouched[k % 4]
        expected = average / (1 - BETA ** (k + offset))
        assert result.losses[k] == pytest.approx(expected, rel=1e-5), k
    if offset == 2:
        assert result.losses[0] == pytest.approx(untouched[0] * 0.02 / (1 - BETA**2), rel=1e-6)


def test_suggestion_and_early_stop_respect_the_stability_limit() -> None:
    module = TinyRegression(batch_size=64)  # full batches: gradient descent on a quadratic
    limit = divergence_lr(module.inputs)
    assert 0.5 < limit < 1.0  # unit-variance features: lambda_max ~ 2 (1 + sqrt(d / n))^2
    result = lr_range_test(module, min_lr=1e-4, max_lr=10.0, num_training=100)
    assert result.suggestion is not None
    assert 1e-4 < result.suggestion < limit
    # Below the limit every eigen-component of the error shrinks, so the raw loss never rises and
    # the smoothed one cannot exceed 4x its best (the bias correction contributes at most 2x):
    # the sweep can only stop after the learning rate went past 2 / lambda_max.
    assert result.stopped_early
    assert len(result.lrs) < 100
    assert result.lrs[-1] > limit
    losses = result.losses
    threshold = 4.0
    assert losses[-1] > threshold * min(losses[:-1])  # the step that stopped it is recorded
    for k in range(1, len(losses) - 1):  # and no earlier one crossed the threshold
        assert losses[k] <= threshold * min(losses[:k]), k


def test_without_early_stop_the_sweep_runs_to_max_lr() -> None:
    result = lr_range_test(
        TinyRegression(batch_size=64),
        min_lr=1e-4,
        max_lr=10.0,
        num_training=60,
        early_stop_threshold=None,
    )
    assert len(result.lrs) == 60
    assert result.lrs[-1] == pytest.approx(10.0)
    assert result.losses[-1] > 100 * result.losses[0]  # diverged, and kept going


def test_the_module_is_left_exactly_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    module = TinyRegression(lr=0.05)
    module.layer.eval()  # an unusual mode, which must survive
    module.layer.weight.grad = torch.full_like(module.layer.weight, 3.0)
    before = snapshot(module)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002 - the legacy global stream is what is being protected
    numpy_state = np.random.get_state(legacy=False)["state"]  # noqa: NPY002
    rng_states = (torch.get_rng_state(), random.getstate(), numpy_state)

    result = lr_range_test(module, min_lr=1e-4, max_lr=10.0, num_training=50)

    assert result.stopped_early or result.lrs[-1] == pytest.approx(10.0)
    assert_bitwise_equal(before, module)
    assert torch.equal(module.layer.weight.grad, torch.full_like(module.layer.weight, 3.0))
    assert module.layer.bias.grad is None
    assert module.training
    assert not module.layer.training
    assert module.lr == 0.05
    assert module.hparams["lr"] == 0.05
    assert module._trainer is None  # detached from the throwaway Trainer
    assert torch.equal(torch.get_rng_state(), rng_states[0])
    assert random.getstate() == rng_states[1]
    numpy_after = np.random.get_state(legacy=False)["state"]  # noqa: NPY002
    assert np.array_equal(numpy_after["key"], numpy_state["key"])
    assert numpy_after["pos"] == numpy_state["pos"]
    assert list(tmp_path.iterdir()) == []  # no checkpoint, log or lightning_logs left behind


def test_update_attr_writes_the_suggestion_but_keeps_the_weights() -> None:
    module = TinyRegression(lr=0.05, batch_size=64)
    before = snapshot(module)
    result = lr_range_test(module, min_lr=1e-4, max_lr=10.0, num_training=50, update_attr=True)
    assert result.suggestion is not None
    assert module.lr == result.suggestion
    assert module.hparams["lr"] == result.suggestion
    assert_bitwise_equal(before, module)


def test_update_attr_needs_the_attribute() -> None:
    with pytest.raises(ValueError, match=r"Invalid attr_name: 'step_size' \(update_attr=True"):
        lr_range_test(TinyRegression(), update_attr=True, attr_name="step_size")


def test_datamodule_supplies_the_data_and_is_detached_afterwards() -> None:
    data = TinyData(batch_size=64)
    module = RegressionWithoutData(batch_size=64)
    before = snapshot(module)
    result = lr_range_test(module, datamodule=data, min_lr=1e-4, max_lr=1.0, num_training=20)
    assert len(result.lrs) == 20
    assert data.trainer is None
    assert_bitwise_equal(before, module)


def test_a_short_sweep_has_no_suggestion() -> None:
    # Lightning skips the first 10 points and the last one, and needs 2 finite losses besides.
    result = lr_range_test(TinyRegression(), min_lr=1e-4, max_lr=1e-2, num_training=12)
    assert len(result.lrs) == 12
    assert result.suggestion is None
    assert result.suggestion_index is None
    assert "No suggestion" in rendered(result)


# --- argument checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"min_lr": -1.0}, ValueError, "Invalid min_lr: -1.0 (expected a finite number > 0)"),
        ({"min_lr": 0}, ValueError, "Invalid min_lr: 0.0 (expected a finite number > 0)"),
        ({"min_lr": math.nan}, ValueError, "Invalid min_lr: nan (expected a finite number > 0)"),
        ({"min_lr": "1e-3"}, TypeError, "Invalid min_lr: '1e-3' (expected a real number, got str)"),
        (
            {"min_lr": 1e-2, "max_lr": 1e-3},
            ValueError,
            "Invalid max_lr: 0.001 (expected a finite number > 0.01)",
        ),
        (
            {"max_lr": math.inf},
            ValueError,
            "Invalid max_lr: inf (expected a finite number > 1e-08)",
        ),
        ({"num_training": 1}, ValueError, "Invalid num_training: 1 (expected an integer >= 2)"),
        (
            {"num_training": 10.0},
            TypeError,
            "Invalid num_training: 10.0 (expected an integer, got float)",
        ),
        (
            {"mode": "cubic"},
            ValueError,
            "Invalid mode: 'cubic' (expected one of 'exponential', 'linear')",
        ),
        (
            {"early_stop_threshold": 1.0},
            ValueError,
            "Invalid early_stop_threshold: 1.0 (expected a finite number > 1)",
        ),
        ({"update_attr": "yes"}, TypeError, "Invalid update_attr: 'yes' (expected True or False)"),
        ({"trainer_kwargs": [1]}, TypeError, "Invalid trainer_kwargs: [1] (expected a mapping"),
    ],
)
def test_bad_arguments_are_named_with_their_value(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        lr_range_test(TinyRegression(), **kwargs)
    assert message in str(info.value)


def test_the_module_must_be_a_lightning_module() -> None:
    with pytest.raises(TypeError, match=r"Invalid module: Linear \(expected a lightning"):
        lr_range_test(torch.nn.Linear(2, 1))  # type: ignore[arg-type]


def test_training_data_is_required_once() -> None:
    with pytest.raises(ValueError, match=r"RegressionWithoutData defines no train_dataloader"):
        lr_range_test(RegressionWithoutData())
    module = TinyRegression()
    with pytest.raises(ValueError, match="given together with a datamodule"):
        lr_range_test(module, module.train_dataloader(), TinyData())


def test_fast_dev_run_is_reported_instead_of_returning_nothing() -> None:
    with pytest.raises(RuntimeError, match="fast_dev_run"):
        lr_range_test(TinyRegression(), trainer_kwargs={"fast_dev_run": True})


def test_check_sweep_arguments_normalises() -> None:
    assert check_sweep_arguments(1e-6, 1, 50, "linear", 3) == (1e-6, 1.0, 50, "linear", 3.0)
    assert MODES == ("exponential", "linear")


# --- the result, its view and its plot ------------------------------------------------------------


def synthetic_result(
    steps: int = 60, num_training: int = 60, suggestion_at: int | None = 30
) -> LRRangeResult:
    lrs = [1e-5 * 1e5 ** (k / (num_training - 1)) for k in range(steps)]
    # Flat, then a valley, then a blow-up at the end.
    losses = [1.0 - 0.8 * (math.tanh((k - 30) / 6) + 1) / 2 for k in range(steps)]
    if steps == num_training:
        losses[-3:] = [5.0, 50.0, math.inf]
    return LRRangeResult(
        lrs=lrs,
        losses=losses,
        suggestion=None if suggestion_at is None else lrs[suggestion_at],
        num_training=num_training,
        mode="exponential",
        min_lr=1e-5,
        max_lr=1.0,
        early_stop_threshold=4.0,
    )


def test_render_shows_the_curve_the_table_and_the_suggestion() -> None:
    result = synthetic_result()
    text = rendered(result)
    suggestion = format_lr(result.suggestion)  # type: ignore[arg-type]
    assert f"Suggested learning rate: {suggestion}" in text
    assert f"▲ suggestion {suggestion}" in text or f"suggestion {suggestion} ▲" in text
    lines = text.splitlines()
    spark = next(line for line in lines if line.startswith("loss "))
    assert set(spark[5:].strip()) <= set("▁▂▃▄▅▆▇█x")
    assert spark[5] == "█"
    assert spark[5 + 59] == "x"
    assert "▁" in spark  # the valley at the bottom
    rows = [line for line in lines if line.strip()[:1].isdigit()]
    assert 10 <= len(rows) <= 12
    suggested_row = next(line for line in rows if "← suggestion" in line)
    assert suggested_row.split()[:2] == ["30", suggestion]
    assert "lowest loss" in text
    assert "60 of 60 steps" in text


def test_render_marks_an_early_stop_and_leaves_the_rest_blank() -> None:
    result = synthetic_result(steps=45)
    text = rendered(result, width=40)
    assert "45 of 60 steps" in text
    assert "stopped early (loss > 4x best)" in text
    spark = next(line for line in text.splitlines() if line.startswith("loss "))
    assert spark[5:].rstrip()
    assert len(spark[5:].rstrip()) < 40 * 45 / 60 + 2


def test_render_without_suggestion_or_points() -> None:
    assert "No suggestion" in rendered(synthetic_result(suggestion_at=None))
    empty = LRRangeResult([], [], None, 10, "exponential", 1e-5, 1.0, None)
    assert "No losses were recorded" in rendered(empty)
    with pytest.raises(ValueError, match=r"Invalid width: 3 \(expected an integer >= 10\)"):
        render_lr_range(empty, width=3)
    with pytest.raises(TypeError, match="expected an LRRangeResult"):
        render_lr_range({"lrs": []})  # type: ignore[arg-type]


def test_render_needs_no_lightning() -> None:
    probe = (
        "import sys\n"
        "from lightning_optdiag.lr_range import LRRangeResult, render_lr_range\n"
        "from rich.console import Console\n"
        "r = LRRangeResult([1e-3, 1e-2], [1.0, 0.5], None, 2, 'exponential', 1e-3, 1e-2, None)\n"
        "Console().print(render_lr_range(r))\n"
        "print(any(name.startswith('lightning.') for name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip().endswith("False")


def test_result_is_frozen_and_consistent() -> None:
    result = synthetic_result()
    with pytest.raises(AttributeError):
        result.suggestion = 1.0  # type: ignore[misc]
    assert result.suggestion_index == 30
    with pytest.raises(ValueError, match="Invalid losses: 1 values"):
        LRRangeResult([1e-3, 1e-2], [1.0], None, 2, "exponential", 1e-3, 1e-2, None)


def test_plot_png_without_matplotlib_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        synthetic_result().plot_png(tmp_path / "curve.png")
    assert not (tmp_path / "curve.png").exists()


class _Recorder:
    """Stands in for matplotlib's Figure and Axes: records every call."""

    def __init__(self, log: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> None:
        self.log = log

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            self.log.append((name, args, kwargs))
            if name == "savefig":
                Path(args[0]).write_bytes(b"\x89PNG fake")
            return self if name == "subplots" else None

        return record


def fake_matplotlib(
    monkeypatch: pytest.MonkeyPatch,
) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    log: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    package = types.ModuleType("matplotlib")
    figure = types.ModuleType("matplotlib.figure")
    figure.Figure = lambda *args, **kwargs: _Recorder(log)  # type: ignore[attr-defined]
    package.figure = figure  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "matplotlib", package)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", figure)
    return log


def test_plot_png_draws_the_curve_and_the_suggestion(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    log = fake_matplotlib(monkeypatch)
    result = synthetic_result()
    path = result.plot_png(str(tmp_path / "curve.png"))
    assert path == tmp_path / "curve.png"
    assert path.exists()
    calls = {name: (args, kwargs) for name, args, kwargs in log}
    assert calls["savefig"] == ((path,), {"format": "png"})
    plots = [(args, kwargs) for name, args, kwargs in log if name == "plot"]
    assert plots[0][0] == (result.lrs, result.losses)
    assert plots[1][0] == ([result.suggestion], [result.losses[30]])
    assert format_lr(result.suggestion) in plots[1][1]["label"]  # type: ignore[arg-type]
    assert calls["set_xscale"] == (("log",), {})
    # The blow-up at the end is cut off so the valley stays visible.
    low, high = calls["set_ylim"][0]
    assert high < 5.0
    assert low < min(result.losses)


@pytest.mark.parametrize("batch_size", [64, 16])
def test_steepest_decade_rule_lands_below_the_stability_limit_and_near_it(batch_size: int) -> None:
    # Full batches and noisy mini-batches alike: the fastest fall per decade comes within two
    # decades below 2 / lambda_max, where Lightning's rule can sit at the tiny-rate end.
    module = TinyRegression(batch_size=batch_size)
    limit = divergence_lr(module.inputs)
    result = lr_range_test(module, min_lr=1e-8, max_lr=10.0, num_training=100)
    steepest = result.steepest_decade_lr
    assert steepest is not None
    assert limit / 100 < steepest < limit
    lowest = min(range(10, len(result.losses)), key=lambda i: result.losses[i])
    assert steepest <= result.lrs[lowest]


def test_steepest_decade_rule_needs_three_points() -> None:
    short = LRRangeResult(
        lrs=[1e-3, 1e-2],
        losses=[1.0, 0.5],
        suggestion=None,
        num_training=2,
        mode="exponential",
        min_lr=1e-3,
        max_lr=1e-2,
        early_stop_threshold=None,
    )
    assert short.steepest_decade_lr is None
