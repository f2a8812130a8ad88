"""Argument checks shared across the package.

Every message names the argument, shows the bad value and says what is accepted, in the style of
torch.optim ("Invalid k: 0 (expected ...)").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

import torch


def check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """Return ``value`` as an ``int`` if it is an integer within ``[minimum, maximum]``.

    Raises:
        TypeError: ``value`` is not an integer (``bool`` is refused too).
        ValueError: ``value`` lies outside the accepted range.
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(
            f"Invalid {name}: {value!r} (expected an integer, got {type(value).__name__})"
        )
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"Invalid {name}: {value} (expected {_describe_range(minimum, maximum)})")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> float:
    """Return ``value`` as a finite ``float`` within the accepted range.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is not finite or lies outside the accepted range.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"Invalid {name}: {value!r} (expected a real number, got {type(value).__name__})"
        )
    value = float(value)
    too_small = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    too_large = maximum is not None and value > maximum
    if not math.isfinite(value) or too_small or too_large:
        lower = "" if minimum is None else f"{'>' if exclusive_minimum else '>='} {minimum}"
        upper = "" if maximum is None else f"<= {maximum}"
        bounds = " and ".join(part for part in (lower, upper) if part) or "finite"
        raise ValueError(f"Invalid {name}: {value} (expected a finite number {bounds})")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``.

    Raises:
        ValueError: ``value`` is not one of ``choices``.
    """
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        accepted = ", ".join(repr(option) for option in options)
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {accepted})")
    return value


def check_generator(name: str, value: Any) -> torch.Generator | None:
    """Return ``value`` if it is a ``torch.Generator`` or ``None``.

    Raises:
        TypeError: ``value`` is anything else.
    """
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(
            f"Invalid {name}: {value!r} (expected a torch.Generator or None, "
            f"got {type(value).__name__})"
        )
    return value


def _describe_range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer in [{minimum}, {maximum}]"
    if minimum is not None:
        return f"an integer >= {minimum}"
    if maximum is not None:
        return f"an integer <= {maximum}"
    return "an integer"
