"""Diagnosis rules (no Lightning): observations of a run in, findings with evidence out.

- :data:`KINDS`: the fixed vocabulary of diagnoses, with what each means.
- :class:`Thresholds`: every number the rules compare against, with its source.
- :class:`Observations` / :func:`diagnose`: the rules themselves.
- :class:`Finding` / :class:`Diagnosis`: what a rule concludes, and that conclusion over time.

The rules and thresholds (which need torch) load on first use, so that reading records back
(``optdiag report``) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_optdiag._lazy import lazy_attributes
from lightning_optdiag.diagnosis.records import KINDS, SEVERITIES, Diagnosis, Finding

if TYPE_CHECKING:
    from lightning_optdiag.diagnosis.rules import CurvatureObservation, Observations, diagnose
    from lightning_optdiag.diagnosis.thresholds import Thresholds

_LAZY = {
    "CurvatureObservation": "rules",
    "Observations": "rules",
    "diagnose": "rules",
    "Thresholds": "thresholds",
}

__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "KINDS",
    "SEVERITIES",
    "CurvatureObservation",
    "Diagnosis",
    "Finding",
    "Observations",
    "Thresholds",
    "diagnose",
]
