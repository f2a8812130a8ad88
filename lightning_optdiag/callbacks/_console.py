"""Where optdiag's callbacks print: Lightning's rich console when it has one."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar
from rich.console import Console

__all__ = ["console_for"]


def console_for(trainer: Trainer) -> Console:
    """The console of Lightning's RichProgressBar when there is one (so that the live display
    is redrawn around what is printed), else a console of our own (plain text when the output
    is not a terminal)."""
    progress = trainer.progress_bar_callback
    if isinstance(progress, RichProgressBar):
        console = getattr(progress, "_console", None)
        if isinstance(console, Console):
            return console
    return Console()
