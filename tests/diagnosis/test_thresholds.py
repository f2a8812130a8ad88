"""Thresholds: documented defaults, validation with messages naming the field."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import pytest

from lightning_optdiag.diagnosis import Thresholds

DEFAULTS = {
    "plateau_alpha": 0.05,
    "plateau_min_decrease": 0.01,
    "plateau_max_decrease": 0.1,
    "slow_progress": 0.05,
    "saddle_tau": 0.02,
    "stationary_grad_ratio": 0.01,
    "large_grad_ratio": 0.1,
    "noise_dominance": 10.0,
    "lr_high_ratio": 1.0,
    "lr_low_ratio": 0.05,
    "high_loss_fraction": 0.5,
    "small_loss_fraction": 0.01,
    "target_loss": None,
    "overfit_patience": 3,
    "overfit_min_rise": 0.05,
    "warmup_loss_rise": 1.0,
    "noise_min_measurements": 3,
    "event_window": 200,
}
INT_FIELDS = ("overfit_patience", "noise_min_measurements", "event_window")
UNIT_FIELDS = (
    "plateau_alpha",
    "saddle_tau",
    "stationary_grad_ratio",
    "large_grad_ratio",
    "small_loss_fraction",
)
POSITIVE_FIELDS = tuple(
    name for name in DEFAULTS if name not in (*INT_FIELDS, *UNIT_FIELDS, "target_loss")
)
FLOAT_FIELDS = (*UNIT_FIELDS, *POSITIVE_FIELDS)
NON_NUMERIC: tuple[Any, ...] = ("0.1", True, False, [0.1], None, 1j)


def test_defaults_match_the_documentation() -> None:
    assert dataclasses.asdict(Thresholds()) == DEFAULTS
    assert {item.name for item in dataclasses.fields(Thresholds)} == set(DEFAULTS)


def test_defaults_are_json_serialisable() -> None:
    json.dumps(dataclasses.asdict(Thresholds()), allow_nan=False)


def test_thresholds_are_frozen_and_comparable() -> None:
    thresholds = Thresholds()
    with pytest.raises(dataclasses.FrozenInstanceError):
        thresholds.saddle_tau = 0.5  # type: ignore[misc]
    assert Thresholds() == thresholds
    assert Thresholds(saddle_tau=0.03) != thresholds
    assert dataclasses.replace(thresholds, saddle_tau=0.03).saddle_tau == 0.03


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # The upper bound is inclusive (stationary_grad_ratio must stay below large_grad_ratio).
        *((name, 1.0) for name in UNIT_FIELDS if name != "stationary_grad_ratio"),
        *((name, 1e-9) for name in FLOAT_FIELDS),
        *((name, 1) for name in FLOAT_FIELDS if name != "stationary_grad_ratio"),  # ints are reals
        *((name, 1e6) for name in POSITIVE_FIELDS),  # no upper bound
        ("overfit_patience", 1),
        ("noise_min_measurements", 1),
        ("event_window", 1),
        ("event_window", 10**6),
        ("target_loss", None),
        ("target_loss", 0.0),
        ("target_loss", -3.5),  # e.g. a negative log-likelihood
    ],
)
def test_valid_values_are_accepted(name: str, value: Any) -> None:
    kwargs: dict[str, Any] = {name: value}
    # The ordered pairs need a partner that keeps "small" below "large".
    if name == "stationary_grad_ratio" and value >= Thresholds().large_grad_ratio:
        kwargs["large_grad_ratio"] = 1.0
    if name == "large_grad_ratio" and value <= Thresholds().stationary_grad_ratio:
        kwargs["stationary_grad_ratio"] = value / 2
    if name == "plateau_min_decrease" and value >= Thresholds().plateau_max_decrease:
        kwargs["plateau_max_decrease"] = 2 * value
    if name == "plateau_max_decrease" and value <= Thresholds().plateau_min_decrease:
        kwargs["plateau_min_decrease"] = value / 2
    if name == "lr_low_ratio" and value >= Thresholds().lr_high_ratio:
        kwargs["lr_high_ratio"] = 2 * value
    if name == "lr_high_ratio" and value <= Thresholds().lr_low_ratio:
        kwargs["lr_low_ratio"] = value / 2
    assert getattr(Thresholds(**kwargs), name) == value


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("plateau_min_decrease", "plateau_max_decrease"),
        ("stationary_grad_ratio", "large_grad_ratio"),
        ("lr_low_ratio", "lr_high_ratio"),
    ],
)
def test_ordered_pairs_must_stay_ordered(low: str, high: str) -> None:
    with pytest.raises(ValueError, match=rf"^Invalid {low}: 0.5 \(expected less than {high}=0.5"):
        Thresholds(**{low: 0.5, high: 0.5})


def _check(error: type[Exception], name: str, value: Any, shown: str) -> None:
    with pytest.raises(error, match=rf"^Invalid {name}: ") as info:
        Thresholds(**{name: value})
    assert shown in str(info.value), str(info.value)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [-1.0, 0.0, -1e-12, math.nan, math.inf, -math.inf])
def test_out_of_range_floats_are_rejected(name: str, value: float) -> None:
    _check(ValueError, name, value, str(value))


@pytest.mark.parametrize("name", UNIT_FIELDS)
@pytest.mark.parametrize("value", [1.0000001, 1.5, 100.0])
def test_unit_fields_above_one_are_rejected(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^Invalid {name}: {re.escape(str(value))} ") as info:
        Thresholds(**{name: value})
    assert "<= 1.0" in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        *((name, value) for name in FLOAT_FIELDS for value in NON_NUMERIC),
        # None is target_loss's documented "unset" value
        *(("target_loss", value) for value in NON_NUMERIC if value is not None),
    ],
)
def test_non_numeric_floats_are_rejected(name: str, value: Any) -> None:
    _check(TypeError, name, value, repr(value))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_target_loss_must_be_finite(value: float) -> None:
    _check(ValueError, "target_loss", value, str(value))


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("value", [0, -1, -100])
def test_int_fields_below_one_are_rejected(name: str, value: int) -> None:
    _check(ValueError, name, value, str(value))


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("value", [3.0, 2.5, "3", True, None])
def test_int_fields_must_be_ints(name: str, value: Any) -> None:
    _check(TypeError, name, value, repr(value))


def test_the_first_bad_field_is_reported() -> None:
    with pytest.raises(ValueError, match=r"^Invalid saddle_tau: -1\.0"):
        Thresholds(saddle_tau=-1.0, event_window=0)
