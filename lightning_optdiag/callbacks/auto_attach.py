"""AutoAttach: adds optdiag's monitoring callbacks to a Trainer that lacks them."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_optdiag.callbacks.curvature_monitor import CurvatureMonitor
from lightning_optdiag.callbacks.gradient_monitor import GradientMonitor
from lightning_optdiag.callbacks.nonfinite_guard import NonFiniteGuard
from lightning_optdiag.callbacks.training_doctor import TrainingDoctor

__all__ = ["AutoAttach"]

_CLASSES: dict[str, type[Callback]] = {
    "GradientMonitor": GradientMonitor,
    "NonFiniteGuard": NonFiniteGuard,
    "CurvatureMonitor": CurvatureMonitor,
    "TrainingDoctor": TrainingDoctor,
}


class AutoAttach(Callback):
    """Attaches optdiag's monitoring callbacks, with their defaults, when the Trainer sets up.

    Created by the opt-in entry point :func:`lightning_optdiag.autoattach.callbacks_factory`
    (environment variable ``OPTDIAG_CALLBACKS``), rarely by hand. At ``setup`` it replaces itself
    in ``trainer.callbacks`` with the selected callbacks the Trainer does not have yet, so a
    callback the user configured is never duplicated, and runs their ``setup``. Checkpoints are
    restored after ``setup``, so the attached callbacks resume their state like any other.
    CurvatureMonitor is left out under manual optimization, where it needs a ``loss_fn``.

    Args:
        names: class names from ``GradientMonitor``, ``NonFiniteGuard``, ``CurvatureMonitor``
            and ``TrainingDoctor``.

    Raises:
        ValueError: a name is not one of those.

    Example::

        # in the shell: OPTDIAG_CALLBACKS=1 python train.py
        # or in code, equivalently:
        trainer = Trainer(callbacks=[AutoAttach(["GradientMonitor", "TrainingDoctor"])])
    """

    def __init__(self, names: Sequence[str]) -> None:
        if isinstance(names, str):
            names = [names]
        unknown = [name for name in names if name not in _CLASSES]
        if unknown:
            raise ValueError(f"Invalid names: {unknown!r} (expected some of {', '.join(_CLASSES)})")
        self.names = tuple(names)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        attached: list[Callback] = []
        skipped: list[str] = []
        for name in self.names:
            cls = _CLASSES[name]
            if any(isinstance(callback, cls) for callback in trainer.callbacks):  # type: ignore[attr-defined]
                continue
            if cls is CurvatureMonitor and not pl_module.automatic_optimization:
                skipped.append(f"{name} (manual optimization: it needs an explicit loss_fn)")
                continue
            attached.append(cls())
        # Rebind rather than mutate: Lightning is iterating over the current list right now.
        current = list(trainer.callbacks)  # type: ignore[attr-defined]
        index = current.index(self) if self in current else len(current)
        trainer.callbacks = current[:index] + attached + current[index + 1 :]  # type: ignore[attr-defined]
        for callback in attached:
            callback.setup(trainer, pl_module, stage)
        if attached:
            names = ", ".join(type(callback).__name__ for callback in attached)
            rank_zero_info(f"optdiag: attached {names} (OPTDIAG_CALLBACKS)")
        if skipped:
            rank_zero_info(f"optdiag: not attached: {'; '.join(skipped)}")
