"""Running statistics over a window of recent values (host-side floats)."""

from __future__ import annotations

import bisect
from collections import deque
from typing import Any

__all__ = ["RunningMedian"]


class RunningMedian:
    """Median of the last ``window`` values, updated in ``O(window)`` per value.

    Args:
        window: how many recent values to keep.
    """

    def __init__(self, window: int) -> None:
        self._window = window
        self._order: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._order)

    def add(self, value: float) -> None:
        """Add a value, dropping the oldest when the window is full."""
        self._order.append(value)
        bisect.insort(self._sorted, value)
        if len(self._order) > self._window:
            oldest = self._order.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]

    @property
    def median(self) -> float:
        """The median of the values in the window (NaN when empty)."""
        count = len(self._sorted)
        if count == 0:
            return float("nan")
        middle = count // 2
        if count % 2:
            return self._sorted[middle]
        return 0.5 * (self._sorted[middle - 1] + self._sorted[middle])

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self._order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._order.clear()
        self._sorted.clear()
        for value in state["values"]:
            self.add(float(value))
