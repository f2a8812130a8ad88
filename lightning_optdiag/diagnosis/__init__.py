"""Diagnosis rules (no Lightning): observations of a run in, findings with evidence out.

- :data:`KINDS`: the fixed vocabulary of diagnoses, with what each means.
- :class:`Thresholds`: every number the rules compare against, with its source.
- :class:`Observations` / :func:`diagnose`: the rules themselves.
- :class:`Finding` / :class:`Diagnosis`: what a rule concludes, and that conclusion over time.
"""

from lightning_optdiag.diagnosis.records import KINDS, SEVERITIES, Diagnosis, Finding
from lightning_optdiag.diagnosis.rules import CurvatureObservation, Observations, diagnose
from lightning_optdiag.diagnosis.thresholds import Thresholds

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
