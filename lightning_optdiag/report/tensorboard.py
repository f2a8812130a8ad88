"""Diagnoses and curvature for TensorBoard: a custom-scalars layout, text and histograms.

The functions take a ``torch.utils.tensorboard.SummaryWriter`` (what Lightning's
``TensorBoardLogger.experiment`` is), so nothing here depends on Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_optdiag.curvature import SpectralDensity
from lightning_optdiag.diagnosis import Diagnosis

__all__ = ["custom_scalars_layout", "diagnoses_markdown", "write_density_histogram"]


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """The layout grouping optdiag's scalars into charts (``SummaryWriter.add_custom_scalars``)."""
    return {
        "optdiag: gradients": {
            "total gradient norm": ["Multiline", [r"optdiag/grad_norm/total.*"]],
            "gradient norm per layer": ["Multiline", [r"optdiag/grad_norm/(?!total).*"]],
            "update / weight ratio": ["Multiline", [r"optdiag/update_ratio/.*"]],
        },
        "optdiag: curvature": {
            "extreme eigenvalues": [
                "Multiline",
                [r"optdiag/hessian/lambda_max", r"optdiag/hessian/lambda_min"],
            ],
            "sharpness vs stability threshold": [
                "Multiline",
                [r"optdiag/hessian/sharpness$", r"optdiag/hessian/stability_threshold"],
            ],
            "sharpness ratio (1 = edge of stability)": [
                "Multiline",
                [r"optdiag/hessian/sharpness_ratio"],
            ],
            "trace and noise scale": [
                "Multiline",
                [r"optdiag/hessian/trace", r"optdiag/hessian/noise_scale"],
            ],
        },
        "optdiag: doctor": {
            "losses": ["Multiline", [r"optdiag/loss/.*"]],
            "active diagnoses": ["Multiline", [r"optdiag/diagnosis/.*"]],
        },
    }


def diagnoses_markdown(
    diagnoses: Sequence[Diagnosis], actions: Sequence[Mapping[str, Any]] = ()
) -> str:
    """A Markdown table of ``diagnoses`` (TensorBoard's text plugin renders Markdown), then
    the actions taken, one line each."""
    taken = "".join(f"\n\n- {action['message']}" for action in actions)
    if not diagnoses:
        return "No problems diagnosed." + taken
    rows = [
        "| diagnosis | steps | severity | confidence | finding | recommendation |",
        "|---|---|---|---|---|---|",
    ]
    for d in diagnoses:
        steps = d.span
        cells = [d.kind, steps, d.severity, f"{d.confidence:.2f}", d.message, d.recommendation]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + taken


def write_density_histogram(
    writer: Any, tag: str, density: SpectralDensity, step: int, num_points: int = 64
) -> None:
    """Write the smoothed spectral density as a TensorBoard histogram of eigenvalue counts."""
    points, values = density.grid(num_points=num_points)
    edges = points.numpy()
    widths = np.diff(edges, prepend=edges[0] - (edges[1] - edges[0]))
    counts = values.numpy() * widths * density.size  # expected eigenvalues per bucket
    writer.add_histogram_raw(
        tag,
        min=float(edges[0]),
        max=float(edges[-1]),
        num=float(density.size),
        sum=density.moment(1) * density.size,
        sum_squares=density.moment(2) * density.size,
        bucket_limits=edges.tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
    )
