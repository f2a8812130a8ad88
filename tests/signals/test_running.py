"""RunningMedian against ``statistics.median`` of the last ``window`` values."""

from __future__ import annotations

import copy
import json
import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_optdiag.signals import RunningMedian

# Floats of any magnitude, and small integers so that ties and repeated values are common.
values_strategy = st.lists(
    st.one_of(
        st.floats(
            allow_nan=False, allow_infinity=False, width=64, min_value=-1e300, max_value=1e300
        ),
        st.integers(min_value=-3, max_value=3).map(float),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(values=values_strategy, window=st.integers(min_value=1, max_value=12))
def test_median_of_last_window_values(values: list[float], window: int) -> None:
    running = RunningMedian(window)
    for count, value in enumerate(values, start=1):
        running.add(value)
        recent = values[max(0, count - window) : count]
        assert len(running) == len(recent)
        assert running.median == statistics.median(recent)


def test_empty_median_is_nan() -> None:
    running = RunningMedian(5)
    assert len(running) == 0
    assert math.isnan(running.median)


def test_window_one_tracks_the_last_value() -> None:
    running = RunningMedian(1)
    for value in [3.0, -1.0, 7.5, 7.5, 0.0]:
        running.add(value)
        assert running.median == value
        assert len(running) == 1


@settings(max_examples=100, deadline=None)
@given(
    first=values_strategy,
    then=values_strategy,
    window=st.integers(min_value=1, max_value=12),
)
def test_state_dict_round_trip_continues_identically(
    first: list[float], then: list[float], window: int
) -> None:
    original = RunningMedian(window)
    for value in first:
        original.add(value)
    # The state must survive serialisation (checkpoints) and later mutation of the original.
    state = json.loads(json.dumps(original.state_dict()))
    restored = RunningMedian(window)
    restored.add(123.0)  # loading replaces whatever was there
    restored.load_state_dict(state)
    assert len(restored) == len(original)
    assert restored.state_dict() == original.state_dict()
    if len(original):
        assert restored.median == original.median
    else:
        assert math.isnan(restored.median)
    # Same future: the oldest values are evicted in the same order.
    for count, value in enumerate(then, start=1):
        original.add(value)
        restored.add(value)
        combined = first + then[:count]
        assert restored.median == original.median == statistics.median(combined[-window:])


def test_state_dict_is_a_snapshot() -> None:
    running = RunningMedian(3)
    for value in [1.0, 2.0, 3.0]:
        running.add(value)
    state = copy.deepcopy(running.state_dict())
    snapshot = running.state_dict()
    running.add(100.0)
    assert snapshot == state


def test_loading_more_values_than_the_window_keeps_the_most_recent() -> None:
    values = [5.0, 1.0, 9.0, 2.0, 8.0, 3.0]
    long = RunningMedian(len(values))
    for value in values:
        long.add(value)
    short = RunningMedian(3)
    short.load_state_dict(long.state_dict())
    assert len(short) == 3
    assert short.median == statistics.median(values[-3:])


@pytest.mark.parametrize("window", [2, 5])
def test_median_with_repeated_values_and_evictions(window: int) -> None:
    values = [1.0, 1.0, 1.0, 5.0, 5.0, 1.0, 5.0, 5.0, 5.0, 1.0]
    running = RunningMedian(window)
    for count, value in enumerate(values, start=1):
        running.add(value)
        assert running.median == statistics.median(values[max(0, count - window) : count])
