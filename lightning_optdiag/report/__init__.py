"""Rendering diagnoses for people: rich console tables and TensorBoard summaries (no Lightning)."""

from lightning_optdiag.report.console import change_panel, diagnosis_table, full_report
from lightning_optdiag.report.tensorboard import (
    custom_scalars_layout,
    diagnoses_markdown,
    write_density_histogram,
)

__all__ = [
    "change_panel",
    "custom_scalars_layout",
    "diagnoses_markdown",
    "diagnosis_table",
    "full_report",
    "write_density_histogram",
]
