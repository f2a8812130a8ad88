"""The opt-in ``lightning.pytorch.callbacks_factory`` entry point and its environment variable."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from lightning_optdiag.autoattach import (
    ENV_VAR,
    MONITORS,
    callbacks_factory,
    selected_callbacks,
)
from lightning_optdiag.callbacks import AutoAttach

GROUP = "lightning.pytorch.callbacks_factory"


@pytest.mark.parametrize("value", [None, "", "  ", "0", "false", "OFF", "no"])
def test_nothing_is_selected_unless_asked(value: str | None) -> None:
    assert selected_callbacks(value) == ()


@pytest.mark.parametrize("value", ["1", "true", "On", "yes", "all", " ALL "])
def test_yes_selects_every_monitor(value: str) -> None:
    assert selected_callbacks(value) == MONITORS
    assert MONITORS == ("GradientMonitor", "NonFiniteGuard", "CurvatureMonitor", "TrainingDoctor")


def test_a_list_selects_those_in_a_fixed_order_without_repeats() -> None:
    assert selected_callbacks("doctor, GradientMonitor,gradient,,") == (
        "GradientMonitor",
        "TrainingDoctor",
    )
    assert selected_callbacks("curvature,NONFINITE") == ("NonFiniteGuard", "CurvatureMonitor")


@pytest.mark.parametrize("value", ["2", "GradientMonitor,OptimizerSwitch", "everything"])
def test_an_unknown_value_is_rejected_with_the_variable_and_the_choices(value: str) -> None:
    with pytest.raises(ValueError, match=ENV_VAR) as info:
        selected_callbacks(value)
    assert repr(value) in str(info.value)
    assert "GradientMonitor" in str(info.value)
    assert "0/off" in str(info.value)


def test_the_factory_returns_nothing_when_the_variable_is_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert callbacks_factory() == []
    monkeypatch.setenv(ENV_VAR, "0")
    assert callbacks_factory() == []


def test_the_factory_returns_one_attacher_for_the_selection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_VAR, "gradient,doctor")
    (attacher,) = callbacks_factory()
    assert isinstance(attacher, AutoAttach)
    assert attacher.names == ("GradientMonitor", "TrainingDoctor")


def test_the_entry_point_is_registered_for_lightning() -> None:
    (entry,) = [entry for entry in entry_points(group=GROUP) if entry.name == "optdiag"]
    assert entry.load() is callbacks_factory


def test_attacher_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="OptimizerSwitch"):
        AutoAttach(["GradientMonitor", "OptimizerSwitch"])
