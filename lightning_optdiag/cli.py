"""The ``optdiag`` command.

Heavy modules (torch, Lightning) are imported inside the subcommands, so ``optdiag --help``
answers at once.
"""

from __future__ import annotations

import argparse
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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser(
        "demo",
        help="train a small model on built-in data with the callbacks attached",
        description="Train a small model on built-in synthetic data with GradientMonitor, "
        "NonFiniteGuard, CurvatureMonitor and TrainingDoctor attached, print what they found "
        "and the doctor's diagnoses, and write TensorBoard logs.",
        epilog="scenarios:\n"
        + "\n".join(f"  {name:<10} {text}" for name, text in DEMO_SCENARIOS.items()),
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optdiag`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


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
    summary.add_row("final training loss", f"{result.final_loss:.4g}")
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
        f"TensorBoard logs: [bold]{result.logdir}[/bold] "
        f"(view them with: tensorboard --logdir {result.logdir})"
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


if __name__ == "__main__":
    sys.exit(main())
