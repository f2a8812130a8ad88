"""The ``optdiag`` command.

Heavy modules (torch, Lightning) are imported inside the subcommands, so ``optdiag --help``
answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

DEMO_SCENARIOS = {
    "healthy": "a regression MLP trained with Adam; nothing should be reported",
    "nan": "SGD with a learning rate that blows up: non-finite steps skipped, then a stop",
    "exploding": "outlier batches at steps 60, 120, 180: gradient spikes flagged",
    "saddle": "a linear network initialised to zero: stuck at a saddle point",
    "oscillation": "learning rate 1.5x the stability threshold: the loss bounces in a ravine",
    "plateau": "a linear model on a non-linear target: a minimum with a high loss (model bias)",
    "switch": "Adam until its step settles (SWATS), then momentum SGD: one switch",
    "overfitting": "a wide MLP on 64 noisy samples: the validation loss turns up",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optdiag",
        description="Training diagnostics for PyTorch Lightning.",
    )
    from lightning_optdiag import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser(
        "demo",
        help="train a small model on built-in data with the callbacks attached",
        description="Train a small model on built-in synthetic data with GradientMonitor,\n"
        "NonFiniteGuard, CurvatureMonitor and TrainingDoctor attached, print what they found\n"
        "and the doctor's diagnoses, and write TensorBoard logs (read them back with\n"
        "optdiag report).",
        epilog="scenarios:\n"
        + "\n".join(f"  {name:<12} {text}" for name, text in DEMO_SCENARIOS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--scenario",
        choices=tuple(DEMO_SCENARIOS),
        default="healthy",
        help="which problem to reproduce (default: healthy)",
    )
    demo.add_argument(
        "--steps", type=_positive_int, default=240, help="optimizer steps (default: 240)"
    )
    demo.add_argument(
        "--logdir", default="optdiag_logs", help="TensorBoard log directory (default: optdiag_logs)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(handler=_demo)
    _add_report_parser(commands)
    _add_lr_find_parser(commands)  # optdiag lr-find: see the block at the end of this file
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optdiag`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except BrokenPipeError:
        # The reader went away (`optdiag report --json | head`): not an error worth a traceback.
        # Point stdout at devnull so that the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # what a shell reports for a process ended by SIGPIPE


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected a whole number"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}: expected a number >= 1")
    return value


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lightning_optdiag.demo import run_demo

    console = Console()
    console.print(
        f"[bold]optdiag demo[/bold] · scenario [cyan]{args.scenario}[/cyan]: "
        f"{DEMO_SCENARIOS[args.scenario]}"
    )
    with console.status("training…"):
        result = run_demo(args.scenario, steps=args.steps, logdir=args.logdir, seed=args.seed)
    _print_demo(console, result)
    return 0


def _print_demo(console: Any, result: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    monitor, guard = result.monitor, result.guard
    summary = Table(title="Summary", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("steps", f"{result.steps} in {result.seconds:.1f} s")
    summary.add_row("final training loss (whole set)", f"{result.final_loss:.4g}")
    latest = monitor.latest.get(0)
    if latest is not None:
        summary.add_row(
            "gradient norm (last step)",
            f"{latest.total:.4g} (running median {latest.median_total:.4g})",
        )
    summary.add_row("gradient events", str(len(monitor.events)))
    summary.add_row(
        "non-finite events", f"{len(guard.events)} ({guard.skipped_steps} steps skipped)"
    )
    if result.stopped:
        summary.add_row("[red]stopped[/red]", result.stopped)
    console.print(summary)

    rows = [(e.step, "GradientMonitor", e.kind, _gradient_detail(e)) for e in monitor.events]
    rows += [(e.step, "NonFiniteGuard", e.kind, f"{e.detail} ({e.action})") for e in guard.events]
    rows.sort(key=lambda row: row[0])
    if rows:
        events = Table(title="What was found", title_justify="left")
        for column in ("step", "callback", "kind", "detail"):
            events.add_column(column, overflow="fold")
        for steps, source, kind, detail in _runs(rows):
            events.add_row(steps, source, kind, escape(detail))
        console.print(events)
    curvature = result.curvature
    if curvature is not None and curvature.latest is not None:
        latest = curvature.latest
        ratio = "n/a" if latest.sharpness_ratio is None else f"{latest.sharpness_ratio:.3g}"
        console.print(
            f"Hessian at step {latest.step}: lambda_max {latest.lambda_max:.4g}, "
            f"lambda_min {latest.lambda_min:.4g}, sharpness / stability threshold {ratio} "
            f"({len(curvature.history)} checks)"
        )
    from lightning_optdiag.report import full_report

    console.print(full_report(result.doctor.diagnoses, result.steps, result.doctor.actions))
    console.print(
        f"TensorBoard logs: [bold]{result.logdir}[/bold]\n"
        f"  read them back: optdiag report {result.logdir}\n"
        f"  view them:      tensorboard --logdir {result.logdir}"
    )


def _runs(rows: list[tuple[int, str, str, str]]) -> list[tuple[str, str, str, str]]:
    """Merge runs of the same finding on nearby steps into one row: the first one's detail."""
    merged: list[
        tuple[int, int, int, str, str, str]
    ] = []  # first, last, count, source, kind, detail
    for step, source, kind, detail in rows:
        last = merged[-1] if merged else None
        if last and last[3] == source and last[4] == kind and step - last[1] <= 5:
            merged[-1] = (last[0], step, last[2] + 1, source, kind, last[5])
        else:
            merged.append((step, step, 1, source, kind, detail))
    return [
        (
            str(first) if count == 1 else f"{first}–{last}",
            source,
            kind,
            detail if count == 1 else f"{detail} (and {count - 1} more like it up to step {last})",
        )
        for first, last, count, source, kind, detail in merged
    ]


