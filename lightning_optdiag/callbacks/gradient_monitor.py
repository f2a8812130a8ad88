"""GradientMonitor: gradient, parameter and update norms per layer, spikes and vanishing layers."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_optdiag._validation import check_float, check_int
from lightning_optdiag.callbacks._hub import GradientReading, hub_for, layer_of
from lightning_optdiag.signals import RunningMedian, tensor_norms

__all__ = ["GradientEvent", "GradientMonitor", "GradientStats"]

PREFIX = "optdiag"


@dataclass
class GradientStats:
    """The latest measurements of one optimizer, kept for other callbacks to read.

    Attributes:
        step: ``trainer.global_step`` when the gradients were measured.
        optimizer_index: which of the trainer's optimizers.
        total: norm of all gradients of that optimizer together.
        layers: gradient norm per layer (module, or parameter with ``per_parameter=True``).
        median_total: running median of ``total`` over the spike window, before this step.
        spike: whether ``total`` exceeded ``spike_factor`` times that median.
        vanishing: layers whose gradient norm fell below ``vanishing_ratio`` times the median
            layer norm.
        update_ratios: ``||delta theta|| / ||theta||`` per layer across the latest measured
            optimizer step (measured on logging steps only, read with the following step;
            ``None`` before the first).
        param_norms: parameter norm per layer at the same time as ``update_ratios``.
    """

    step: int
    optimizer_index: int
    total: float
    layers: dict[str, float]
    median_total: float
    spike: bool
    vanishing: list[str]
    update_ratios: dict[str, float] | None = None
    param_norms: dict[str, float] | None = None


@dataclass
class GradientEvent:
    """A gradient anomaly: a spike, or a change in the set of vanishing layers.

    Attributes:
        kind: ``"spike"``, ``"vanishing"`` (layers started vanishing) or ``"vanishing_cleared"``.
        step: ``trainer.global_step`` at the event.
        optimizer_index: which optimizer's gradients.
        value: the total norm (spike) or the smallest layer norm involved (vanishing).
        reference: the running median (spike) or the median layer norm (vanishing).
        layers: the layers concerned.
    """

    kind: str
    step: int
    optimizer_index: int
    value: float
    reference: float
    layers: list[str] = field(default_factory=list)


class GradientMonitor(Callback):
    r"""Monitors gradient norms per layer, spikes, vanishing layers and update-to-weight ratios.

    Gradients are measured in ``on_before_optimizer_step``: at that point they are accumulated
    over micro-batches, synchronised across DDP processes, unscaled by the AMP ``GradScaler``, and
    not yet clipped, so the numbers are the true gradients of the step (``on_after_backward``
    would see scaled, per-micro-batch, per-process values).

    Every optimizer step costs one fused reduction (``torch._foreach_norm``) and one
    device-to-host transfer, shared with :class:`NonFiniteGuard` when both are attached: the total
    and per-layer norms are computed on every step, for spike and vanishing detection, and written
    to the loggers every ``log_every_n_steps``. On logging steps the parameters are also copied
    before the optimizer step to measure ``||delta theta|| / ||theta||`` per layer (a healthy ratio
    is often around ``1e-3``); those norms are read with the next step's transfer.

    Logged keys (``<layer>`` is a module name such as ``encoder.0``, or a parameter name with
    ``per_parameter=True``; with several optimizers ``total`` becomes ``total_optimizer<i>``):
    ``optdiag/grad_norm/total``, ``optdiag/grad_norm/<layer>``, ``optdiag/param_norm/<layer>``,
    ``optdiag/update_ratio/<layer>``; histograms ``optdiag/grad/<param>`` and
    ``optdiag/weight/<param>`` every ``histogram_every_n_steps`` on TensorBoard loggers.

    Args:
        log_every_n_steps: logging interval in optimizer steps; ``None`` uses the Trainer's.
        per_parameter: one value per parameter tensor instead of one per module.
        layer_filter: regular expression; only layers whose name matches it (``re.search``) are
            logged and checked for vanishing (the total always covers every parameter).
        norm_type: order of the norms (``2.0``, or ``float("inf")``).
        spike_factor: a total norm above ``spike_factor`` times the running median is a spike.
        spike_window: how many recent steps the running median covers.
        min_history: steps of history needed before spikes are flagged.
        vanishing_ratio: a layer whose norm is below this fraction of the median layer norm is
            vanishing.
        vanishing_patience: consecutive steps below (above) the threshold before a layer is
            flagged (cleared).
        histogram_every_n_steps: interval of gradient and weight histograms (TensorBoard only);
            ``None`` (default) disables them.
        update_ratio: measure ``||delta theta|| / ||theta||`` on logging steps; it needs a copy
            of the parameters across the optimizer step (set ``False`` to save that memory).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range or ``layer_filter`` is not a valid expression.

    Example::

        from lightning.pytorch import Trainer
        from lightning_optdiag.callbacks import GradientMonitor

        monitor = GradientMonitor(log_every_n_steps=10)
        trainer = Trainer(callbacks=[monitor])
        trainer.fit(model)
        print(monitor.latest[0].total, monitor.events)
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        per_parameter: bool = False,
        layer_filter: str | None = None,
        norm_type: float = 2.0,
        spike_factor: float = 10.0,
        spike_window: int = 100,
        min_history: int = 10,
        vanishing_ratio: float = 1e-3,
        vanishing_patience: int = 5,
        histogram_every_n_steps: int | None = None,
        update_ratio: bool = True,
    ) -> None:
        super().__init__()
        if log_every_n_steps is not None:
            check_int("log_every_n_steps", log_every_n_steps, minimum=1)
        if not isinstance(per_parameter, bool):
            raise TypeError(f"Invalid per_parameter: {per_parameter!r} (expected a bool)")
        self._filter = _compile_filter(layer_filter)
        self.log_every_n_steps = log_every_n_steps
        self.per_parameter = per_parameter
        self.layer_filter = layer_filter
        self.norm_type = _check_norm_type(norm_type)
        self.spike_factor = check_float(
            "spike_factor", spike_factor, minimum=1.0, exclusive_minimum=True
        )
        self.spike_window = check_int("spike_window", spike_window, minimum=3)
        self.min_history = check_int("min_history", min_history, minimum=1, maximum=spike_window)
        self.vanishing_ratio = check_float(
            "vanishing_ratio", vanishing_ratio, minimum=0.0, maximum=1.0, exclusive_minimum=True
        )
        self.vanishing_patience = check_int("vanishing_patience", vanishing_patience, minimum=1)
        if histogram_every_n_steps is not None:
            check_int("histogram_every_n_steps", histogram_every_n_steps, minimum=1)
        self.histogram_every_n_steps = histogram_every_n_steps
        if not isinstance(update_ratio, bool):
            raise TypeError(f"Invalid update_ratio: {update_ratio!r} (expected a bool)")
        self.update_ratio = update_ratio
        self.latest: dict[int, GradientStats] = {}
        self.events: list[GradientEvent] = []
        self._medians: dict[int, RunningMedian] = {}
        self._vanishing: dict[int, set[str]] = {}
        self._streaks: dict[int, dict[str, int]] = {}
        self._snapshots: dict[int, tuple[int, tuple[str, ...], list[Tensor]]] = {}
        self._groupings: dict[tuple[str, ...], tuple[tuple[str, ...], np.ndarray]] = {}
        self._counts: dict[int, int] = {}

    # ------------------------------------------------------------------------------------ hooks
    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        index = _optimizer_index(trainer, optimizer)
        step = trainer.global_step
        previous = self.latest.get(index)
        if previous is not None and previous.step == step:
            return  # a closure re-evaluated within one step (LBFGS): measured already
        reading = hub_for(trainer).gradient_reading(pl_module, optimizer, step, self.norm_type)
        stats = self._analyse(reading, index, previous)
        self.latest[index] = stats
        # Each optimizer counts its own steps: with manual optimization several optimizers share
        # global_step, and a common interval could always fall on the same one.
        count = self._counts.get(index, 0)
        self._counts[index] = count + 1
        if count % self._interval(trainer) == 0:
            self._log(trainer, self._metrics(stats, len(trainer.optimizers)), step)
            if self.update_ratio:
                self._snapshots[index] = (
                    step,
                    reading.names,
                    [param.detach().clone() for param in reading.params],
                )
        if self.histogram_every_n_steps and count % self.histogram_every_n_steps == 0:
            self._histograms(trainer, reading, step)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._snapshots:
            return
        snapshots, self._snapshots = self._snapshots, {}
        hub = hub_for(trainer)
        for index, (step, names, before) in snapshots.items():
            params = _params_by_name(pl_module, names)
            deltas = torch._foreach_sub([param.detach() for param in params], before)
            payload = torch.cat(
                [tensor_norms(deltas, self.norm_type), tensor_norms(params, self.norm_type)]
            )
            hub.defer(payload, self._update_consumer(trainer, index, step, names))

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        hub_for(trainer).flush()

    # ------------------------------------------------------------------------------- analysis
    def _analyse(
        self, reading: GradientReading, index: int, previous: GradientStats | None
    ) -> GradientStats:
        layers = self._group(reading.names, reading.norms)
        median = self._medians.setdefault(index, RunningMedian(self.spike_window))
        reference = median.median
        spike = (
            len(median) >= self.min_history
            and math.isfinite(reading.total)
            and reading.total > self.spike_factor * reference
        )
        if spike:
            self.events.append(
                GradientEvent("spike", reading.step, index, reading.total, reference)
            )
        if math.isfinite(reading.total):
            median.add(reading.total)
        layer_median = _median_of_finite(layers.values())
        vanishing = self._record_vanishing(
            reading.step, index, layers, self._vanishing_layers(layers, layer_median), layer_median
        )
        return GradientStats(
            step=reading.step,
            optimizer_index=index,
            total=reading.total,
            layers=layers,
            median_total=reference,
            spike=spike,
            vanishing=sorted(vanishing),
            # The update ratios are measured on logging steps only: keep the latest measurement.
            update_ratios=None if previous is None else previous.update_ratios,
            param_norms=None if previous is None else previous.param_norms,
        )

    def _group(self, names: tuple[str, ...], norms: np.ndarray) -> dict[str, float]:
        labels, index = self._grouping(names)
        if not labels:
            return {}
        kept = index >= 0
        if math.isinf(self.norm_type):
            grouped = np.full(len(labels), -np.inf)
            np.maximum.at(grouped, index[kept], norms[kept])
        else:
            powered = np.bincount(
                index[kept], weights=norms[kept] ** self.norm_type, minlength=len(labels)
            )
            grouped = powered ** (1.0 / self.norm_type)
        return dict(zip(labels, grouped.tolist(), strict=True))

    def _grouping(self, names: tuple[str, ...]) -> tuple[tuple[str, ...], np.ndarray]:
        """Layer labels and, per parameter, its label's position (-1: filtered out); cached."""
        cached = self._groupings.get(names)
        if cached is None:
            positions: dict[str, int] = {}
            index = []
            for name in names:
                label = name if self.per_parameter else layer_of(name)
                if self._filter is not None and not self._filter.search(label):
                    index.append(-1)
                else:
                    index.append(positions.setdefault(label, len(positions)))
            cached = self._groupings[names] = (tuple(positions), np.asarray(index, dtype=np.int64))
        return cached

    def _vanishing_layers(self, layers: dict[str, float], reference: float) -> set[str]:
        if len(layers) < 2 or not reference > 0.0:
            return set()
        return {name for name, value in layers.items() if value < self.vanishing_ratio * reference}

    def _record_vanishing(
        self, step: int, index: int, layers: dict[str, float], below: set[str], reference: float
    ) -> set[str]:
        """Flag layers below the threshold for ``vanishing_patience`` steps in a row, and clear
        them after as many steps above it, so that a transient dip is not an event."""
        flagged = self._vanishing.setdefault(index, set())
        streaks = self._streaks.setdefault(index, {})
        for name in layers:
            changes_state = (name in below) != (name in flagged)
            streaks[name] = streaks.get(name, 0) + 1 if changes_state else 0
        started = {n for n in below - flagged if streaks[n] >= self.vanishing_patience}
        cleared = {
            n for n in flagged - below if n in layers and streaks[n] >= self.vanishing_patience
        }
        if started:
            smallest = min(layers[name] for name in started)
            self.events.append(
                GradientEvent("vanishing", step, index, smallest, reference, sorted(started))
            )
        if cleared:
            self.events.append(
                GradientEvent(
                    "vanishing_cleared", step, index, float("nan"), reference, sorted(cleared)
                )
            )
        for name in started | cleared:
            streaks[name] = 0
        flagged |= started
        flagged -= cleared
        return set(flagged)

    def _update_consumer(
        self, trainer: Trainer, index: int, step: int, names: tuple[str, ...]
    ) -> Any:
        def consume(values: np.ndarray) -> None:
            count = len(names)
            deltas, norms = self._group(names, values[:count]), self._group(names, values[count:])
            ratios = {
                name: deltas[name] / norms[name] if norms[name] > 0 else float("nan")
                for name in deltas
            }
            stats = self.latest.get(index)
            if stats is not None:
                stats.update_ratios, stats.param_norms = ratios, norms
            metrics = {f"{PREFIX}/param_norm/{name}": value for name, value in norms.items()}
            metrics.update(
                {f"{PREFIX}/update_ratio/{name}": value for name, value in ratios.items()}
            )
            self._log(trainer, metrics, step)

        return consume

    # -------------------------------------------------------------------------------- logging
    def _interval(self, trainer: Trainer) -> int:
        if self.log_every_n_steps is not None:
            return self.log_every_n_steps
        return int(getattr(trainer, "log_every_n_steps", 50))

    def _metrics(self, stats: GradientStats, num_optimizers: int) -> dict[str, float]:
        total_key = "total" if num_optimizers == 1 else f"total_optimizer{stats.optimizer_index}"
        metrics = {f"{PREFIX}/grad_norm/{total_key}": stats.total}
        metrics.update(
            {f"{PREFIX}/grad_norm/{name}": value for name, value in stats.layers.items()}
        )
        return metrics

    @staticmethod
    def _log(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
        if not trainer.is_global_zero or not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _histograms(self, trainer: Trainer, reading: GradientReading, step: int) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            _, index = self._grouping(reading.names)
            for name, param, position in zip(reading.names, reading.params, index, strict=True):
                if position < 0:  # its layer is filtered out
                    continue
                logger.experiment.add_histogram(f"{PREFIX}/grad/{name}", param.grad, step)
                logger.experiment.add_histogram(f"{PREFIX}/weight/{name}", param.detach(), step)

    # ---------------------------------------------------------------------------- checkpoints
    @property
    @override
    def state_key(self) -> str:
        # Several monitors with different settings can share a Trainer (and a checkpoint).
        return self._generate_state_key(
            norm_type=self.norm_type,
            per_parameter=self.per_parameter,
            layer_filter=self.layer_filter,
        )

    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        hub_for(trainer).flush()  # pending update ratios are logged before a possible stop

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "medians": {index: median.state_dict() for index, median in self._medians.items()},
            "vanishing": {index: sorted(names) for index, names in self._vanishing.items()},
            "streaks": {index: dict(streaks) for index, streaks in self._streaks.items()},
            "counts": dict(self._counts),
            "events": [asdict(event) for event in self.events],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._medians = {}
        for index, state in state_dict["medians"].items():
            median = RunningMedian(self.spike_window)
            median.load_state_dict(state)
            self._medians[int(index)] = median
        self._vanishing = {
            int(index): set(names) for index, names in state_dict["vanishing"].items()
        }
        self._streaks = {
            int(index): {str(k): int(v) for k, v in streaks.items()}
            for index, streaks in state_dict.get("streaks", {}).items()
        }
        self._counts = {int(i): int(c) for i, c in state_dict.get("counts", {}).items()}
        self.events = [GradientEvent(**event) for event in state_dict["events"]]


def _median_of_finite(values: Iterable[float]) -> float:
    finite = [value for value in values if math.isfinite(value)]
    return statistics.median(finite) if finite else float("nan")


def _check_norm_type(norm_type: Any) -> float:
    if isinstance(norm_type, bool) or not isinstance(norm_type, int | float):
        raise TypeError(
            f"Invalid norm_type: {norm_type!r} (expected a number > 0, or float('inf'), "
            f"got {type(norm_type).__name__})"
        )
    if math.isnan(norm_type) or norm_type <= 0:
        raise ValueError(
            f"Invalid norm_type: {norm_type!r} (expected a number > 0, or float('inf'))"
        )
    return float(norm_type)


def _compile_filter(layer_filter: str | None) -> re.Pattern[str] | None:
    if layer_filter is None:
        return None
    if not isinstance(layer_filter, str):
        raise TypeError(
            f"Invalid layer_filter: {layer_filter!r} (expected a regular expression string)"
        )
    try:
        return re.compile(layer_filter)
    except re.error as error:
        raise ValueError(
            f"Invalid layer_filter: {layer_filter!r} is not a valid regular expression ({error})"
        ) from None


def _optimizer_index(trainer: Trainer, optimizer: Optimizer) -> int:
    for index, candidate in enumerate(trainer.optimizers):
        if candidate is optimizer or getattr(candidate, "optimizer", None) is optimizer:
            return index
    return 0


def _params_by_name(module: LightningModule, names: tuple[str, ...]) -> list[Tensor]:
    named = dict(module.named_parameters(remove_duplicate=False))
    return [named[name] for name in names]
