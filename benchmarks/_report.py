"""Reporting shared by the benchmark scripts: result tables for the console and for
``docs/benchmarks.md``, verdicts on the issues' targets, and rewriting one docs section."""

from __future__ import annotations

import re
import subprocess
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table
from rich.text import Text

ROOT = Path(__file__).resolve().parents[1]
DOCS_PATH = ROOT / "docs" / "benchmarks.md"


@dataclass
class Report:
    """One table of results, rendered both with rich and as Markdown."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass(frozen=True)
class Verdict:
    """Whether one target of the issue is met, with the numbers behind it."""

    target: str
    met: bool | None  # None: the measurement cannot tell
    detail: str


def rich_table(report: Report) -> Table:
    caption = Text(report.note) if report.note else None
    table = Table(title=report.title, caption=caption, caption_justify="left")
    for header in report.headers:
        table.add_column(Text(header), overflow="fold")
    for row in report.rows:
        table.add_row(*(Text(cell) for cell in row))
    return table


def wrap(text: str, first: str = "", rest: str = "") -> str:
    """Markdown prose wrapped at 100 columns like the rest of the docs (code spans may break)."""
    return textwrap.fill(
        text,
        width=100,
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=False,
        break_on_hyphens=False,
    )


def markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def markdown_table(report: Report) -> str:
    lines = [f"### {report.title}", ""]
    lines.append(markdown_row(report.headers))
    lines.append("|" + "|".join("---" for _ in report.headers) + "|")
    lines += [markdown_row(row) for row in report.rows]
    if report.note:
        lines += ["", wrap(report.note)]
    return "\n".join(lines)


def status(verdict: Verdict) -> str:
    return {True: "Met", False: "Missed", None: "Unresolved"}[verdict.met]


def verdict_line(verdict: Verdict) -> str:
    return f"{status(verdict).upper()}: {verdict.target}. {verdict.detail}"


def library_revision(paths: Sequence[str]) -> str:
    """Short commit of the checkout, marked when ``paths`` have local changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *paths],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (commit or "unknown") + (" with local changes" if dirty else "")


def replace_section(text: str, heading: str, body: str) -> str:
    """Replace the body of ``heading`` (up to the next ``## `` heading), or append the section."""
    section = f"{heading}\n\n{body.strip()}\n\n"
    match = re.compile(rf"^{re.escape(heading)}[ \t]*$", re.MULTILINE).search(text)
    if match is None:
        return text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    following = text.find("\n## ", match.end())
    rest = "" if following == -1 else text[following + 1 :]
    return text[: match.start()] + section + rest


def update_docs(heading: str, body: str) -> None:
    text = DOCS_PATH.read_text(encoding="utf-8")  # re-read: other sections change concurrently
    DOCS_PATH.write_text(replace_section(text, heading, body), encoding="utf-8")
