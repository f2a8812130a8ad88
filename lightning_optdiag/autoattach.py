"""Opt-in automatic attachment of optdiag's monitoring callbacks to every Trainer.

Lightning calls every function registered under the ``lightning.pytorch.callbacks_factory``
entry-point group when a Trainer is created; lightning-optdiag registers
:func:`callbacks_factory`, which does nothing unless the environment variable
``OPTDIAG_CALLBACKS`` asks for callbacks:

- unset, empty, ``0``, ``false``, ``off`` or ``no``: nothing is attached (the default);
- ``1``, ``true``, ``on``, ``yes`` or ``all``: GradientMonitor, NonFiniteGuard,
  CurvatureMonitor and TrainingDoctor with their defaults;
- a comma-separated list of names (``GradientMonitor,TrainingDoctor``, or the short forms
  ``gradient``, ``nonfinite``, ``curvature``, ``doctor``): those.

Callbacks that change the run (OptimizerSwitch, ScheduleAdvisor) are never attached this way:
add them explicitly. A callback the Trainer already has (passed by the user, or returned by
``LightningModule.configure_callbacks``) is not attached a second time.

This module is imported by every Trainer in an environment where lightning-optdiag is installed,
so it imports nothing heavy until the variable is set.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["ENV_VAR", "MONITORS", "callbacks_factory", "selected_callbacks"]

ENV_VAR = "OPTDIAG_CALLBACKS"
"""The environment variable that turns automatic attachment on (unset: off)."""

MONITORS = ("GradientMonitor", "NonFiniteGuard", "CurvatureMonitor", "TrainingDoctor")
"""The callbacks that can be attached automatically, in the order they are attached."""

_OFF = frozenset({"", "0", "false", "off", "no"})
_ALL = frozenset({"1", "true", "on", "yes", "all"})
_ALIASES = {
    **{name.lower(): name for name in MONITORS},
    "gradient": "GradientMonitor",
    "nonfinite": "NonFiniteGuard",
    "curvature": "CurvatureMonitor",
    "doctor": "TrainingDoctor",
}


def selected_callbacks(value: str | None) -> tuple[str, ...]:
    """The callback class names that the value ``value`` of ``OPTDIAG_CALLBACKS`` selects.

    Raises:
        ValueError: ``value`` names something else.
    """
    text = (value or "").strip()
    if text.lower() in _OFF:
        return ()
    if text.lower() in _ALL:
        return MONITORS
    names: list[str] = []
    for part in text.split(","):
        key = part.strip().lower()
        if not key:
            continue
        if key not in _ALIASES:
            raise ValueError(
                f"Invalid {ENV_VAR}={value!r}: unknown callback {part.strip()!r} (expected 1/all, "
                f"0/off, or a comma-separated list of {', '.join(MONITORS)}, or their short forms "
                "gradient, nonfinite, curvature, doctor)"
            )
        if _ALIASES[key] not in names:
            names.append(_ALIASES[key])
    return tuple(name for name in MONITORS if name in names)


def callbacks_factory() -> list[Any]:
    """The ``lightning.pytorch.callbacks_factory`` entry point: ``[]`` unless
    ``OPTDIAG_CALLBACKS`` is set, else one callback that attaches the selected ones at setup.

    Raises:
        ValueError: ``OPTDIAG_CALLBACKS`` has a value that is not understood.
    """
    names = selected_callbacks(os.environ.get(ENV_VAR))
    if not names:
        return []
    from lightning_optdiag.callbacks.auto_attach import AutoAttach

    return [AutoAttach(names)]
