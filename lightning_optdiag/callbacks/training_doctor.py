"""TrainingDoctor: turns optdiag's signals into diagnoses with evidence and recommendations."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from typing_extensions import override

from lightning_optdiag._validation import check_int
from lightning_optdiag.callbacks._console import console_for
from lightning_optdiag.callbacks._swap import unwrap
from lightning_optdiag.callbacks.curvature_monitor import CurvatureMonitor
from lightning_optdiag.callbacks.gradient_monitor import GradientMonitor
from lightning_optdiag.callbacks.nonfinite_guard import NonFiniteGuard
from lightning_optdiag.diagnosis import (
    KINDS,
    CurvatureObservation,
    Diagnosis,
    Finding,
    Observations,
    Thresholds,
    diagnose,
)
from lightning_optdiag.report import (
    change_panel,
    custom_scalars_layout,
    diagnoses_markdown,
    full_report,
)
from lightning_optdiag.report.record import RECORD_TAG, encode_record
from lightning_optdiag.signals import optimizer_family, trend_test, warmup_horizon

__all__ = ["TrainingDoctor"]

PREFIX = "optdiag"
INITIAL_STEPS = 5  # steps averaged for the initial loss
EARLY_MEDIAN_STEPS = 5  # rolling median of early losses, for the warm-up rule
EARLY_MEDIAN_MIN = 3  # values the rolling median needs (the median of one is no filter)
STICKY = frozenset({"needs_warmup"})  # advice about the start of the run stays valid
# Diagnoses of discrete events, reported at the first evaluation that sees them.
COUNTED_EVENTS = frozenset({"nonfinite", "exploding_gradients"})  # evidence kept current
EVENTS = frozenset({"nonfinite", "exploding_gradients", "vanishing_gradients", "needs_warmup"})


class TrainingDoctor(Callback):
    r"""Diagnoses why training misbehaves, from the signals of the other optdiag callbacks.

    Every ``check_every_n_steps`` optimizer steps and after every validation epoch it gathers
    the training losses of the last ``window`` steps, the validation losses, and whatever the
    other optdiag callbacks on the same Trainer measured (:class:`GradientMonitor`: gradient
    norms, spikes, vanishing layers; :class:`NonFiniteGuard`: NaN/inf events;
    :class:`CurvatureMonitor`: Hessian eigenvalues, the sharpness ratio and the gradient noise
    scale), and applies the rules of :func:`lightning_optdiag.diagnosis.diagnose`. When the loss
    has plateaued and the curvature is stale, it asks the :class:`CurvatureMonitor` for a check
    right away, since a plateau is exactly when the Hessian tells a saddle from a minimum.

    Each diagnosis is a :class:`~lightning_optdiag.diagnosis.Diagnosis` in ``doctor.diagnoses``
    (``kind`` from :data:`~lightning_optdiag.diagnosis.KINDS`, step, severity, confidence,
    evidence, message, recommendation), recorded when it appears and marked with
    ``cleared_step`` when the condition no longer holds, never repeated every step.

    Reports: a compact rich panel after each validation epoch in which something changed and a
    full table at the end of ``fit`` (rank zero), printed through the console of Lightning's
    ``RichProgressBar`` when one is used so that the live display stays intact, and as plain
    text when the output is not a terminal; on TensorBoard a custom-scalars layout grouping
    optdiag's charts, the diagnoses as a Markdown table (``optdiag/diagnoses``) and as a JSON
    record for ``optdiag report`` (``optdiag/doctor/record``), written when they change and at
    the end of ``fit``, and one scalar per kind (``optdiag/diagnosis/<kind>``: 1 while active);
    ``doctor.to_json(path)``. With every evaluation it also logs the training and validation
    losses it judged (``optdiag/loss/train``, ``optdiag/loss/val``) and the first optimizer's
    learning rate (``optdiag/lr``).

    When ``fit`` stops on an exception (``NonFiniteGuard(action="raise")``, an interrupt) the
    doctor judges the run at that point, prints its report and records what stopped it, so that
    ``optdiag report`` can tell a crash from a finished run.

    The training losses are read from the output of ``training_step`` (under manual
    optimization, a returned tensor or ``"loss"``, or the logged metric ``train_loss_key``),
    kept on the device and read back once per check: no extra synchronisation per step. Under
    DDP the losses (and the validation loss) are averaged over the processes at that point, one
    collective per check, so every process reaches the same diagnoses, and callbacks acting on
    them (:class:`OptimizerSwitch`, :class:`ScheduleAdvisor`) act at the same step everywhere.

    With several optimizers, the gradient norms, the learning rate and the warm-up horizon are
    those of the first one (index 0). The rules assume a loss that training should drive down:
    for adversarial set-ups (a GAN's losses hover around an equilibrium by design) the loss-based
    diagnoses (plateau, model bias) do not apply; attach the monitors without the doctor there.

    Args:
        check_every_n_steps: optimizer steps between evaluations; a new NaN/inf event or
            gradient explosion triggers one at once.
        window: how many recent steps the trend test looks at.
        thresholds: the rules' thresholds (:class:`~lightning_optdiag.diagnosis.Thresholds`).
        val_loss_key: the logged validation metric (``None``: no validation-based diagnoses).
        train_loss_key: logged training metric to use when ``training_step`` returns no loss.
        measure_on_plateau: ask the :class:`CurvatureMonitor` for a check on a plateau.
        confirm_checks: evaluations in a row a condition must hold before it is reported, and
            be absent before it clears (events such as NaN or gradient spikes are reported at
            once), so that a quantity at the edge of its threshold does not flap.
        console: print the panels and the final report.
        tensorboard: write the layout, diagnoses text and per-kind scalars to TensorBoard
            loggers.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range.

    Example::

        from lightning.pytorch import Trainer
        from lightning_optdiag.callbacks import (
            CurvatureMonitor, GradientMonitor, NonFiniteGuard, TrainingDoctor,
        )

        doctor = TrainingDoctor()
        trainer = Trainer(
            callbacks=[GradientMonitor(), NonFiniteGuard(), CurvatureMonitor(), doctor]
        )
        trainer.fit(model)
        for diagnosis in doctor.diagnoses:
            print(diagnosis.kind, diagnosis.message, diagnosis.recommendation)
        doctor.to_json("diagnoses.json")
    """

    def __init__(
        self,
        check_every_n_steps: int = 50,
        window: int = 200,
        thresholds: Thresholds | None = None,
        val_loss_key: str | None = "val_loss",
        train_loss_key: str | None = None,
        measure_on_plateau: bool = True,
        confirm_checks: int = 2,
        console: bool = True,
        tensorboard: bool = True,
    ) -> None:
        super().__init__()
        self.check_every_n_steps = check_int("check_every_n_steps", check_every_n_steps, minimum=1)
        self.window = check_int("window", window, minimum=10)
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise TypeError(
                f"Invalid thresholds: {thresholds!r} (expected a lightning_optdiag.diagnosis."
                "Thresholds or None)"
            )
        self.thresholds = thresholds or Thresholds()
        for name, key in (("val_loss_key", val_loss_key), ("train_loss_key", train_loss_key)):
            if key is not None and not isinstance(key, str):
                raise TypeError(f"Invalid {name}: {key!r} (expected a metric name or None)")
        self.val_loss_key = val_loss_key
        self.train_loss_key = train_loss_key
        for name, flag in (
            ("measure_on_plateau", measure_on_plateau),
            ("console", console),
            ("tensorboard", tensorboard),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"Invalid {name}: {flag!r} (expected a bool)")
        self.measure_on_plateau = measure_on_plateau
        self.confirm_checks = check_int("confirm_checks", confirm_checks, minimum=1)
        self._streaks: dict[str, int] = {}
        self._counted: dict[str, int] = {}
        self.console = console
        self.tensorboard = tensorboard
        self.diagnoses: list[Diagnosis] = []
        self.actions: list[dict[str, Any]] = []
        self._active: dict[str, Diagnosis] = {}
        self._unreported: tuple[list[Diagnosis], list[Diagnosis]] = ([], [])
        self._losses: deque[float] = deque(maxlen=self.window)
        self._grad_norms: deque[float] = deque(maxlen=self.window)
        self._pending: list[tuple[int, Tensor]] = []
        self._initial: list[float] = []
        self._early_max: float | None = None
        self._early: deque[float] = deque(maxlen=EARLY_MEDIAN_STEPS)
        self._peak_grad: float | None = None
        self._explosions: list[tuple[int, float]] = []  # (step, ratio to the running median)
        self._lrs: list[float] = []
        self._val_losses: list[float] = []
        self._train_epoch_losses: list[float] = []
        self._epoch_losses: list[float] = []
        self._batch_step = 0
        self._evaluated_step = -1
        self._layout_written = False
        self._text_stale = False
        self._events_seen = 0
        self._stopped: str | None = None
        self._automatic = True
        self._strategy: Any = None
        self._world_size = 1
        self._horizon: int | None = None
        self._monitors: tuple[
            GradientMonitor | None, NonFiniteGuard | None, CurvatureMonitor | None
        ]
        self._monitors = (None, None, None)

    # ------------------------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._monitors = (
            find_callback(trainer, GradientMonitor),
            find_callback(trainer, NonFiniteGuard),
            find_callback(trainer, CurvatureMonitor),
        )
        optimizer = _first_optimizer(trainer)
        self._horizon = warmup_horizon(optimizer) if optimizer is not None else None
        self._automatic = pl_module.automatic_optimization
        self._has_new_events()  # events restored from a checkpoint are not new
        self._stopped = None
        self._strategy = trainer.strategy
        self._world_size = trainer.world_size
        if self.tensorboard and trainer.is_global_zero and not self._layout_written:
            for logger in _tensorboard_loggers(trainer):
                logger.experiment.add_custom_scalars(custom_scalars_layout())
            self._layout_written = True

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_step = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = _loss_of(outputs)
        if loss is None and self.train_loss_key is not None:
            metric = trainer.callback_metrics.get(self.train_loss_key)
            loss = metric if isinstance(metric, Tensor) else None
        if loss is not None:
            self._pending.append((self._batch_step, loss.detach().reshape(())))
        step = trainer.global_step
        if step == self._batch_step:
            return  # no optimizer step yet (gradient accumulation, or a skipped step)
        self._record_step(trainer)
        # Events (NaN/inf, a gradient explosion) are judged at once, not at the next check.
        new_events = self._has_new_events()
        if new_events or step % self.check_every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.val_loss_key is None:
            return
        metric = trainer.callback_metrics.get(self.val_loss_key)
        if metric is None:
            return
        self._flush()
        value = torch.as_tensor(metric, dtype=torch.float32).detach().reshape(1)
        self._val_losses.append(float(self._across_processes(value)[0]))
        recent = self._epoch_losses or list(self._losses)[-10:]
        self._train_epoch_losses.append(sum(recent) / len(recent) if recent else math.nan)
        self._epoch_losses = []
        self.evaluate(trainer, pl_module)
        self._print_changes(trainer)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self._evaluated_step:
            self.evaluate(trainer, pl_module)
        self._conclude(trainer, final=True)

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        # A run that dies (NonFiniteGuard(action="raise"), an interrupt) is when the diagnoses
        # matter most: judge what was seen, and record and report it.
        message = " ".join(str(exception).split())
        name = type(exception).__name__
        self._stopped = f"{name}: {message}" if message else name
        # Evaluating runs a collective under DDP; the other processes may not be here.
        new_events = self._has_new_events()  # e.g. the NaN that made the guard raise
        if self._world_size <= 1 and (new_events or trainer.global_step != self._evaluated_step):
            with contextlib.suppress(Exception):  # never mask the exception that stopped fit
                self.evaluate(trainer, pl_module)
        self._conclude(trainer, final=False)

    def _conclude(self, trainer: Trainer, final: bool) -> None:
        """The last word of a fit, finished or stopped: the record, then the report."""
        self._write_text(trainer, trainer.global_step, final=final)
        if trainer.is_global_zero and self.console:
            report = full_report(self.diagnoses, trainer.global_step, self.actions)
            console_for(trainer).print(report)
        self._unreported = ([], [])

    # ------------------------------------------------------------------------------- evaluating
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> list[Finding]:
        """Apply the rules now; record what appeared and what cleared. Returns the findings."""
        self._flush()
        step = trainer.global_step
        self._evaluated_step = step
        observations = self._observations(trainer, step)
        curvature = self._monitors[2]
        if curvature is not None and self.measure_on_plateau:
            wanted = self._wants_curvature(observations, curvature, step)
            if trainer.strategy.reduce_boolean_decision(wanted, all=False):
                curvature.measure(trainer, pl_module)
                observations = self._observations(trainer, step)
        findings = diagnose(observations, self.thresholds)
        self._update(findings, step, trainer.current_epoch)
        self._log(trainer, step)
        return findings

    def _wants_curvature(
        self, observations: Observations, monitor: CurvatureMonitor, step: int
    ) -> bool:
        if not observations.losses:
            return False
        latest = monitor.latest
        if latest is not None and step - latest.step < self.window // 2:
            return False
        finite = [value for value in observations.losses if math.isfinite(value)]
        if len(finite) < 10:
            return False
        trend = trend_test(finite)
        return not trend.is_improving(
            self.thresholds.plateau_alpha, self.thresholds.plateau_min_decrease
        )

    def _observations(self, trainer: Trainer, step: int) -> Observations:
        gradients, guard, curvature = self._monitors
        th = self.thresholds
        # The trend test needs a full window: a partial one at the start mixes the initial
        # drop with what follows.
        losses = list(self._losses) if len(self._losses) >= self.window else []
        spikes: list[int] = []
        ratio = None
        vanishing: list[str] = []
        recent = [(s, r) for s, r in self._explosions if s > step - th.event_window]
        spikes = [s for s, _ in recent]
        ratio = max((r for _, r in recent), default=None)
        if gradients is not None:
            latest = gradients.latest.get(0)
            vanishing = list(latest.vanishing) if latest is not None else []
        nonfinite: list[int] = []
        detail = ""
        if guard is not None:
            events = [e for e in guard.events if e.step > step - th.event_window]
            nonfinite = [e.step for e in events]
            detail = events[-1].detail if events else ""
        observed_curvature = None
        recent_ratios: list[float] = []
        noise = None
        if curvature is not None:
            latest_check = curvature.latest
            if latest_check is not None and step - latest_check.step <= self.window:
                observed_curvature = CurvatureObservation(
                    step=latest_check.step,
                    lambda_max=latest_check.lambda_max,
                    lambda_min=latest_check.lambda_min,
                    sharpness=latest_check.sharpness,
                    threshold=latest_check.stability_threshold,
                    grad_norm=latest_check.grad_norm,
                )
            recent_ratios = [
                r.sharpness_ratio
                for r in curvature.history
                if r.sharpness_ratio is not None and step - r.step <= self.window
            ][-3:]
            noise = curvature.noise
        optimizer = _first_optimizer(trainer)
        return Observations(
            step=step,
            losses=losses,
            initial_loss=sum(self._initial) / len(self._initial) if self._initial else None,
            grad_norms=list(self._grad_norms),
            peak_grad_norm=self._peak_grad,
            curvature=observed_curvature,
            recent_sharpness_ratios=recent_ratios,
            noise=noise,
            val_losses=list(self._val_losses),
            train_epoch_losses=list(self._train_epoch_losses),
            nonfinite_steps=nonfinite,
            nonfinite_detail=detail,
            spike_steps=spikes,
            spike_ratio=ratio,
            vanishing_layers=vanishing,
            optimizer_family=optimizer_family(optimizer) if optimizer is not None else None,
            warmup_horizon=self._horizon,
            has_warmup=len(self._lrs) > 1 and max(self._lrs) > self._lrs[0] * (1 + 1e-6),
            early_max_loss=self._early_max,
            first_loss=self._initial[0] if self._initial else None,
            active=frozenset(self._active),
        )

    def _update(self, findings: list[Finding], step: int, epoch: int) -> None:
        """Report a state that held at ``confirm_checks`` evaluations in a row, and clear it
        after as many without it (events, such as a NaN, are reported at once)."""
        found = {finding.kind: finding for finding in findings}
        appeared, cleared = self._unreported
        for kind in set(found) | set(self._streaks):
            changed = (kind in found) != (kind in self._active)
            if not changed:
                self._streaks[kind] = 0
            elif self._counted.get(kind) != step:  # one vote per step, however many checks
                self._streaks[kind] = self._streaks.get(kind, 0) + 1
            self._counted[kind] = step
        for kind, finding in found.items():
            needed = 1 if kind in EVENTS else self.confirm_checks
            if kind not in self._active and self._streaks[kind] >= needed:
                diagnosis = Diagnosis.from_finding(finding, step, epoch)
                self.diagnoses.append(diagnosis)
                self._active[kind] = diagnosis
                appeared.append(diagnosis)
                self._text_stale = True
                self._streaks[kind] = 0
        for kind in COUNTED_EVENTS & set(found) & set(self._active):
            # A burst of NaNs or spikes is one diagnosis: keep its count and latest step current
            # as new events come (not as old ones age out of the event window).
            finding, diagnosis = found[kind], self._active[kind]
            if _latest_event(finding.evidence) > _latest_event(diagnosis.evidence):
                diagnosis.message = finding.message
                diagnosis.evidence = dict(finding.evidence)
                diagnosis.confidence = finding.confidence
                self._text_stale = True
        for kind in list(self._active):
            if kind in found or kind in STICKY:
                continue
            needed = 1 if kind in EVENTS else self.confirm_checks
            if self._streaks.get(kind, 0) >= needed:
                diagnosis = self._active.pop(kind)
                diagnosis.cleared_step = step
                cleared.append(diagnosis)
                self._text_stale = True
                self._streaks[kind] = 0

    def record_action(
        self, kind: str, step: int, message: str, details: dict[str, Any] | None = None
    ) -> None:
        """Record something done about the run (an optimizer switch, a schedule installed),
        so that the report, TensorBoard and the JSON file tell it alongside the diagnoses."""
        self.actions.append(
            {"kind": kind, "step": step, "message": message, "details": dict(details or {})}
        )
        self._text_stale = True

    @property
    def active(self) -> list[Diagnosis]:
        """The diagnoses whose condition still holds."""
        return list(self._active.values())

    # -------------------------------------------------------------------------------- recording
    def _record_step(self, trainer: Trainer) -> None:
        """Called once per optimizer step: gradient norm, learning rate."""
        gradients = self._monitors[0]
        if gradients is not None:
            latest = gradients.latest.get(0)
            if latest is not None and latest.step == self._batch_step:
                self._grad_norms.append(latest.total)
                # A spike is an explosion only if it also tops every gradient norm seen before:
                # once the gradients have shrunk near a solution, ten times their median can
                # still be tiny.
                if latest.spike:
                    if self._peak_grad is None or latest.total > self._peak_grad:
                        self._explosions.append((latest.step, latest.total / latest.median_total))
                elif math.isfinite(latest.total):
                    # The peak of ordinary steps: a spike must not make every later gradient
                    # look vanished, nor hide the next spike.
                    self._peak_grad = max(self._peak_grad or 0.0, latest.total)
        optimizer = _first_optimizer(trainer)
        horizon = self._horizon
        if optimizer is not None and horizon is not None and len(self._lrs) < horizon:
            self._lrs.append(float(optimizer.param_groups[0]["lr"]))

    def _has_new_events(self) -> bool:
        """Whether NonFiniteGuard or a gradient explosion added an event since the last call
        (the same on every process: both come from synchronised gradients and flags)."""
        guard = self._monitors[1]
        count = len(self._explosions) + (len(guard.events) if guard is not None else 0)
        new = count > self._events_seen
        self._events_seen = count
        return new

    def _across_processes(self, values: Tensor) -> Tensor:
        """The mean over data-parallel processes (one collective), so that every process sees
        the same losses, reaches the same diagnoses and takes the same decisions (a switch, a
        schedule) at the same step."""
        strategy = self._strategy
        if strategy is None or self._world_size <= 1:
            return values
        device = strategy.root_device
        return strategy.reduce(values.to(device), reduce_op="mean").detach()

    def _flush(self) -> None:
        """Read the pending losses back (one transfer) and fold micro-batches into steps."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        stacked = torch.stack([loss.float() for _, loss in pending])
        values = self._across_processes(stacked).cpu().tolist()
        per_step: dict[int, list[float]] = {}
        for (step, _), value in zip(pending, values, strict=True):
            per_step.setdefault(step, []).append(value)
        for step in sorted(per_step):
            parts = per_step[step]
            # Lightning divides each micro-batch loss by the accumulation count: the sum is the
            # step's mean loss. Manual optimization returns losses as they are.
            loss = sum(parts) if self._automatic else sum(parts) / len(parts)
            self._losses.append(loss)
            self._epoch_losses.append(loss)
            if len(self._initial) < INITIAL_STEPS and math.isfinite(loss):
                self._initial.append(loss)
            horizon = self._horizon
            if horizon is not None and step <= horizon and math.isfinite(loss):
                # A rolling median, so that one outlier batch is not mistaken for instability.
                self._early.append(loss)
                if len(self._early) >= EARLY_MEDIAN_MIN:
                    level = statistics.median(self._early)
                    self._early_max = max(self._early_max or level, level)

    # ---------------------------------------------------------------------------------- output
    def _log(self, trainer: Trainer, step: int) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {f"{PREFIX}/diagnosis/{kind}": float(kind in self._active) for kind in KINDS}
        if self._losses:
            metrics[f"{PREFIX}/loss/train"] = self._losses[-1]
        if self._val_losses:
            metrics[f"{PREFIX}/loss/val"] = self._val_losses[-1]
        optimizer = _first_optimizer(trainer)
        if optimizer is not None:
            metrics[f"{PREFIX}/lr"] = float(optimizer.param_groups[0]["lr"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self._text_stale:
            self._write_text(trainer, step)

    def _write_text(self, trainer: Trainer, step: int, final: bool = False) -> None:
        """The Markdown table for people and the record for ``optdiag report``: written when
        something changed, and at the end of fit (so that even a healthy run says so) or when it
        stops on an exception."""
        if not (self.tensorboard and trainer.is_global_zero):
            return
        self._text_stale = False
        text = diagnoses_markdown(self.diagnoses, self.actions)
        record = encode_record(
            self.diagnoses, self.actions, step, final=final, stopped=self._stopped
        )
        for logger in _tensorboard_loggers(trainer):
            logger.experiment.add_text(f"{PREFIX}/diagnoses", text, step)
            logger.experiment.add_text(RECORD_TAG, record, step)

    def _print_changes(self, trainer: Trainer) -> None:
        appeared, cleared = self._unreported
        if (appeared or cleared) and trainer.is_global_zero and self.console:
            panel = change_panel(appeared, cleared, trainer.global_step, trainer.current_epoch)
            console_for(trainer).print(panel)
        self._unreported = ([], [])

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the diagnoses, the vocabulary and the thresholds to ``path`` as JSON."""
        record = {
            "diagnoses": [diagnosis.to_dict() for diagnosis in self.diagnoses],
            "active": sorted(self._active),
            "actions": self.actions,
            "vocabulary": KINDS,
            "thresholds": asdict(self.thresholds),
        }
        Path(path).write_text(json.dumps(record, indent=2, allow_nan=False))

    # ---------------------------------------------------------------------------- checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {
            "diagnoses": [d.to_dict() for d in self.diagnoses],
            "active": [self.diagnoses.index(d) for d in self._active.values()],
            "actions": list(self.actions),
            "losses": list(self._losses),
            "grad_norms": list(self._grad_norms),
            "initial": list(self._initial),
            "early_max": self._early_max,
            "peak_grad": self._peak_grad,
            "explosions": [list(item) for item in self._explosions],
            "lrs": list(self._lrs),
            "val_losses": list(self._val_losses),
            "train_epoch_losses": list(self._train_epoch_losses),
            "streaks": dict(self._streaks),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diagnoses = [Diagnosis.from_dict(d) for d in state_dict["diagnoses"]]
        self._active = {self.diagnoses[i].kind: self.diagnoses[i] for i in state_dict["active"]}
        self.actions = list(state_dict.get("actions", []))
        self._losses = deque(state_dict["losses"], maxlen=self.window)
        self._grad_norms = deque(state_dict["grad_norms"], maxlen=self.window)
        self._initial = list(state_dict["initial"])
        self._early_max = state_dict["early_max"]
        self._peak_grad = state_dict["peak_grad"]
        self._explosions = [(int(s), float(r)) for s, r in state_dict.get("explosions", [])]
        self._lrs = list(state_dict["lrs"])
        self._val_losses = list(state_dict["val_losses"])
        self._train_epoch_losses = list(state_dict["train_epoch_losses"])
        self._streaks = {str(k): int(v) for k, v in state_dict.get("streaks", {}).items()}


# ----------------------------------------------------------------------------------- helpers
def find_callback(trainer: Trainer, kind: type[Any]) -> Any:
    """The first callback of type ``kind`` on ``trainer`` (``None`` if there is none)."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, kind):
            return callback
    return None


def _latest_event(evidence: dict[str, Any]) -> int:
    steps = evidence.get("steps") or [-1]
    return max(steps)


def _loss_of(outputs: Any) -> Tensor | None:
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), Tensor):
        return outputs["loss"]
    return None


def _first_optimizer(trainer: Trainer) -> torch.optim.Optimizer | None:
    if not trainer.optimizers:
        return None
    return unwrap(trainer.optimizers[0])


def _tensorboard_loggers(trainer: Trainer) -> list[TensorBoardLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
