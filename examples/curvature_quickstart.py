"""Curvature quick start: Hessian eigenvalues, trace and spectral density of a training run.

Trains a small MLP on built-in synthetic data (a random "teacher" network labels Gaussian
inputs) with plain SGD, and every few steps measures the extreme Hessian eigenvalues (Lanczos,
warm-started from the previous check), the trace (Hutch++) and the edge-of-stability ratio
lambda_max / (2 / lr). Then it shows the spectral density, and how the smallest eigenvalue tells
a saddle point from a minimum.

Run it with ``python examples/curvature_quickstart.py`` (about 10 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from lightning_optdiag.curvature import (
    EigenResult,
    hessian_eigenvalues,
    hessian_trace,
    spectral_density,
)

SPARK = " ▁▂▃▄▅▆▇█"


def make_data(num_samples: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, 20, generator=generator)
    teacher = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10))
    with torch.no_grad():
        for param in teacher.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
        targets = teacher(inputs).argmax(dim=1)
    return inputs, targets


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs), targets)


def train_with_curvature(args: argparse.Namespace, console: Console) -> nn.Module:
    torch.manual_seed(args.seed)
    data = make_data(1024, args.seed)
    probe = (data[0][:256], data[1][:256])  # a fixed probe batch for every check
    model = nn.Sequential(
        nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    table = Table(
        title=f"SGD lr={args.lr}: curvature of the training loss ({_count(model)} parameters)"
    )
    for column in (
        "step",
        "loss",
        "λ_max",
        "λ_min",
        "λ_max·lr/2",
        "trace ± s.e.",
        "HVPs",
    ):
        table.add_column(column, justify="right", no_wrap=True)
    previous: EigenResult | None = None
    for step in range(args.steps + 1):
        if step % args.every == 0:
            eig = hessian_eigenvalues(
                model,
                loss_fn,
                probe,
                which="both",
                v0=None if previous is None else previous.warm_start(),
            )
            trace = hessian_trace(model, loss_fn, probe, num_hvps=30)
            largest, smallest = _extremes(eig)
            with torch.no_grad():
                loss = float(loss_fn(model, probe))
            table.add_row(
                str(step),
                f"{loss:.4f}",
                f"{largest:.4f}",
                f"{smallest:+.4f}",
                f"{largest * args.lr / 2:.3f}",
                f"{trace.value:.1f} ± {trace.standard_error:.1f}",
                f"{eig.num_hvps}{'' if previous is None else ' warm'}",
            )
            previous = eig
        if step < args.steps:
            index = torch.randint(0, data[0].shape[0], (64,))
            optimizer.zero_grad()
            loss_fn(model, (data[0][index], data[1][index])).backward()
            optimizer.step()
    console.print(table)
    console.print(
        "λ_max·lr/2 is the edge-of-stability ratio: near or above 1, plain SGD oscillates along "
        "the top eigenvector (Cohen et al., 2021). A λ_min small against λ_max is the usual "
        "near-zero bulk, not a saddle."
    )
    density = spectral_density(model, loss_fn, probe, num_probes=4, num_steps=30)
    points, values = density.grid(num_points=64)
    low, high = float(points[0]), float(points[-1])
    console.print(
        f"\nSpectral density (SLQ, {density.num_hvps} HVPs, log scale), "
        f"from {low:+.3f} to {high:+.3f}:"
    )
    console.print(f"[cyan]{_sparkline(values)}[/cyan]")
    return model


def saddle_versus_minimum(console: Console) -> None:
    torch.manual_seed(0)
    inputs = torch.randn(256, 5)
    targets = inputs @ torch.randn(5, 3)
    deep_linear = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        for param in deep_linear.parameters():
            param.mul_(1e-3)  # next to the origin: a strict saddle of the squared loss

    def mse(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    table = Table(title="Critical points: the sign of λ_min decides")
    for column in ("model", "λ_max", "λ_min", "verdict"):
        table.add_column(column, justify="right", no_wrap=True)
    saddle = hessian_eigenvalues(deep_linear, mse, (inputs, targets))
    table.add_row("deep linear net at the origin", *_verdict(saddle))
    regression = nn.Linear(5, 3)
    optimizer = torch.optim.LBFGS(
        regression.parameters(), max_iter=100, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = mse(regression, (inputs, targets))
        loss.backward()
        return loss

    optimizer.step(closure)
    minimum = hessian_eigenvalues(regression, mse, (inputs, targets))
    table.add_row("linear regression at its minimum", *_verdict(minimum))
    console.print(table)


def _extremes(result: EigenResult) -> tuple[float, float]:
    assert result.largest is not None
    assert result.smallest is not None
    return float(result.largest[0]), float(result.smallest[0])


def _verdict(result: EigenResult) -> tuple[str, str, str]:
    largest, smallest = _extremes(result)
    # A relative threshold: the near-zero bulk of small negative eigenvalues is not a saddle.
    verdict = "saddle point" if smallest < -0.01 * largest else "minimum"
    return f"{largest:.4f}", f"{smallest:+.4f}", verdict


def _sparkline(values: Tensor, decades: float = 6.0) -> str:
    """One character per value on a log scale spanning ``decades`` below the maximum."""
    logs = torch.log10(values.clamp_min(1e-300) / float(values.max()))
    levels = ((logs + decades) / decades).clamp(0.0, 1.0) * (len(SPARK) - 1)
    return "".join(SPARK[int(level + 0.5)] for level in levels.tolist())


def _count(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="SGD steps (default: 300)")
    parser.add_argument("--every", type=int, default=50, help="steps between checks (default: 50)")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (default: 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args()
    if args.steps < 0 or args.every < 1 or args.lr <= 0:
        parser.error("--steps must be >= 0, --every >= 1 and --lr > 0")
    console = Console()
    started = time.perf_counter()
    train_with_curvature(args, console)
    saddle_versus_minimum(console)
    console.print(f"\nDone in {time.perf_counter() - started:.1f} s.")


if __name__ == "__main__":
    main()
