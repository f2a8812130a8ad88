"""ScheduleAdvisor: learning-rate schedules recommended from the doctor's diagnoses."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from lightning_optdiag._validation import check_int
from lightning_optdiag.callbacks._console import console_for
from lightning_optdiag.callbacks._swap import install_scheduler, unwrap
from lightning_optdiag.schedules import ScheduleRecommendation, recommend_schedules
from lightning_optdiag.signals import warmup_horizon

__all__ = ["ScheduleAdvisor"]


class ScheduleAdvisor(Callback):
    """Recommends a learning-rate schedule when the :class:`TrainingDoctor` diagnoses something a
    schedule addresses, and with ``auto_apply=True`` installs it.

    The mapping from diagnoses to ``torch.optim.lr_scheduler`` schedules, with the reasons, is
    in :mod:`lightning_optdiag.schedules`: warm-up for ``needs_warmup``, a decay for
    ``lr_too_high``, one cycle for ``lr_too_small``, a cyclical rate for ``saddle_point``,
    cosine annealing for ``gradient_noise``, warm restarts for a converged ``plateau``.

    Each recommendation is kept in ``advisor.recommendations``, printed (rank zero), written to
    TensorBoard as the text ``optdiag/schedule`` and to the doctor's ``actions``. Installing
    replaces the schedulers of the optimizer the same way an optimizer switch does: the new
    scheduler starts from the current learning rates (``initial_lr`` reset to them) and is
    stepped every optimizer step (by Lightning under automatic optimization, by the advisor
    under manual optimization, where Lightning leaves schedulers to the module). A later
    recommendation replaces an installed schedule. The
    installed schedule is in the callback's state, rebuilt when a run resumes so that Lightning
    loads the checkpoint's scheduler state into it.

    Args:
        auto_apply: install the recommended schedule, not only recommend it.
        optimizer_index: which of the trainer's optimizers the schedule drives.
        verbose: print recommendations.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: ``optimizer_index`` is negative.

    Example::

        trainer = Trainer(callbacks=[CurvatureMonitor(), TrainingDoctor(), ScheduleAdvisor()])
    """

    def __init__(
        self, auto_apply: bool = False, optimizer_index: int = 0, verbose: bool = True
    ) -> None:
        super().__init__()
        for name, flag in (("auto_apply", auto_apply), ("verbose", verbose)):
            if not isinstance(flag, bool):
                raise TypeError(f"Invalid {name}: {flag!r} (expected a bool)")
        self.auto_apply = auto_apply
        self.verbose = verbose
        self.optimizer_index = check_int("optimizer_index", optimizer_index, minimum=0)
        self.recommendations: list[dict[str, Any]] = []
        self._installed: dict[str, Any] | None = None
        self._seen = 0
        self._doctor: Any = None
        self._scheduler: Any = None
        self._batch_step = -1

    # ------------------------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_optdiag.callbacks.training_doctor import TrainingDoctor, find_callback

        self._doctor = find_callback(trainer, TrainingDoctor)
        if self._doctor is None:
            raise ValueError(
                "ScheduleAdvisor needs a TrainingDoctor on the same Trainer (its diagnoses are "
                "what it answers): add TrainingDoctor() to the callbacks"
            )
        if self.optimizer_index >= len(trainer.optimizers):
            raise ValueError(
                f"Invalid optimizer_index: {self.optimizer_index} (the trainer has "
                f"{len(trainer.optimizers)} optimizer(s))"
            )
        if self._installed is not None:  # resumed: rebuild, Lightning then loads its state
            recommendation = ScheduleRecommendation(**self._installed)
            self._scheduler = install_scheduler(trainer, self.optimizer_index, recommendation.build)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_step = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = trainer.global_step != self._batch_step
        if stepped and self._scheduler is not None and not pl_module.automatic_optimization:
            self._scheduler.step()  # Lightning steps schedulers only under automatic optimization
        self._advise(trainer)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._advise(trainer)

    # ----------------------------------------------------------------------------------- advice
    def _advise(self, trainer: Trainer) -> None:
        doctor = self._doctor
        if doctor is None or len(doctor.diagnoses) == self._seen:
            return
        new = doctor.diagnoses[self._seen :]
        self._seen = len(doctor.diagnoses)
        optimizer = unwrap(trainer.optimizers[self.optimizer_index])
        remaining = int(trainer.estimated_stepping_batches) - trainer.global_step
        found = recommend_schedules(
            [d for d in doctor.diagnoses if d.active],
            remaining_steps=remaining,
            warmup_steps=warmup_horizon(optimizer),
            answer=[d.kind for d in new if d.active],
        )
        for recommendation in found:
            self._recommend(trainer, recommendation)

    def _recommend(self, trainer: Trainer, recommendation: ScheduleRecommendation) -> None:
        step = trainer.global_step
        installed = False
        if self.auto_apply:
            self._scheduler = install_scheduler(trainer, self.optimizer_index, recommendation.build)
            self._installed = asdict(recommendation)
            installed = True
        record = {**asdict(recommendation), "step": step, "installed": installed}
        self.recommendations.append(record)
        verb = "installed" if installed else "recommended"
        message = (
            f"step {step}: {recommendation.schedule} schedule {verb} for "
            f"{recommendation.diagnosis}: {recommendation.reason}"
        )
        self._doctor.record_action(f"schedule_{verb}", step, message, record)
        if not trainer.is_global_zero:
            return
        if self.verbose:
            console_for(trainer).print(f"[bold]optdiag[/bold] · schedule · {message}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("optdiag/schedule", message, step)

    # ---------------------------------------------------------------------------- checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "recommendations": list(self.recommendations),
            "installed": self._installed,
            "seen": self._seen,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recommendations = list(state_dict["recommendations"])
        self._installed = state_dict["installed"]
        self._seen = int(state_dict["seen"])
