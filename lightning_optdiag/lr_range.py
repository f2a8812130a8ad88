"""Learning-rate range test on Lightning's own learning-rate finder, and a compact view of it.

:func:`lr_range_test` runs ``lightning.pytorch.tuner.Tuner(trainer).lr_find(...)`` on a throwaway
CPU Trainer: the sweep, the loss smoothing, the early stop and the suggestion are Lightning's, not
re-implemented here. What this module adds is a quiet, side-effect-free call (the user's module
comes back bitwise as it was, detached from the throwaway Trainer, with its ``.grad`` and module
modes restored), argument checks with torch-style messages, a frozen result and
:func:`render_lr_range`, a rich view of the curve that needs no Lightning.

Properties of Lightning's sweep worth knowing when reading the curve (Lightning 2.6, checked by
``tests/test_lr_range.py``):

- The learning rates are ``min_lr`` and then ``min_lr * (max_lr / min_lr) ** (k / N)`` for
  ``k = 2 .. N`` (``N = num_training``): the first rung of the geometric ladder is skipped
  (Lightning-AI/pytorch-lightning#21931), the last rate is exactly ``max_lr``. In linear mode,
  likewise ``min_lr + k / N * (max_lr - min_lr)``.
- The losses are an exponential moving average (``beta = 0.98``) of the training losses, whose
  bias correction divides by ``1 - beta ** (step + 2)`` instead of ``1 - beta ** (step + 1)``:
  the first recorded value is about half the true loss (``0.02 / 0.0396 = 0.505`` of it), and the
  curve rises towards the true loss over the first few dozen steps even when the loss is flat.
- The sweep stops early once the smoothed loss exceeds ``early_stop_threshold`` times the lowest
  smoothed loss recorded before it; that step is still recorded. Because the lowest value is at
  most half the first batch's loss, the default threshold of 4 stops the sweep by the time the
  smoothed loss reaches about twice that loss.
- The suggestion is the rate at the steepest negative slope of the smoothed loss with respect to
  the learning rate itself (not its logarithm), skipping the first 10 points and the last one;
  with fewer than 13 points there is no suggestion. On a noisy curve (mini-batches) the tiny
  steps at the small-rate end turn small wiggles into steep slopes, so the suggestion often sits
  just after the first 10 points (Lightning-AI/pytorch-lightning#21141): read it against the
  curve, where :func:`render_lr_range` also marks the lowest loss.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import math
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_optdiag._validation import check_choice, check_float, check_int

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule, LightningModule
    from rich.console import RenderableType

__all__ = ["MODES", "LRRangeResult", "check_sweep_arguments", "lr_range_test", "render_lr_range"]

MODES = ("exponential", "linear")
"""How the learning rate grows from one step to the next (Lightning's ``mode``)."""

_SPARK_LEVELS = "▁▂▃▄▅▆▇█"
_WARMUP = 10  # Lightning's suggestion skips this many first points (skip_begin)
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")
_MATPLOTLIB_MISSING = (
    "plotting the LR range test needs matplotlib, which is not installed: "
    "install it with `pip install matplotlib`"
)


@dataclass(frozen=True)
class LRRangeResult:
    """The curve of an LR range test: one smoothed training loss per learning rate.

    Attributes:
        lrs: the learning rate of each step, in the order they were tried.
        losses: Lightning's smoothed training loss after each step (``nan`` where
            ``training_step`` returned nothing); same length as ``lrs``.
        suggestion: Lightning's suggested initial learning rate, or ``None`` when the sweep
            recorded too few finite losses to suggest one.
        num_training: the number of steps asked for; ``len(lrs)`` is smaller after an early stop.
        mode: ``"exponential"`` or ``"linear"``.
        min_lr: the first learning rate of the sweep.
        max_lr: the last learning rate the sweep would have reached.
        early_stop_threshold: the divergence threshold, or ``None`` if early stopping was off.
    """

    lrs: list[float]
    losses: list[float]
    suggestion: float | None
    num_training: int
    mode: str
    min_lr: float
    max_lr: float
    early_stop_threshold: float | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "lrs", [float(lr) for lr in self.lrs])
        object.__setattr__(self, "losses", [float(loss) for loss in self.losses])
        if len(self.lrs) != len(self.losses):
            raise ValueError(
                f"Invalid losses: {len(self.losses)} values (expected one per learning rate, "
                f"{len(self.lrs)})"
            )

    @property
    def stopped_early(self) -> bool:
        """Whether the sweep ended before ``num_training`` steps.

        That is the early stop on a diverging loss, unless the Trainer's own limits (say
        ``max_epochs`` in ``trainer_kwargs``) ended it first.
        """
        return len(self.lrs) < self.num_training

    @property
    def steepest_decade_lr(self) -> float | None:
        """optdiag's own suggestion: the rate where the smoothed loss falls fastest per
        decade of learning rate, between the end of Lightning's warm-up and the lowest loss.

        Lightning's rule differentiates with respect to the rate itself, which on a noisy curve
        favours the tiny steps at the small-rate end; per decade (the sweep's own geometric
        spacing) every part of the curve counts the same, and stopping at the lowest loss keeps
        the choice out of the divergent tail. ``None`` with fewer than 3 usable points.
        """
        lowest = _lowest(list(self.losses))
        if lowest is None:
            return None
        start = _WARMUP if lowest - _WARMUP >= 2 else 0
        span = [
            i for i in range(start, lowest + 1) if math.isfinite(self.losses[i]) and self.lrs[i] > 0
        ]
        if len(span) < 3:
            return None
        decades = np.log10([self.lrs[i] for i in span])
        slopes = np.gradient(np.asarray([self.losses[i] for i in span]), decades)
        return float(self.lrs[span[int(np.argmin(slopes))]])

    @property
    def suggestion_index(self) -> int | None:
        """The position of :attr:`suggestion` in :attr:`lrs`, or ``None`` without a suggestion."""
        suggestion = self.suggestion
        if suggestion is None or not self.lrs:
            return None
        return min(range(len(self.lrs)), key=lambda i: abs(self.lrs[i] - suggestion))

    def plot_png(self, path: str | Path) -> Path:
        """Write the curve as a PNG: loss against learning rate, the suggestion marked in red.

        Uses matplotlib's object-oriented API (no pyplot, so no global figure state and no
        display needed). The loss axis is cut above the highest loss before the minimum, so that
        a diverging tail does not flatten the valley.

        Args:
            path: where to write the PNG; parent directories must exist.

        Returns:
            ``path`` as a :class:`~pathlib.Path`.

        Raises:
            ImportError: matplotlib is not installed (the message says ``pip install
                matplotlib``).

        Example:
            >>> result.plot_png("lr_range.png")  # doctest: +SKIP
            PosixPath('lr_range.png')
        """
        figure_class = require_matplotlib()
        path = Path(path)
        figure = figure_class(figsize=(6.4, 4.0), dpi=120)
        axes = figure.subplots()
        axes.plot(self.lrs, self.losses, color="tab:blue", label="smoothed training loss")
        if self.mode == "exponential":
            axes.set_xscale("log")
        axes.set_xlabel("learning rate")
        axes.set_ylabel("loss (smoothed)")
        view = _loss_view(self.losses)
        if view is not None and any(loss > view[1] for loss in _finite(self.losses)):
            span = view[1] - view[0] or abs(view[1]) or 1.0
            axes.set_ylim(view[0] - 0.05 * span, view[1] + 0.1 * span)
        index = self.suggestion_index
        if index is not None:
            axes.plot(
                [self.lrs[index]],
                [self.losses[index]],
                marker="o",
                markersize=8,
                color="tab:red",
                linestyle="none",
                label=f"suggestion {format_lr(self.lrs[index])}",
            )
        axes.set_title(f"LR range test ({self.mode}, {len(self.lrs)} steps)")
        axes.legend(loc="best")
        figure.savefig(path, format="png")
        return path


