"""Rendering diagnoses for people (no Lightning): rich console tables, TensorBoard summaries,
and reading a run's event files back (``optdiag report``).

Submodules load on first use: reading logs back never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
