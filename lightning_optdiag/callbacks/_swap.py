"""Replacing an optimizer, or installing a scheduler, in a running Lightning Trainer.

What must change for the Trainer to really use a new optimizer (field guide section 8):

- ``trainer.strategy.optimizers``: assigning the list re-wraps every optimizer in a fresh
  ``LightningOptimizer`` (the module's ``self.optimizers()`` returns those wrappers);
- every scheduler in ``trainer.strategy.lr_scheduler_configs`` that drove the old optimizer is
  re-bound to the new one: its ``optimizer``, its ``base_lrs`` and the new groups'
  ``initial_lr`` (so that no ``initial_lr`` of the old optimizer is left behind), keeping its
  position in the schedule: the new learning rate is what the caller asked for, and the base
  learning rate is scaled by the same factor as the old one was at that point.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import wraps
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.types import LRSchedulerConfig

__all__ = ["install_scheduler", "replace_optimizer", "unwrap"]


def unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind a ``LightningOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "_optimizer", optimizer)


def replace_optimizer(trainer: Trainer, index: int, new: torch.optim.Optimizer) -> None:
    """Make ``new`` the trainer's optimizer number ``index``, schedulers included.

    ``new`` must have as many parameter groups as the optimizer it replaces (one scheduler
    value per group is carried over); its learning rates are the ones to use from now on.
    """
    optimizers = [unwrap(optimizer) for optimizer in trainer.strategy.optimizers]
    old = optimizers[index]
    if len(new.param_groups) != len(old.param_groups):
        raise ValueError(
            f"Invalid optimizer: {len(new.param_groups)} parameter groups (expected "
            f"{len(old.param_groups)}, as the optimizer it replaces)"
        )
    for config in trainer.strategy.lr_scheduler_configs:
        if config.scheduler.optimizer is old:
            _rebind(config.scheduler, old, new)
    optimizers[index] = new
    trainer.strategy.optimizers = optimizers  # fresh LightningOptimizer wrappers


def install_scheduler(
    trainer: Trainer,
    index: int,
    build: Callable[[torch.optim.Optimizer], Any],
    interval: str = "step",
    frequency: int = 1,
    monitor: str | None = None,
) -> Any:
    """Replace the schedulers of optimizer ``index`` by ``build(optimizer)``, stepped every
    ``frequency`` ``interval`` (``"step"`` or ``"epoch"``); returns the new scheduler.

    The current learning rates are the schedule's base: ``initial_lr`` is reset to them first,
    so a scheduler built mid-run starts from where training is, not from a stale start value.
    """
    optimizer = unwrap(trainer.strategy.optimizers[index])
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    scheduler = build(optimizer)
    keep = [
        c for c in trainer.strategy.lr_scheduler_configs if c.scheduler.optimizer is not optimizer
    ]
    reduce_on_plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    config = LRSchedulerConfig(
        scheduler,
        interval=interval,
        frequency=frequency,
        monitor=monitor,
        reduce_on_plateau=reduce_on_plateau,
        strict=True,
    )
    trainer.strategy.lr_scheduler_configs = [*keep, config]
    return scheduler


def _rebind(scheduler: Any, old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Point ``scheduler`` at ``new``, at the same position of its schedule."""
    base_lrs = getattr(scheduler, "base_lrs", None)
    for position, (old_group, new_group) in enumerate(
        zip(old.param_groups, new.param_groups, strict=True)
    ):
        if base_lrs is not None and old_group["lr"]:
            # Where the schedule stands, as a factor of its base: keep it for the new lr.
            factor = float(old_group["lr"]) / float(base_lrs[position])
            base = float(new_group["lr"]) / factor if factor else float(new_group["lr"])
        else:
            base = float(new_group["lr"])
        if base_lrs is not None:
            new_group["initial_lr"] = base
            base_lrs[position] = base
        else:  # no base of its own (ReduceLROnPlateau): leave any other scheduler's in place
            new_group.setdefault("initial_lr", base)
    scheduler.optimizer = new
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [group["lr"] for group in new.param_groups]
    _track_steps(new)


def _track_steps(optimizer: torch.optim.Optimizer) -> None:
    """Mark ``optimizer.step`` as torch's schedulers do, so that their check that the
    optimizer stepped before the scheduler keeps working on the new optimizer."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    owner = weakref.ref(optimizer)
    function = optimizer.step.__func__  # type: ignore[attr-defined]

    @wraps(function)
    def step(*args: Any, **kwargs: Any) -> Any:
        instance = owner()
        instance._opt_called = True  # type: ignore[union-attr]
        return function.__get__(instance, instance.__class__)(*args, **kwargs)

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = step  # type: ignore[method-assign]
