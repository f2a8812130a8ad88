"""Diagnoses as rich renderables: a table, a compact change panel and the full report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from lightning_optdiag.diagnosis import Diagnosis

__all__ = ["change_panel", "diagnosis_table", "full_report"]

_STYLES = {"info": "cyan", "warning": "yellow", "error": "bold red"}


def diagnosis_table(diagnoses: Sequence[Diagnosis], title: str | None = None) -> Table:
    """One row per diagnosis: kind, steps, severity, confidence, finding and recommendation."""
    table = Table(title=title, show_lines=True, expand=False)
    table.add_column("diagnosis", no_wrap=True)
    table.add_column("steps", no_wrap=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("conf.", justify="right", no_wrap=True)
    table.add_column("evidence", ratio=3)
    table.add_column("recommendation", ratio=3)
    for diagnosis in diagnoses:
        steps = diagnosis.span
        table.add_row(
            Text(diagnosis.kind, style="bold"),
            steps,
            Text(diagnosis.severity, style=_STYLES.get(diagnosis.severity, "")),
            f"{diagnosis.confidence:.2f}",
            diagnosis.message,
            diagnosis.recommendation,
        )
    return table


def change_panel(
    appeared: Sequence[Diagnosis], cleared: Sequence[Diagnosis], step: int, epoch: int
) -> Panel:
    """A compact panel of what changed since the last one (for the end of validation epochs)."""
    lines = Text()
    for diagnosis in appeared:
        lines.append("+ ", style=_STYLES.get(diagnosis.severity, ""))
        lines.append(diagnosis.kind, style="bold")
        # The panel comes at the end of a validation epoch; the diagnosis has its own step.
        lines.append(f" (step {diagnosis.step}): {diagnosis.message}\n")
    for diagnosis in cleared:
        lines.append("- ", style="green")
        lines.append(f"{diagnosis.kind} cleared", style="bold")
        lines.append(f" at step {diagnosis.cleared_step} ({diagnosis.span})\n")
    lines.rstrip()
    return Panel(lines, title=f"optdiag · epoch {epoch} · step {step}", expand=False)


def full_report(
    diagnoses: Sequence[Diagnosis], step: int, actions: Sequence[Mapping[str, Any]] = ()
) -> RenderableType:
    """The end-of-training report: every diagnosis of the run, active ones first, each as a
    heading line (kind, steps, severity, confidence), its finding and its recommendation; then
    the actions taken (optimizer switches, schedules installed)."""
    title = f"optdiag report · step {step}"
    taken = [Text(f"↻ {action['message']}", style="magenta") for action in actions]
    if not diagnoses:
        return Panel(
            Group(Text("No problems diagnosed.", style="green"), *taken), title=title, expand=False
        )
    ordered = sorted(diagnoses, key=lambda d: (not d.active, d.step))
    active = sum(d.active for d in diagnoses)
    count = f"{len(diagnoses)} diagnos{'is' if len(diagnoses) == 1 else 'es'}, {active} active"
    parts: list[RenderableType] = []
    for diagnosis in ordered:
        heading = Text()
        heading.append("● " if diagnosis.active else "○ ", style=_STYLES[diagnosis.severity])
        heading.append(diagnosis.kind, style="bold")
        steps = diagnosis.span
        heading.append(f"  {steps}  ")
        heading.append(diagnosis.severity, style=_STYLES[diagnosis.severity])
        heading.append(f"  confidence {diagnosis.confidence:.2f}")
        body = Text(f"  {diagnosis.message}\n  → {diagnosis.recommendation}")
        parts.extend([heading, body])
    return Panel(Group(*parts, *taken), title=title, subtitle=count, expand=False)
