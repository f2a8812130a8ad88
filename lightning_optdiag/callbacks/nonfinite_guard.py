"""NonFiniteGuard: catch NaN/inf in the loss, gradients, parameters and optimizer state."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils._pytree import tree_leaves
from typing_extensions import override

from lightning_optdiag._validation import check_choice, check_float, check_int
from lightning_optdiag.callbacks._hub import hub_for, nonfinite_names
from lightning_optdiag.curvature.isolation import isolated_forward
from lightning_optdiag.signals import tensor_norms

__all__ = ["NonFiniteError", "NonFiniteEvent", "NonFiniteGuard"]

PREFIX = "optdiag/nonfinite"

Action = Literal["warn", "skip", "raise"]
ACTIONS = ("warn", "skip", "raise")


class NonFiniteError(RuntimeError):
    """Training produced NaN or infinite values and the guard was told to stop."""


@dataclass
class NonFiniteEvent:
    """One detection of non-finite values.

    Attributes:
        step: ``trainer.global_step`` of the optimizer step concerned.
        kind: what went non-finite: ``"loss"``, ``"gradient"``, ``"parameter"`` or
            ``"optimizer_state"``; ``"scaler"`` when fp16 loss-scale overflows stopped being
            normal (too many in a row, or a collapsed scale).
        parameters: names of the parameters concerned (for ``"loss"``, those whose gradient is
            non-finite as a consequence, if any).
        module: with ``locate=True``, the first module whose forward output was non-finite when
            the batch was replayed (``None`` when not located, or when the forward pass was
            finite and the backward pass produced the values).
        action: what the guard did: ``"warned"``, ``"skipped"`` or ``"raised"``.
        detail: a sentence for humans.
    """

    step: int
    kind: str
    parameters: list[str] = field(default_factory=list)
    module: str | None = None
    action: str = "warned"
    detail: str = ""


class NonFiniteGuard(Callback):
    r"""Detects NaN/inf in the loss, the gradients, the parameters and the optimizer state.

    The loss is checked in ``on_before_backward`` and the gradients in
    ``on_before_optimizer_step`` (accumulated, DDP-synchronised, unscaled, not yet clipped); both
    are read with one fused reduction and one device-to-host transfer per step, shared with
    :class:`GradientMonitor`. Non-finite parameters make the next loss or gradients non-finite,
    so they are looked for when that happens (the event then says ``"parameter"``), and before
    every checkpoint is saved and at the end of training, so a checkpoint never silently carries
    them. The optimizer state is checked every ``check_state_every_n_steps`` (read with the next
    transfer).

    With fp16 mixed precision the ``GradScaler`` skips steps with overflowing gradients and lowers
    its scale: a burst at the start and about one skip per 2000 steps is normal, so these are
    counted in :attr:`scaler_skips`, not reported, until ``max_scaler_skips`` happen in a row or
    the scale falls below ``min_loss_scale``. bf16 has no scaler: non-finite values are failures.

    Under DDP every process takes the same decision: the flag is reduced across processes, so a
    skip never desynchronises them.

    Logged (rank zero, at each event and skipped step): ``optdiag/nonfinite/events`` (events so
    far), ``optdiag/nonfinite/skipped_steps`` and ``optdiag/nonfinite/scaler_skips``, which
    ``optdiag report`` reads back.

    Args:
        action: ``"warn"`` (default) records the event and warns; ``"skip"`` drops the step (the
            gradients are discarded so no parameter or optimizer state changes, and buffers such
            as BatchNorm statistics are put back as they were before the step's forward passes;
            learning-rate schedulers still step); ``"raise"`` stops training with
            :class:`NonFiniteError`.
            Non-finite parameters or optimizer state cannot be undone: with ``"skip"`` they are
            reported like ``"warn"``.
        locate: replay the step's batches through ``training_step`` (with forward hooks, under
            no_grad, logging muted, buffers, modes and RNG isolated) to name the first module
            whose output went non-finite. Only with automatic optimization; side effects of
            ``training_step`` beyond those (appending to a list, counters) happen again. Costs
            nothing on healthy steps.
        lr_backoff: with ``"skip"``, multiply every learning rate of the optimizer by this
            factor after ``backoff_after`` consecutive skips (``None``: never). A scheduler that
            recomputes learning rates from its base values will override it.
        backoff_after: consecutive skips before a back-off.
        max_consecutive_skips: with ``"skip"``, raise :class:`NonFiniteError` after this many
            consecutive skipped steps.
        check_state_every_n_steps: interval of the optimizer-state check.
        max_scaler_skips: consecutive fp16 scaler skips after which they count as a failure.
        min_loss_scale: a ``GradScaler`` scale below this counts as a failure.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range.

    Example::

        from lightning.pytorch import Trainer
        from lightning_optdiag.callbacks import NonFiniteGuard

        guard = NonFiniteGuard(action="skip", locate=True)
        Trainer(callbacks=[guard]).fit(model)
        for event in guard.events:
            print(event.step, event.kind, event.parameters, event.module)
    """

    def __init__(
        self,
        action: Action = "warn",
        locate: bool = False,
        lr_backoff: float | None = None,
        backoff_after: int = 3,
        max_consecutive_skips: int = 20,
        check_state_every_n_steps: int = 50,
        max_scaler_skips: int = 10,
        min_loss_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.action = check_choice("action", action, ACTIONS)
        if not isinstance(locate, bool):
            raise TypeError(f"Invalid locate: {locate!r} (expected a bool)")
        self.locate = locate
        self.lr_backoff = (
            None
            if lr_backoff is None
            else check_float(
                "lr_backoff", lr_backoff, minimum=0.0, maximum=1.0, exclusive_minimum=True
            )
        )
        if self.lr_backoff is not None and action != "skip":
            raise ValueError(
                f"Invalid lr_backoff: {lr_backoff} (only meaningful with action='skip', "
                f"got action={action!r})"
            )
        self.backoff_after = check_int("backoff_after", backoff_after, minimum=1)
        self.max_consecutive_skips = check_int(
            "max_consecutive_skips", max_consecutive_skips, minimum=1
        )
        self.check_state_every_n_steps = check_int(
            "check_state_every_n_steps", check_state_every_n_steps, minimum=1
        )
        self.max_scaler_skips = check_int("max_scaler_skips", max_scaler_skips, minimum=1)
        self.min_loss_scale = check_float("min_loss_scale", min_loss_scale, minimum=0.0)
        self.events: list[NonFiniteEvent] = []
        self.scaler_skips = 0
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._consecutive_scaler_skips = 0
        self._bad_loss_steps: set[int] = set()
        # The micro-batches of the current optimizer step, and (action="skip") a copy of the
        # module's buffers from before them.
        self._batches: list[tuple[Any, int]] = []
        self._batches_step = -1
        self._buffers: list[Tensor] = []
        self._clip_val: Any = None
        # Kinds of failure under way: with action="warn" each is reported when it appears, not
        # on every following step.
        self._active: set[str] = set()

    # ------------------------------------------------------------------------------------ hooks
    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self._batches_step:
            self._batches, self._batches_step = [], trainer.global_step
            if self.action == "skip":
                # A skipped step must not keep what its forward passes wrote into buffers
                # (BatchNorm statistics of a NaN batch): keep a copy to put back, in storage
                # allocated once and refreshed with one fused copy per step.
                buffers = [b.detach() for b in pl_module.buffers()]
                if not buffers:
                    self._buffers = []
                elif [_layout(b) for b in buffers] == [_layout(b) for b in self._buffers]:
                    torch._foreach_copy_(self._buffers, buffers)
                else:
                    self._buffers = [b.clone() for b in buffers]
        self._batches.append((batch, batch_idx))  # references, for locate=True replays

    @override
    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: Tensor
    ) -> None:
        step = trainer.global_step

        def consume(values: np.ndarray) -> None:
            if not math.isfinite(float(values.sum())):  # a NaN or inf anywhere spreads to the sum
                self._bad_loss_steps.add(step)

        hub_for(trainer).defer(loss.detach().float(), consume)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        step = trainer.global_step
        reading = hub_for(trainer).gradient_reading(pl_module, optimizer, step, 2.0)
        self._restore_clipping(trainer)
        local_bad_loss = bad_loss = step in self._bad_loss_steps
        self._bad_loss_steps.clear()  # losses of earlier steps no optimizer step followed are moot
        bad_grads = not math.isfinite(reading.total)
        if trainer.world_size > 1:
            bad_loss, bad_grads = _any_process(trainer, bad_loss, bad_grads)
        scaler = _grad_scaler(trainer)
        if bad_grads and not bad_loss and scaler is not None:
            self._scaler_overflow(trainer, pl_module, scaler, step)
            return
        if scaler is not None:
            self._consecutive_scaler_skips = 0
            self._active.discard("scaler")
        if not (bad_loss or bad_grads):
            self._consecutive_skips = 0
            self._active -= {"loss", "gradient"}
            return
        if self._check_parameters(trainer, pl_module, step - 1):
            # A step from non-finite weights only spreads them: with "skip", drop it too.
            if self.action == "skip":
                self._skip(trainer, pl_module, optimizer, f"non-finite parameters at step {step}")
            return
        names = _confirmed_nonfinite(reading.names, reading.norms, reading.params)
        kind = "loss" if bad_loss else "gradient"
        detail = f"non-finite {kind} at step {step}"
        if bad_loss and not local_bad_loss:
            detail += " (on another process)"
        if names:
            detail += f"; non-finite gradients in {_shorten(names)}"
        elif not bad_loss:
            # Finite gradients whose squared norm overflows: an explosion, about to corrupt weights.
            names = list(nonfinite_names(reading.names, reading.norms))
            detail = (
                f"gradient norm overflow at step {step}: finite gradients beyond float32 range "
                f"in {_shorten(names)}"
            )
        self._fail(trainer, pl_module, optimizer, NonFiniteEvent(step, kind, names, detail=detail))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._restore_clipping(trainer)
        step = trainer.global_step - 1  # the optimizer step that just completed
        if step < 0 or step % self.check_state_every_n_steps:
            return
        # Adam's second moment can overflow to inf while its updates stay finite (and zero):
        # training then stalls silently, so the state is checked on its own.
        state = _state_tensors(trainer.optimizers)
        if state:
            hub_for(trainer).defer(tensor_norms(state).sum(), self._state_consumer(trainer, step))

    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Decide before anything is written: with action="raise" the save is aborted.
        hub_for(trainer).flush()
        self._check_parameters(trainer, pl_module, trainer.global_step - 1)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_clipping(trainer)
        step = trainer.global_step - 1
        state = _state_tensors(trainer.optimizers)
        if state and step % self.check_state_every_n_steps:  # the last step's state, if unchecked
            hub_for(trainer).defer(tensor_norms(state).sum(), self._state_consumer(trainer, step))
        hub_for(trainer).flush()
        self._check_parameters(trainer, pl_module, step)

    # -------------------------------------------------------------------------------- checks
    def _check_parameters(self, trainer: Trainer, pl_module: LightningModule, step: int) -> bool:
        """Report non-finite parameters (they went bad in the update of ``step``)."""
        params = [p.detach() for p in pl_module.parameters() if p.requires_grad]
        if not params or math.isfinite(float(tensor_norms(params).sum())):
            self._active.discard("parameter")
            return False
        bad = [n for n, p in pl_module.named_parameters() if not bool(torch.isfinite(p).all())]
        if not bad:
            return False  # finite values whose squared norm overflowed float32
        detail = f"non-finite parameters after step {step}: {', '.join(bad[:5])}"
        self._report(trainer, NonFiniteEvent(step, "parameter", bad, detail=detail), undoable=False)
        return True

    def _state_consumer(self, trainer: Trainer, step: int) -> Any:
        def consume(values: np.ndarray) -> None:
            if np.all(np.isfinite(values)):
                self._active.discard("optimizer_state")
                return
            bad = _nonfinite_state_owners(trainer)
            if not bad:
                return
            detail = f"non-finite optimizer state after step {step}: {', '.join(bad[:5])}"
            event = NonFiniteEvent(step, "optimizer_state", bad, detail=detail)
            self._report(trainer, event, undoable=False)

        return consume

    def _scaler_overflow(
        self, trainer: Trainer, pl_module: LightningModule, scaler: Any, step: int
    ) -> None:
        self.scaler_skips += 1
        self._consecutive_scaler_skips += 1
        self._log_counts(trainer)
        scale = float(scaler.get_scale())
        # The scaler halves its scale after this step: judge the scale it will fall to.
        next_scale = scale * float(scaler.get_backoff_factor())
        if (
            self._consecutive_scaler_skips < self.max_scaler_skips
            and next_scale >= self.min_loss_scale
        ):
            self._active.discard("scaler")
            return
        detail = (
            f"the fp16 GradScaler skipped {self._consecutive_scaler_skips} steps in a row "
            f"(loss scale {scale:g}); gradients overflow persistently"
        )
        self._report(trainer, NonFiniteEvent(step, "scaler", detail=detail), undoable=False)

    def _fail(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        optimizer: Optimizer,
        event: NonFiniteEvent,
    ) -> None:
        if self.locate:
            event.module = self._locate(trainer, pl_module)
            if event.module is not None:
                event.detail += f"; first non-finite forward output: {event.module}"
            elif event.kind == "loss" and pl_module.automatic_optimization:
                event.detail += "; every module output was finite: the loss computation overflowed"
        if self.action == "skip":
            event.action = "skipped"
            self.events.append(event)
            rank_zero_warn(f"NonFiniteGuard: {event.detail}; step skipped")
            self._skip(trainer, pl_module, optimizer, event.detail)
            return
        self._report(trainer, event, undoable=True)

    def _skip(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer, why: str
    ) -> None:
        """Drop the step: no gradient reaches the optimizer, buffers are put back."""
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None  # optimizers leave parameters without a gradient untouched
        if self._buffers:
            torch._foreach_copy_([b for b in pl_module.buffers()], self._buffers)
        # torch's clip_grad_value_ fails on a list without gradients: no clipping this step.
        if trainer.gradient_clip_val:
            self._clip_val, trainer.gradient_clip_val = trainer.gradient_clip_val, None
        self.skipped_steps += 1
        self._consecutive_skips += 1
        self._log_counts(trainer)
        self._maybe_back_off(optimizer, trainer.global_step)
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteError(
                f"NonFiniteGuard: {self._consecutive_skips} consecutive steps skipped (last: {why})"
            )

    def _restore_clipping(self, trainer: Trainer) -> None:
        if self._clip_val is not None:
            trainer.gradient_clip_val, self._clip_val = self._clip_val, None

    def _report(self, trainer: Trainer, event: NonFiniteEvent, undoable: bool) -> None:
        if event.kind in self._active and self.action != "raise":
            return
        self._active.add(event.kind)
        if self.action == "raise":
            event.action = "raised"
            self.events.append(event)
            self._log_counts(trainer)
            raise NonFiniteError(f"NonFiniteGuard: {event.detail}")
        event.action = "warned"
        self.events.append(event)
        self._log_counts(trainer)
        suffix = "" if undoable or self.action == "warn" else " (cannot be undone by skipping)"
        rank_zero_warn(f"NonFiniteGuard: {event.detail}{suffix}")

    def _log_counts(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {
            f"{PREFIX}/events": float(len(self.events)),
            f"{PREFIX}/skipped_steps": float(self.skipped_steps),
            f"{PREFIX}/scaler_skips": float(self.scaler_skips),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _maybe_back_off(self, optimizer: Optimizer, step: int) -> None:
        if self.lr_backoff is None or self._consecutive_skips % self.backoff_after:
            return
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * self.lr_backoff
        rates = ", ".join(f"{group['lr']:.3g}" for group in optimizer.param_groups)
        rank_zero_warn(
            f"NonFiniteGuard: {self._consecutive_skips} skips in a row at step {step}; "
            f"learning rate lowered to {rates}"
        )

    def _locate(self, trainer: Trainer, pl_module: LightningModule) -> str | None:
        if not self._batches or not pl_module.automatic_optimization:
            return None
        found: list[str] = []

        def hook(name: str) -> Any:
            def record(module: nn.Module, inputs: Any, output: Any) -> None:
                if not found and _has_nonfinite(output):
                    found.append(name or type(pl_module).__name__)

            return record

        handles = [
            module.register_forward_hook(hook(name)) for name, module in pl_module.named_modules()
        ]
        try:
            with (
                isolated_forward(pl_module),
                torch.no_grad(),
                trainer.precision_plugin.forward_context(),
                _muted_logging(pl_module),
            ):
                for batch, batch_idx in self._batches:  # every micro-batch of the step
                    pl_module.training_step(batch, batch_idx)
                    if found:
                        break
        except Exception as error:  # a replay must never take training down
            rank_zero_warn(
                f"NonFiniteGuard: could not replay the batch to locate the module ({error})"
            )
        finally:
            for handle in handles:
                handle.remove()
        return found[0] if found else None

    # ---------------------------------------------------------------------------- checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "events": [asdict(event) for event in self.events],
            "scaler_skips": self.scaler_skips,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self._consecutive_skips,
            "consecutive_scaler_skips": self._consecutive_scaler_skips,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = [NonFiniteEvent(**event) for event in state_dict["events"]]
        self.scaler_skips = state_dict["scaler_skips"]
        self.skipped_steps = state_dict["skipped_steps"]
        self._consecutive_skips = state_dict["consecutive_skips"]
        self._consecutive_scaler_skips = state_dict["consecutive_scaler_skips"]


def _layout(tensor: Tensor) -> tuple[Any, ...]:
    return tensor.shape, tensor.dtype, tensor.device


def _shorten(names: list[str], limit: int = 5) -> str:
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def _any_process(trainer: Trainer, *flags: bool) -> tuple[bool, ...]:
    """Whether each flag is set on any process: one collective, taken by every process at the
    same point of every step, so that all of them branch alike (and none waits forever)."""
    local = torch.tensor([float(flag) for flag in flags], device=trainer.strategy.root_device)
    total = trainer.strategy.reduce(local, reduce_op="sum")
    return tuple(bool(value > 0) for value in total.tolist())


def _grad_scaler(trainer: Trainer) -> Any:
    return getattr(trainer.precision_plugin, "scaler", None)


def _confirmed_nonfinite(
    names: tuple[str, ...], norms: np.ndarray, params: tuple[nn.Parameter, ...]
) -> list[str]:
    """Names among the non-finite-norm candidates whose gradient really holds NaN or inf."""
    candidates = set(nonfinite_names(names, norms))
    return [
        name
        for name, param in zip(names, params, strict=True)
        if name in candidates
        and param.grad is not None
        and not bool(torch.isfinite(param.grad).all())
    ]


def _state_tensors(optimizers: list[Optimizer]) -> list[Tensor]:
    return [
        value
        for optimizer in optimizers
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor) and value.is_floating_point() and value.dim() > 0
    ]


def _nonfinite_state_owners(trainer: Trainer) -> list[str]:
    names = {id(p): n for n, p in trainer.lightning_module.named_parameters()}
    owners = []
    for optimizer in trainer.optimizers:
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if (
                    isinstance(value, Tensor)
                    and value.is_floating_point()
                    and not bool(torch.isfinite(value).all())
                ):
                    owners.append(f"{names.get(id(param), '?')}[{key}]")
    return owners


def _has_nonfinite(output: Any) -> bool:
    return any(
        isinstance(leaf, Tensor)
        and leaf.is_floating_point()
        and not bool(torch.isfinite(leaf).all())
        for leaf in tree_leaves(output)
    )


@contextmanager
def _muted_logging(module: LightningModule) -> Iterator[None]:
    """Turn ``self.log``/``self.log_dict`` into no-ops during a replay."""
    saved = {name: module.__dict__.get(name) for name in ("log", "log_dict")}
    module.__dict__["log"] = lambda *args, **kwargs: None
    module.__dict__["log_dict"] = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del module.__dict__[name]
            else:
                module.__dict__[name] = value