def lr_range_test(
    module: LightningModule,
    train_dataloaders: Any = None,
    datamodule: LightningDataModule | None = None,
    *,
    min_lr: float = 1e-8,
    max_lr: float = 1.0,
    num_training: int = 100,
    mode: str = "exponential",
    early_stop_threshold: float | None = 4.0,
    attr_name: str = "",
    update_attr: bool = False,
    verbose: bool = False,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> LRRangeResult:
    """Run Lightning's learning-rate finder on ``module`` and return the loss curve.

    The LR range test (Smith, 2017) trains for ``num_training`` steps while the learning rate
    grows from ``min_lr`` to ``max_lr``; the loss first stalls (rate too small), then falls, then
    blows up. This calls ``Tuner(trainer).lr_find(...)`` on a throwaway Trainer (CPU, one
    device, no logger, no checkpointing, no model summary, no validation during the sweep, a
    temporary ``default_root_dir``), so the sweep, the smoothing, the early stop and the
    suggestion are exactly Lightning's; the module docstring lists their quirks.

    The module is left as it was: Lightning restores its weights and optimizer from a checkpoint
    it writes first (into the temporary directory), and this function then puts back each
    parameter's ``.grad``, every submodule's train/eval mode and the module's ``trainer``
    (Lightning also keeps the global RNG streams). Hooks such as ``setup`` and
    ``on_fit_start`` do run, and whatever they change outside the state dict stays changed.
    The learning-rate attribute is only written when ``update_attr=True``.

    Args:
        module: the LightningModule; ``configure_optimizers`` must return one optimizer.
        train_dataloaders: the training data (a DataLoader or what ``Trainer.fit`` accepts);
            ``None`` to use ``datamodule`` or the module's own ``train_dataloader()``.
        datamodule: a LightningDataModule to take the training data from.
        min_lr: the first learning rate, > 0.
        max_lr: the last learning rate, > ``min_lr``.
        num_training: the number of steps (learning rates), at least 2.
        mode: ``"exponential"`` (geometric steps, the usual choice) or ``"linear"``.
        early_stop_threshold: stop once the smoothed loss exceeds this multiple (> 1) of the
            best one; ``None`` sweeps to ``max_lr`` whatever happens.
        attr_name: the module (or ``hparams``) attribute holding the learning rate, for
            ``update_attr``; ``""`` looks for ``lr`` then ``learning_rate``.
        update_attr: write the suggestion into that attribute (Lightning's ``update_attr``,
            which ``Tuner.lr_find`` turns on by default; off here).
        verbose: show Lightning's progress bar and informational messages for the sweep.
        trainer_kwargs: options for the throwaway Trainer, overriding the defaults above (for
            example ``{"accelerator": "gpu"}`` or ``{"precision": "bf16-mixed"}``).

    Returns:
        An :class:`LRRangeResult` with the learning rates, the smoothed losses and the
        suggestion.

    Raises:
        TypeError: ``module`` is not a LightningModule, or an argument has the wrong type.
        ValueError: an argument is out of range, there is no training data, or ``update_attr``
            is on and the learning-rate attribute does not exist.
        RuntimeError: Lightning skipped the sweep (``fast_dev_run`` in ``trainer_kwargs``).
        lightning.pytorch.utilities.exceptions.MisconfigurationException: from Lightning, e.g.
            when ``configure_optimizers`` returns more than one optimizer.

    Example:
        >>> result = lr_range_test(model, min_lr=1e-6, max_lr=1.0)  # doctest: +SKIP
        >>> result.suggestion  # doctest: +SKIP
        0.0063
        >>> from rich import print
        >>> print(render_lr_range(result))  # doctest: +SKIP

    References:
        Smith, "Cyclical Learning Rates for Training Neural Networks", 2017, arXiv:1506.01186.
    """
    import torch
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer
    from lightning.pytorch.tuner import Tuner
    from lightning.pytorch.utilities.model_helpers import is_overridden
    from lightning.pytorch.utilities.parsing import lightning_hasattr

    if not isinstance(module, LightningModule):
        raise TypeError(
            f"Invalid module: {type(module).__name__} (expected a lightning.pytorch "
            "LightningModule)"
        )
    min_lr, max_lr, num_training, mode, early_stop_threshold = check_sweep_arguments(
        min_lr, max_lr, num_training, mode, early_stop_threshold
    )
    if datamodule is not None and not isinstance(datamodule, LightningDataModule):
        raise TypeError(
            f"Invalid datamodule: {type(datamodule).__name__} (expected a lightning.pytorch "
            "LightningDataModule or None)"
        )
    if train_dataloaders is not None and datamodule is not None:
        raise ValueError(
            "Invalid train_dataloaders: given together with a datamodule (expected one of them)"
        )
    if (
        train_dataloaders is None
        and datamodule is None
        and not is_overridden("train_dataloader", module)
    ):
        raise ValueError(
            f"Invalid train_dataloaders: None ({type(module).__name__} defines no "
            "train_dataloader(); pass train_dataloaders or datamodule)"
        )
    if not isinstance(attr_name, str):
        raise TypeError(f"Invalid attr_name: {attr_name!r} (expected a string)")
    if not isinstance(update_attr, bool):
        raise TypeError(f"Invalid update_attr: {update_attr!r} (expected True or False)")
    if update_attr:
        names = (attr_name,) if attr_name else ("lr", "learning_rate")
        if not any(lightning_hasattr(module, name) for name in names):
            raise ValueError(
                f"Invalid attr_name: {attr_name!r} (update_attr=True needs "
                f"{' or '.join(names)} on the module or its hparams)"
            )
    if trainer_kwargs is not None and not isinstance(trainer_kwargs, Mapping):
        raise TypeError(
            f"Invalid trainer_kwargs: {trainer_kwargs!r} (expected a mapping of Trainer "
            "options or None)"
        )

    parameters = list(module.parameters())
    grads = [None if p.grad is None else p.grad.detach().clone() for p in parameters]
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    previous_trainer = module._trainer
    previous_dm_trainer = None if datamodule is None else datamodule.trainer
    with tempfile.TemporaryDirectory(prefix="optdiag_lr_find_") as root:
        options: dict[str, Any] = {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "max_epochs": -1,
            "num_sanity_val_steps": 0,
            # Validation only at step num_training + 1, i.e. never during the sweep (Lightning
            # still validates once if the sweep stops early).
            "check_val_every_n_epoch": None,
            "val_check_interval": num_training + 1,
            "default_root_dir": root,
            **(trainer_kwargs or {}),
        }
        try:
            with _quiet_lightning(verbose):
                trainer = Trainer(**options)
                finder = Tuner(trainer).lr_find(
                    module,
                    train_dataloaders=train_dataloaders,
                    datamodule=datamodule,
                    min_lr=min_lr,
                    max_lr=max_lr,
                    num_training=num_training,
                    mode=mode,
                    early_stop_threshold=early_stop_threshold,
                    update_attr=update_attr,
                    attr_name=attr_name,
                )
                if finder is None:
                    raise RuntimeError(
                        "Lightning skipped the learning-rate finder (fast_dev_run is enabled in "
                        "trainer_kwargs)"
                    )
                suggestion = finder.suggestion()
        finally:
            with torch.no_grad():
                for parameter, grad in zip(parameters, grads, strict=True):
                    parameter.grad = grad
            for submodule, training in modes:
                submodule.training = training
            module.trainer = previous_trainer
            if datamodule is not None:
                datamodule.trainer = previous_dm_trainer
    return LRRangeResult(
        lrs=list(finder.results["lr"]),
        losses=list(finder.results["loss"]),
        suggestion=None if suggestion is None else float(suggestion),
        num_training=num_training,
        mode=mode,
        min_lr=min_lr,
        max_lr=max_lr,
        early_stop_threshold=early_stop_threshold,
    )


def check_sweep_arguments(
    min_lr: Any, max_lr: Any, num_training: Any, mode: Any, early_stop_threshold: Any
) -> tuple[float, float, int, str, float | None]:
    """Check the sweep's arguments and return them normalised.

    Args:
        min_lr: the first learning rate; a finite number > 0.
        max_lr: the last learning rate; a finite number > ``min_lr``.
        num_training: the number of steps; an integer >= 2.
        mode: one of :data:`MODES`.
        early_stop_threshold: a finite number > 1, or ``None``.

    Returns:
        ``(min_lr, max_lr, num_training, mode, early_stop_threshold)`` as float, float, int, str
        and float or ``None``.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range, naming it and its value, e.g.
            ``Invalid min_lr: -1.0 (expected a finite number > 0)``.

    Example:
        >>> check_sweep_arguments(1e-6, 1, 50, "exponential", None)
        (1e-06, 1.0, 50, 'exponential', None)
    """
    min_lr = check_float("min_lr", min_lr, minimum=0, exclusive_minimum=True)
    max_lr = check_float("max_lr", max_lr, minimum=min_lr, exclusive_minimum=True)
    num_training = check_int("num_training", num_training, minimum=2)
    mode = check_choice("mode", mode, MODES)
    if early_stop_threshold is not None:
        early_stop_threshold = check_float(
            "early_stop_threshold", early_stop_threshold, minimum=1, exclusive_minimum=True
        )
    return min_lr, max_lr, num_training, mode, early_stop_threshold


def require_matplotlib() -> Any:
    """Return matplotlib's ``Figure`` class, or raise an ``ImportError`` that says what to install.

    Returns:
        ``matplotlib.figure.Figure``.

    Raises:
        ImportError: matplotlib is not installed.

    Example:
        >>> Figure = require_matplotlib()  # doctest: +SKIP
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(_MATPLOTLIB_MISSING) from error
    return Figure


def format_lr(value: float) -> str:
    """Format a learning rate (or a loss) the way :func:`render_lr_range` shows it: 3 digits.

    Example:
        >>> format_lr(0.0070794578), format_lr(1e-08)
        ('0.00708', '1e-08')
    """
    return f"{value:.3g}"


def render_lr_range(result: LRRangeResult, *, width: int = 60, rows: int = 10) -> RenderableType:
    """A compact rich view of an LR range test: sparkline, sampled table and the suggestion.

    The sparkline shows the smoothed losses against ``log(lr)`` from ``min_lr`` (left) to
    ``max_lr`` (right), one column per ``width``-th of the log range; columns after an early stop
    stay blank. Its height spans the lowest loss to the highest loss before the minimum, so a
    diverging tail is drawn as full red blocks instead of flattening the valley; non-finite
    losses are a red ``x``. Both ends of that range ignore the first 10 steps, which Lightning's
    smoothing biases low (its suggestion skips them too). A ``▲`` marks the suggestion. Below
    it, a table of about ``rows`` evenly spaced steps (always including the suggestion and the
    lowest loss), then the suggestion in words. Needs rich only.

    Args:
        result: what :func:`lr_range_test` returned.
        width: sparkline columns, at least 10.
        rows: table rows besides the suggestion and the minimum, at least 2.

    Returns:
        A rich renderable (a ``Group``) for ``Console.print``.

    Raises:
        TypeError: ``result`` is not an :class:`LRRangeResult`.
        ValueError: ``width`` or ``rows`` is too small.

    Example:
        >>> from rich.console import Console
        >>> Console().print(render_lr_range(result))  # doctest: +SKIP

    References:
        Smith, "Cyclical Learning Rates for Training Neural Networks", 2017, arXiv:1506.01186.
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if not isinstance(result, LRRangeResult):
        raise TypeError(
            f"Invalid result: {type(result).__name__} (expected an LRRangeResult from "
            "lr_range_test)"
        )
    width = check_int("width", width, minimum=10)
    rows = check_int("rows", rows, minimum=2)

    steps = len(result.lrs)
    header = Text.assemble(
        ("LR range test", "bold"),
        f" · {result.mode} sweep {format_lr(result.min_lr)} → {format_lr(result.max_lr)}"
        f" · {steps} of {result.num_training} steps",
    )
    if result.stopped_early:
        threshold = result.early_stop_threshold
        reason = "" if threshold is None else f" (loss > {threshold:g}x best)"
        header.append(f" · stopped early{reason}", "yellow")
    parts: list[RenderableType] = [header]
    if steps == 0:
        parts.append(Text("No losses were recorded.", style="red"))
        return Group(*parts)

    parts.extend(_sparkline(result, width))

    index = result.suggestion_index
    best = _lowest(result.losses)
    count = min(rows, steps)
    picked = {round(k * (steps - 1) / max(count - 1, 1)) for k in range(count)}
    picked.update(i for i in (index, best) if i is not None)
    table = Table(title_justify="left", pad_edge=False, box=None, header_style="bold")
    table.add_column("step", justify="right")
    table.add_column("lr", justify="right")
    table.add_column("loss (smoothed)", justify="right")
    table.add_column("")
    for i in sorted(picked):
        notes = []
        if i == index:
            notes.append("← suggestion")
        if i == best:
            notes.append("lowest loss")
        style = "bold green" if i == index else None
        table.add_row(
            str(i),
            format_lr(result.lrs[i]),
            format_lr(result.losses[i]),
            ", ".join(notes),
            style=style,
        )
    parts.append(table)

    if result.suggestion is None:
        parts.append(
            Text(
                "No suggestion: Lightning needs at least 2 finite losses after skipping the first "
                f"10 steps and the last one ({steps} recorded).",
                style="yellow",
            )
        )
    else:
        parts.append(
            Text.assemble(
                ("Suggested learning rate: ", "bold"),
                (format_lr(result.suggestion), "bold green"),
                " (Lightning's rule: the steepest fall of the smoothed loss)",
            )
        )
    steepest = result.steepest_decade_lr
    if steepest is not None:
        parts.append(
            Text.assemble(
                ("Steepest fall per decade: ", "bold"),
                (format_lr(steepest), "bold cyan"),
                " (optdiag's rule, before the lowest loss; more robust to mini-batch noise)",
            )
        )
    return Group(*parts)


def _sparkline(result: LRRangeResult, width: int) -> list[Any]:
    from rich.text import Text

    logs = [math.log(lr) for lr in result.lrs]
    low, high = math.log(result.min_lr), math.log(result.max_lr)
    span = high - low
    column_width = span / (width - 1)
    view = _loss_view(result.losses)
    line = Text("loss ")
    for column in range(width):
        centre = low + column * column_width
        if centre > logs[-1] + column_width / 2 or centre < logs[0] - column_width / 2:
            line.append(" ")
            continue
        loss = result.losses[_nearest(logs, centre)]
        if not math.isfinite(loss):
            line.append("x", "red")
        elif view is None:
            line.append(_SPARK_LEVELS[0])
        elif loss > view[1]:
            line.append(_SPARK_LEVELS[-1], "red")
        else:
            fraction = 0.0 if view[1] == view[0] else (loss - view[0]) / (view[1] - view[0])
            fraction = max(fraction, 0.0)  # the biased-low first steps sit at the bottom
            line.append(_SPARK_LEVELS[round(fraction * (len(_SPARK_LEVELS) - 1))], "cyan")
    left, right = f"lr {format_lr(result.min_lr)}", format_lr(result.max_lr)
    axis = Text(left + " " * max(width + 5 - len(left) - len(right), 1) + right, style="dim")
    lines = [line, axis]
    index = result.suggestion_index
    if index is not None:
        column = round((logs[index] - low) / column_width)
        label = f"suggestion {format_lr(result.lrs[index])}"
        position = 5 + column
        if position + 2 + len(label) <= width + 5:
            marker = Text(" " * position + "▲ " + label, style="bold green")
        else:
            marker = Text(" " * max(position - len(label) - 1, 0) + label + " ▲", "bold green")
        lines.append(marker)
    return lines


def _nearest(sorted_values: list[float], value: float) -> int:
    """Index of the entry of ``sorted_values`` (ascending) closest to ``value``."""
    position = bisect.bisect_left(sorted_values, value)
    if position == 0:
        return 0
    if position == len(sorted_values):
        return position - 1
    before, after = sorted_values[position - 1], sorted_values[position]
    return position if after - value < value - before else position - 1


def _finite(values: list[float]) -> list[float]:
    return [value for value in values if math.isfinite(value)]


def _loss_view(losses: list[float]) -> tuple[float, float] | None:
    """The loss range worth showing: the lowest loss to the highest one recorded before it.

    Lightning's first smoothed losses are biased low (about half the true loss at the first step),
    so, like its suggestion, this ignores the first ``_WARMUP`` steps when there are enough others.
    """
    best_index = _lowest(losses)
    if best_index is None:
        return None
    start = _WARMUP if best_index >= _WARMUP else 0
    best = losses[best_index]
    top = max(loss for loss in losses[start : best_index + 1] if math.isfinite(loss))
    if top == best:  # the minimum comes first: show everything after the warm-up
        top = max(_finite(losses[start:]))
    return best, top


def _lowest(losses: list[float]) -> int | None:
    """Index of the lowest finite loss after the warm-up (overall in sweeps too short for one)."""
    finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
    after = [i for i in finite if i >= _WARMUP]
    candidates = after if len(after) >= _WARMUP else finite
    if not candidates:
        return None
    return min(candidates, key=lambda i: losses[i])


@contextlib.contextmanager
def _quiet_lightning(verbose: bool) -> Iterator[None]:
    """Silence Lightning's info messages and its finder's progress bar, then restore both."""
    if verbose:
        yield
        return
    from lightning.pytorch.tuner import lr_finder

    loggers = [logging.getLogger(name) for name in (*_LIGHTNING_LOGGERS, lr_finder.__name__)]
    levels = [logger.level for logger in loggers]
    # The finder's own tqdm bar ignores enable_progress_bar; it is a module global in Lightning.
    original_tqdm = getattr(lr_finder, "tqdm", None)
    try:
        for logger in loggers[:-1]:
            logger.setLevel(logging.WARNING)
        # The finder logs an error when it cannot suggest a rate; LRRangeResult says so instead.
        loggers[-1].setLevel(logging.CRITICAL)
        if original_tqdm is not None:
            lr_finder.tqdm = functools.partial(original_tqdm, disable=True)
        yield
    finally:
        if original_tqdm is not None:
            lr_finder.tqdm = original_tqdm
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