def _gradient_detail(event: Any) -> str:
    if event.kind == "spike":
        ratio = event.value / event.reference
        return (
            f"total gradient norm {event.value:.3g}, {ratio:.0f}x its running median "
            f"{event.reference:.3g}"
        )
    if event.kind == "vanishing":
        return (
            f"{', '.join(event.layers)}: gradient norm {event.value:.2g}, against a median layer "
            f"norm of {event.reference:.2g}"
        )
    return f"{', '.join(event.layers)} recovered"


# --- optdiag report -------------------------------------------------------------------------------
# Reads the TensorBoard event files the callbacks wrote (lightning_optdiag.report.logdir) and prints
# each run's key curves and diagnoses. Exit codes: 0 healthy, 1 problems diagnosed, 2 bad input.

REPORT_EPILOG = """\
exit status:
  0  every run is healthy: no diagnosis of severity --fail-on or worse, no non-finite value
  1  problems were diagnosed in at least one run (active or since cleared)
  2  bad input: no such directory, no optdiag data, or a corrupt event file

examples:
  optdiag report optdiag_logs
  optdiag report lightning_logs --latest
  optdiag report lightning_logs/version_3 --json > report.json
"""


def _add_report_parser(commands: Any) -> None:
    report = commands.add_parser(
        "report",
        help="read the TensorBoard logs of a run back: diagnoses and key curves",
        description="Read the TensorBoard event files that optdiag's callbacks wrote under\n"
        "LOGDIR and print, for each run, the key curves (losses, learning rates, gradient\n"
        "norm, Hessian eigenvalues, sharpness ratio, noise scale) as sparklines and the\n"
        "TrainingDoctor's diagnoses with their evidence and recommendations.",
        epilog=REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument(
        "logdir",
        metavar="LOGDIR",
        help="a log directory (searched recursively: one run per directory of event files), "
        "a run directory, or one event file",
    )
    report.add_argument(
        "--latest",
        action="store_true",
        help="only the run written most recently (e.g. the last lightning_logs/version_N)",
    )
    report.add_argument(
        "--width",
        type=_positive_int,
        default=None,
        metavar="N",
        help="sparkline width in characters (default: what the terminal fits, at most 40)",
    )
    report.add_argument(
        "--fail-on",
        choices=("info", "warning", "error"),
        default="warning",
        help="the least severe diagnosis that counts as a problem for the exit status "
        "(default: warning; 'info' marks e.g. the plateau of a converged run)",
    )
    report.add_argument(
        "--json",
        action="store_true",
        help="print the runs' diagnoses and counts as JSON instead (same exit status)",
    )
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from lightning_optdiag.report.logdir import LogdirError, read_logdir
    from lightning_optdiag.report.summary import run_verdict

    try:
        everything = read_logdir(args.logdir, include_empty=True)
    except LogdirError as error:
        print(f"optdiag report: error: {error}", file=sys.stderr)
        return 2
    runs = [run for run in everything if run.has_optdiag_data]
    if len(runs) < len(everything) and not args.json:
        skipped = [str(run.path) for run in everything if not run.has_optdiag_data]
        print(
            f"optdiag report: skipped {len(skipped)} run{'s' * (len(skipped) != 1)} without "
            f"optdiag data: {', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}",
            file=sys.stderr,
        )
    if args.latest:
        runs = [max(runs, key=lambda run: max(path.stat().st_mtime for path in run.files))]
    verdicts = [run_verdict(run) for run in runs]
    if args.json:
        _print_report_json(runs, verdicts, args.fail_on)
    else:
        _print_report(runs, verdicts, args.width, args.fail_on)
    return int(any(verdict.problems(args.fail_on) for verdict in verdicts))


def _print_report(runs: list[Any], verdicts: list[Any], width: int | None, fail_on: str) -> None:
    from rich.console import Console
    from rich.rule import Rule

    from lightning_optdiag.report.summary import run_report

    console = Console()
    for run in runs:
        if len(runs) > 1:
            console.print(Rule(style="dim"))
        console.print(run_report(run, width, max_width=console.width))
    if len(runs) > 1:
        unhealthy = sum(verdict.problems(fail_on) for verdict in verdicts)
        style = "green" if not unhealthy else "yellow"
        console.print(
            f"[{style}]{len(runs)} runs: {len(runs) - unhealthy} healthy, "
            f"{unhealthy} with problems[/{style}]"
        )


def _print_report_json(runs: list[Any], verdicts: list[Any], fail_on: str) -> None:
    import json

    payload = [
        {
            "run": str(run.path),
            "last_step": run.last_step,
            "healthy": not verdict.problems(fail_on),
            "final": None if run.record is None else run.record.final,
            "stopped": None if run.record is None else run.record.stopped,
            "nonfinite_curves": verdict.nonfinite_curves,
            "source": verdict.source,
            "diagnoses": None
            if verdict.diagnoses is None
            else [diagnosis.to_dict() for diagnosis in verdict.diagnoses],
            "actions": verdict.actions,
            "nonfinite_events": verdict.nonfinite_events,
            "skipped_steps": verdict.skipped_steps,
            "warnings": run.warnings,
        }
        for run, verdict in zip(runs, verdicts, strict=True)
    ]
    print(json.dumps(payload, indent=2))


# --- optdiag lr-find ------------------------------------------------------------------------------
# Lightning's learning-rate range test on a LightningModule class (lightning_optdiag.lr_range).
# Everything for this subcommand lives between this line and the matching end marker, plus the one
# call in build_parser.

LR_FIND_MODES = ("exponential", "linear")  # lightning_optdiag.lr_range.MODES, without the import

LR_FIND_EPILOG = """\
examples:
  optdiag lr-find mypackage.models:Regressor --init-args '{"hidden": 64}' --png lr.png
  optdiag lr-find mypackage.models:Regressor --datamodule mypackage.data:Data --min-lr 1e-6

TARGET and --datamodule are imported from the current directory or the installed packages.
The sweep runs on a throwaway CPU Trainer; the module is not changed and nothing is saved
except the PNG.
"""


class _LRFindInputError(Exception):
    """Bad input to ``optdiag lr-find``: reported on one line, with exit code 2."""


def _add_lr_find_parser(commands: Any) -> None:
    lr_find = commands.add_parser(
        "lr-find",
        help="run Lightning's learning-rate range test on a LightningModule",
        description="Run Lightning's learning-rate finder (the LR range test of Smith, 2017,\n"
        "arXiv:1506.01186) on a LightningModule class: train for a few steps while the\n"
        "learning rate grows, print the loss curve and the suggested learning rate, and\n"
        "optionally write the curve as a PNG.",
        epilog=LR_FIND_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lr_find.add_argument(
        "target",
        metavar="TARGET",
        help="the LightningModule class, as package.module:ClassName; it must define "
        "train_dataloader() unless --datamodule is given",
    )
    lr_find.add_argument(
        "--init-args",
        metavar="JSON",
        default="{}",
        help="keyword arguments for TARGET, as a JSON object (default: {})",
    )
    lr_find.add_argument(
        "--datamodule",
        metavar="DM",
        help="a LightningDataModule class, as package.module:ClassName, for the training data",
    )
    lr_find.add_argument(
        "--datamodule-init-args",
        metavar="JSON",
        default="{}",
        help="keyword arguments for --datamodule, as a JSON object (default: {})",
    )
    lr_find.add_argument(
        "--min-lr",
        type=float,
        default=1e-8,
        metavar="LR",
        help="first learning rate (default: 1e-8)",
    )
    lr_find.add_argument(
        "--max-lr", type=float, default=1.0, metavar="LR", help="last learning rate (default: 1)"
    )
    lr_find.add_argument(
        "--num-training",
        type=int,
        default=100,
        metavar="STEPS",
        help="training steps, one learning rate each (default: 100)",
    )
    lr_find.add_argument(
        "--mode",
        choices=LR_FIND_MODES,
        default="exponential",
        help="how the learning rate grows (default: exponential)",
    )
    lr_find.add_argument(
        "--early-stop-threshold",
        type=_lr_find_threshold,
        default=4.0,
        metavar="X",
        help="stop once the smoothed loss exceeds X times the best; 'none' sweeps to --max-lr "
        "(default: 4)",
    )
    lr_find.add_argument(
        "--png", metavar="PATH", help="also write the curve to PATH as a PNG (needs matplotlib)"
    )
    lr_find.set_defaults(handler=_lr_find)


def _lr_find_threshold(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected a number or 'none'"
        ) from None


def _lr_find(args: argparse.Namespace) -> int:
    import os

    # A console script does not put the current directory on sys.path; `python -m` does.
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return _run_lr_find(args)
    except _LRFindInputError as error:
        print(f"optdiag lr-find: error: {error}", file=sys.stderr)
        return 2
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _run_lr_find(args: argparse.Namespace) -> int:
    import warnings

    init_args = _lr_find_json("--init-args", args.init_args)
    datamodule_init_args = _lr_find_json("--datamodule-init-args", args.datamodule_init_args)
    if args.datamodule is None and datamodule_init_args:
        raise _LRFindInputError("--datamodule-init-args given without --datamodule")
    # The user's modules first: a typo in TARGET is reported before torch and Lightning load.
    target = _lr_find_import(args.target, "TARGET")
    datamodule_target = (
        None if args.datamodule is None else _lr_find_import(args.datamodule, "--datamodule")
    )

    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.model_helpers import is_overridden
    from rich.console import Console

    from lightning_optdiag.lr_range import (
        check_sweep_arguments,
        lr_range_test,
        render_lr_range,
        require_matplotlib,
    )

    module_class = _lr_find_subclass(target, args.target, "TARGET", LightningModule)
    datamodule_class = (
        None
        if datamodule_target is None
        else _lr_find_subclass(
            datamodule_target, args.datamodule, "--datamodule", LightningDataModule
        )
    )
    try:
        min_lr, max_lr, num_training, mode, threshold = check_sweep_arguments(
            args.min_lr, args.max_lr, args.num_training, args.mode, args.early_stop_threshold
        )
    except (TypeError, ValueError) as error:
        raise _LRFindInputError(str(error)) from None
    if args.png:
        try:
            require_matplotlib()
        except ImportError as error:
            raise _LRFindInputError(f"--png: {error}") from None
    if datamodule_class is None and not is_overridden(
        "train_dataloader", module_class, parent=LightningModule
    ):
        raise _LRFindInputError(
            f"{args.target} defines no train_dataloader(): add one, or give the training data "
            "with --datamodule package.module:ClassName"
        )
    module = _lr_find_instantiate(module_class, init_args, args.target)
    datamodule = (
        None
        if datamodule_class is None
        else _lr_find_instantiate(datamodule_class, datamodule_init_args, args.datamodule)
    )

    console = Console()
    with warnings.catch_warnings():
        # Lightning's warnings (dataloader workers, deprecations) are noise for this command.
        warnings.simplefilter("ignore")
        try:
            with console.status("running the learning-rate range test…"):
                result = lr_range_test(
                    module,
                    datamodule=datamodule,
                    min_lr=min_lr,
                    max_lr=max_lr,
                    num_training=num_training,
                    mode=mode,
                    early_stop_threshold=threshold,
                )
        except MisconfigurationException as error:
            raise _LRFindInputError(
                f"Lightning cannot run the finder on {args.target}: {_one_line(error)}"
            ) from None
    console.print(render_lr_range(result))
    if args.png:
        try:
            path = result.plot_png(args.png)
        except ImportError as error:
            raise _LRFindInputError(f"--png: {error}") from None
        console.print(f"Plot written to [bold]{path}[/bold]")
    return 0


def _lr_find_json(option: str, text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise _LRFindInputError(f"{option}: invalid JSON {text!r} ({error})") from None
    if not isinstance(value, dict):
        raise _LRFindInputError(
            f"{option}: expected a JSON object of keyword arguments, got {text!r}"
        )
    return value


def _lr_find_import(spec: str, what: str) -> Any:
    import importlib

    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise _LRFindInputError(
            f"{what}: invalid value {spec!r} (expected package.module:ClassName)"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise _LRFindInputError(
            f"{what}: cannot import {module_name!r}: {type(error).__name__}: {_one_line(error)}"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise _LRFindInputError(f"{what}: module {module_name!r} has no attribute {part!r}")
        target = getattr(target, part)
    return target


def _lr_find_subclass(target: Any, spec: str, what: str, base: type) -> type:
    if not isinstance(target, type) or not issubclass(target, base):
        raise _LRFindInputError(
            f"{what}: {spec} is not a {base.__name__} (expected a subclass of "
            f"lightning.pytorch.{base.__name__})"
        )
    return target


def _lr_find_instantiate(cls: type, kwargs: dict[str, Any], spec: str) -> Any:
    try:
        return cls(**kwargs)
    except Exception as error:
        raise _LRFindInputError(
            f"cannot create {spec}(**{kwargs!r}): {type(error).__name__}: {_one_line(error)}"
        ) from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


# --- end of optdiag lr-find -----------------------------------------------------------------------


if __name__ == "__main__":
    sys.exit(main())
