"""Rendering diagnoses for people (no Lightning): rich console tables, TensorBoard summaries,
and reading a run's event files back (``optdiag report``).

Submodules load on first use: reading logs back never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_optdiag._lazy import lazy_attributes

if TYPE_CHECKING:
    from lightning_optdiag.report.console import change_panel, diagnosis_table, full_report
    from lightning_optdiag.report.logdir import LogdirError, RunLog, read_logdir, read_run
    from lightning_optdiag.report.record import DoctorRecord, decode_record, encode_record
    from lightning_optdiag.report.summary import RunVerdict, run_report, run_verdict, sparkline
    from lightning_optdiag.report.tensorboard import (
        custom_scalars_layout,
        diagnoses_markdown,
        write_density_histogram,
    )

_LAZY = {
    "change_panel": "console",
    "diagnosis_table": "console",
    "full_report": "console",
    "LogdirError": "logdir",
    "RunLog": "logdir",
    "read_logdir": "logdir",
    "read_run": "logdir",
    "DoctorRecord": "record",
    "decode_record": "record",
    "encode_record": "record",
    "RunVerdict": "summary",
    "run_report": "summary",
    "run_verdict": "summary",
    "sparkline": "summary",
    "custom_scalars_layout": "tensorboard",
    "diagnoses_markdown": "tensorboard",
    "write_density_histogram": "tensorboard",
}

__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "DoctorRecord",
    "LogdirError",
    "RunLog",
    "RunVerdict",
    "change_panel",
    "custom_scalars_layout",
    "decode_record",
    "diagnoses_markdown",
    "diagnosis_table",
    "encode_record",
    "full_report",
    "read_logdir",
    "read_run",
    "run_report",
    "run_verdict",
    "sparkline",
    "write_density_histogram",
]
