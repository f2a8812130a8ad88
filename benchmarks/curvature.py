"""Curvature-engine benchmark: Hessian-vector products (HVPs) spent on extreme eigenvalues, the
error actually achieved, and the wall time of one HVP.

Every alternative runs on the same problems, from the same random start vectors, in one run:

* top eigenvalue: this library's Lanczos (``hessian_eigenvalues(which="largest")``, residual
  stop at ``tol=1e-3``), power iteration with the change-between-iterations stop common tools use
  (PyHessian style: ``|new - old| / (|old| + 1e-6) < 1e-3``, at most 100 iterations) and SciPy
  ``eigsh`` (ARPACK, ``which="LA"``, ``tol=1e-3``) on ``HessianOperator.as_linear_operator()``:
  HVPs, claimed convergence and the *true* error against the exact spectrum;
* smallest eigenvalue: Lanczos ``which="smallest"`` and ``which="both"``, ``eigsh(which="SA")``
  and power iteration on the Hessian shifted by its own top estimate;
* a warm-started re-check (``v0=result.warm_start()``) after 10 training steps, against a cold
  start on the same Hessian;
* wall time of one HVP, and of building the operator, over one gradient (forward + backward) for
  a float32 MLP and a small transformer encoder.

Problems: a 6154-parameter float64 MLP (20-64-64-10, tanh) on a fixed batch labelled by a random
teacher network, trained with Adam and at initialisation, whose exact spectra come from the dense
Hessian (``torch.func`` forward-over-reverse, as ``torch.func.hessian``, vmapped in chunks) and
``torch.linalg.eigvalsh``; and a planted symmetric "saddle" spectrum (loss ``0.5 x^T A x`` with
eigenvalues +-1 around a symmetric bulk in [-0.5, 0.5]), on which power iteration fails.

Run from the repository root::

    python benchmarks/curvature.py                # full run: a few minutes on 2 CPU cores
    python benchmarks/curvature.py --quick        # small problems, under 30 s (smoke test)
    python benchmarks/curvature.py --update-docs  # full run, then rewrite the
                                                  # "Curvature engine" section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from _report import (  # benchmarks/ is on sys.path when a script runs
    DOCS_PATH,
    Report,
    Verdict,
    library_revision,
    markdown_table,
    rich_table,
    update_docs,
    verdict_line,
    wrap,
)
from rich.console import Console
from rich.text import Text
from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_optdiag.curvature import EigenResult, HessianOperator, hessian_eigenvalues

TOL = 1e-3
POWER_MAX_ITERS = 100
POWER_EPS = 1e-6
TARGET_TOP_HVPS = 12
TARGET_WARM_HVPS = 4
TARGET_HVP_RATIO = 3.0
THREADS = 2
COMMAND = "python benchmarks/curvature.py"
SECTION_HEADING = "## Curvature engine"
LIBRARY_PATHS = ("lightning_optdiag/curvature",)

LossFn = Callable[[nn.Module, Any], Tensor]


# ------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    """Sizes of every problem; :data:`FULL` is the benchmark, :data:`QUICK` a smoke test."""

    quick: bool
    widths: tuple[int, ...]
    teacher_hidden: int
    samples: int
    train_steps: int
    recheck_steps: int
    minibatch: int
    lr: float
    saddle_size: int
    saddle_bulk: float
    starts: int
    tf_batch: int
    tf_seq: int
    repeats: int
    warmup: int
    hessian_chunk: int


FULL = Config(
    quick=False,
    widths=(20, 64, 64, 10),
    teacher_hidden=32,
    samples=512,
    train_steps=400,
    recheck_steps=10,
    minibatch=64,
    lr=1e-3,
    saddle_size=2000,
    saddle_bulk=0.5,
    starts=5,
    tf_batch=32,
    tf_seq=32,
    repeats=30,
    warmup=3,
    hessian_chunk=1024,
)
QUICK = replace(
    FULL,
    quick=True,
    widths=(10, 16, 16, 4),
    teacher_hidden=16,
    samples=128,
    train_steps=60,
    saddle_size=300,
    starts=2,
    tf_batch=8,
    tf_seq=16,
    repeats=5,
    warmup=2,
    hessian_chunk=1024,
)


# ------------------------------------------------------------------------------------ problems
@dataclass
class Problem:
    """A loss whose Hessian spectrum is known exactly (ascending float64 ``spectrum``)."""

    name: str
    model: nn.Module
    loss_fn: LossFn
    batch: Any
    spectrum: Tensor
    hvp_check: float
    loss: float
    mlp: bool = False

    @property
    def size(self) -> int:
        return int(self.spectrum.numel())

    @property
    def lam_max(self) -> float:
        return float(self.spectrum[-1])

    @property
    def lam_min(self) -> float:
        return float(self.spectrum[0])

    @property
    def radius(self) -> float:
        return max(abs(self.lam_max), abs(self.lam_min))


def mlp(widths: Sequence[int]) -> nn.Sequential:
    """Tanh MLP with the given layer widths (default PyTorch initialisation)."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        if index:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def classification_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def teacher_batch(cfg: Config, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Fixed Gaussian inputs labelled by the argmax of a random teacher MLP (a learnable task)."""
    torch.manual_seed(1)
    teacher = mlp((cfg.widths[0], cfg.teacher_hidden, cfg.widths[-1])).to(dtype)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(cfg.samples, cfg.widths[0], generator=generator, dtype=dtype)
    with torch.no_grad():
        labels = teacher(inputs).argmax(dim=1)
    return inputs, labels


@dataclass
class Trainer:
    """A model with its optimizer and mini-batch sampler, so training can be resumed."""

    model: nn.Module
    batch: tuple[Tensor, Tensor]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    minibatch: int

    def train(self, steps: int) -> float:
        """Take ``steps`` Adam steps on random mini-batches; return the full-batch loss."""
        inputs, labels = self.batch
        for _ in range(steps):
            index = torch.randint(0, len(labels), (self.minibatch,), generator=self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            classification_loss(self.model, (inputs[index], labels[index])).backward()
            self.optimizer.step()
        with torch.no_grad():
            return float(classification_loss(self.model, self.batch))


def trained_mlp(cfg: Config, steps: int) -> Trainer:
    torch.manual_seed(2)
    model = mlp(cfg.widths).double()
    trainer = Trainer(
        model=model,
        batch=teacher_batch(cfg),
        optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr),
        generator=torch.Generator().manual_seed(3),
        minibatch=cfg.minibatch,
    )
    trainer.train(steps)
    return trainer


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def dense_hessian(model: nn.Module, loss_fn: LossFn, batch: Any, chunk: int) -> Tensor:
    """Exact Hessian by torch.func (forward-over-reverse, what ``torch.func.hessian`` does),
    vmapped over the identity in chunks of ``chunk`` columns to bound memory."""
    wrapper = _LossModule(model, loss_fn)
    named = [(name, param) for name, param in wrapper.named_parameters() if param.requires_grad]
    numels = [param.numel() for _, param in named]
    flat = torch.cat([param.detach().reshape(-1) for _, param in named])

    def flat_loss(weights: Tensor) -> Tensor:
        pieces = torch.split(weights, numels)
        params = {
            name: piece.view(param.shape)
            for (name, param), piece in zip(named, pieces, strict=True)
        }
        return functional_call(wrapper, params, (batch,))

    def column(direction: Tensor) -> Tensor:
        return jvp(grad(flat_loss), (flat,), (direction,))[1]

    identity = torch.eye(flat.numel(), dtype=flat.dtype)
    return vmap(column, chunk_size=chunk)(identity)


def hvp_agreement(
    model: nn.Module, loss_fn: LossFn, batch: Any, hessian: Tensor
) -> tuple[float, float]:
    """Relative difference between one library HVP and the dense reference on a random vector,
    and the loss value."""
    vector = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(9)).double()
    with HessianOperator(model, loss_fn, batch) as operator:
        product = operator.matvec(vector.to(operator.dtype)).double()
        loss = operator.loss
    expected = hessian @ vector
    difference = torch.linalg.vector_norm(product - expected) / torch.linalg.vector_norm(expected)
    return float(difference), loss


def mlp_problem(name: str, model: nn.Module, batch: Any, cfg: Config) -> Problem:
    """The MLP classification loss, with its exact spectrum from the dense Hessian."""
    hessian = dense_hessian(model, classification_loss, batch, cfg.hessian_chunk)
    spectrum = torch.linalg.eigvalsh(hessian)
    check, loss = hvp_agreement(model, classification_loss, batch, hessian)
    return Problem(name, model, classification_loss, batch, spectrum, check, loss, mlp=True)


class Quadratic(nn.Module):
    """One parameter vector ``x``; the loss is ``0.5 x^T A x`` with ``A`` the batch."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.randn(size, generator=generator, dtype=torch.float64))


def quadratic_loss(model: nn.Module, matrix: Tensor) -> Tensor:
    x = model.get_parameter("x")
    return 0.5 * x @ (matrix @ x)


def saddle_spectrum(size: int, bulk: float, generator: torch.Generator) -> Tensor:
    """Eigenvalues +-1 and a bulk of mirrored pairs +-u, u uniform in [0, bulk]."""
    pairs = (size - 2) // 2
    half = torch.rand(pairs, generator=generator, dtype=torch.float64) * bulk
    values = [torch.tensor([-1.0, 1.0], dtype=torch.float64), half, -half]
    if size % 2:
        values.append(torch.zeros(1, dtype=torch.float64))
    return torch.cat(values).sort().values


def saddle_problem(cfg: Config) -> Problem:
    """``A = Q diag(spectrum) Q^T`` with a Haar-random orthogonal ``Q``."""
    generator = torch.Generator().manual_seed(4)
    spectrum = saddle_spectrum(cfg.saddle_size, cfg.saddle_bulk, generator)
    gaussian = torch.randn(cfg.saddle_size, cfg.saddle_size, generator=generator)
    q, r = torch.linalg.qr(gaussian.double())
    q = q * torch.sign(torch.diagonal(r))
    matrix = (q * spectrum) @ q.T
    matrix = 0.5 * (matrix + matrix.T)
    model = Quadratic(cfg.saddle_size, generator)
    check, loss = hvp_agreement(model, quadratic_loss, matrix, matrix)
    name = f"saddle +-1, bulk [-{cfg.saddle_bulk:g}, {cfg.saddle_bulk:g}]"
    return Problem(name, model, quadratic_loss, matrix, spectrum, check, loss)


# ------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Estimate:
    """One method's answer: the eigenvalue, the HVPs it cost and whether it claimed success."""

    value: float
    hvps: int
    converged: bool


def start_vector(size: int, seed: int, dtype: torch.dtype) -> Tensor:
    """The start vector Lanczos draws from ``torch.Generator().manual_seed(seed)``."""
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def power_iteration(
    matvec: Callable[[Tensor], Tensor], start: Tensor, shift: float = 0.0
) -> Estimate:
    """Power iteration as common tools write it (PyHessian): ``v <- (H - shift) v / norm``,
    estimate ``v^T H v``, stop when the relative change between iterations is below ``TOL``."""
    vector = start / torch.linalg.vector_norm(start)
    estimate: float | None = None
    for iteration in range(1, POWER_MAX_ITERS + 1):
        product = matvec(vector)
        new = float(torch.dot(vector, product))
        shifted = product - shift * vector
        vector = shifted / torch.linalg.vector_norm(shifted)
        if estimate is not None and abs(new - estimate) / (abs(estimate) + POWER_EPS) < TOL:
            return Estimate(new, iteration, True)
        estimate = new
    assert estimate is not None
    return Estimate(estimate, POWER_MAX_ITERS, False)


def power_top(problem: Problem, seed: int) -> Estimate:
    with HessianOperator(problem.model, problem.loss_fn, problem.batch) as operator:
        return power_iteration(operator.matvec, start_vector(operator.size, seed, operator.dtype))


def power_smallest(problem: Problem, seed: int) -> Estimate:
    """Power iteration on ``H - lambda_top I``, after a power-iteration ``lambda_top``."""
    with HessianOperator(problem.model, problem.loss_fn, problem.batch) as operator:
        start = start_vector(operator.size, seed, operator.dtype)
        top = power_iteration(operator.matvec, start)
        low = power_iteration(operator.matvec, start, shift=top.value)
        return Estimate(low.value, top.hvps + low.hvps, top.converged and low.converged)


def scipy_eigsh(problem: Problem, which: str, seed: int) -> Estimate:
    """ARPACK through ``as_linear_operator()``; HVPs counted by the operator."""
    with HessianOperator(problem.model, problem.loss_fn, problem.batch) as operator:
        start = start_vector(operator.size, seed, torch.float64).numpy()
        linear = operator.as_linear_operator()
        try:
            values = eigsh(linear, k=1, which=which, tol=TOL, v0=start, return_eigenvectors=False)
            converged = True
        except ArpackNoConvergence as failure:
            values, converged = failure.eigenvalues, False
        value = float(values[0]) if len(values) else float("nan")
        return Estimate(value, operator.num_hvps, converged)


def lanczos(problem: Problem, which: str, seed: int, v0: Tensor | None = None) -> EigenResult:
    generator = torch.Generator().manual_seed(seed)
    return hessian_eigenvalues(
        problem.model,
        problem.loss_fn,
        problem.batch,
        which=which,
        tol=TOL,
        v0=v0,
        generator=generator,
    )


def lanczos_top(problem: Problem, seed: int) -> Estimate:
    result = lanczos(problem, "largest", seed)
    assert result.largest is not None
    return Estimate(float(result.largest[0]), result.num_hvps, result.converged)


def lanczos_smallest(problem: Problem, seed: int) -> Estimate:
    result = lanczos(problem, "smallest", seed)
    assert result.smallest is not None
    return Estimate(float(result.smallest[0]), result.num_hvps, result.converged)


def lanczos_both(problem: Problem, seed: int) -> tuple[Estimate, Estimate]:
    """Both ends from one run: (top estimate, smallest estimate), sharing the HVP count."""
    result = lanczos(problem, "both", seed)
    assert result.largest is not None
    assert result.smallest is not None
    top = Estimate(float(result.largest[0]), result.num_hvps, result.converged)
    low = Estimate(float(result.smallest[0]), result.num_hvps, result.converged)
    return top, low


# ------------------------------------------------------------------------- eigenvalue tables
@dataclass
class Trials:
    """One method on one problem over several random starts."""

    method: str
    estimates: list[Estimate]

    def hvps(self) -> list[int]:
        return [estimate.hvps for estimate in self.estimates]

    def values(self) -> list[float]:
        return [estimate.value for estimate in self.estimates]

    def worst_error(self, exact: float) -> float:
        return max(abs(value - exact) for value in self.values())

    def claims(self) -> str:
        return f"{sum(e.converged for e in self.estimates)}/{len(self.estimates)}"


def run_trials(method: str, run: Callable[[int], Estimate], starts: int) -> Trials:
    return Trials(method, [run(seed) for seed in range(starts)])


def fmt_hvps(counts: Sequence[int]) -> str:
    return f"{statistics.median(counts):g} ({max(counts)})"


def fmt_values(values: Sequence[float]) -> str:
    """Median, with the range when the starts disagree beyond the printed digits."""
    median = f"{statistics.median(values):.5g}"
    low, high = f"{min(values):.5g}", f"{max(values):.5g}"
    return median if low == high else f"{median} [{low}, {high}]"


def fmt_err(value: float) -> str:
    return f"{value:.1e}"


def problem_report(problems: Sequence[Problem]) -> Report:
    rows = []
    for problem in problems:
        second = float(problem.spectrum[-2])
        gap = (problem.lam_max - second) / problem.radius
        rows.append(
            [
                problem.name,
                str(problem.size),
                f"{problem.loss:.4g}",
                f"{problem.lam_max:.6g}",
                f"{second:.6g}",
                f"{problem.lam_min:.6g}",
                f"{gap:.3g}",
                f"{problem.hvp_check:.1e}",
            ]
        )
    headers = ["Problem", "n", "loss", "λ_max", "λ_2", "λ_min", "(λ_max−λ_2)/ρ", "HVP vs dense"]
    note = (
        "Exact values: dense Hessian (torch.func) + torch.linalg.eigvalsh in float64, or the "
        "planted spectrum; ρ = max|λ| is the spectral radius. 'HVP vs dense' is the relative "
        "difference between one library HVP and the dense Hessian times the same vector."
    )
    return Report("Problems", headers, rows, note)


def top_trials(problem: Problem, starts: int) -> list[Trials]:
    return [
        run_trials("Lanczos (this library)", lambda s: lanczos_top(problem, s), starts),
        run_trials("power iteration", lambda s: power_top(problem, s), starts),
        run_trials("scipy eigsh LA", lambda s: scipy_eigsh(problem, "LA", s), starts),
    ]


def top_rows(problem: Problem, trials: Sequence[Trials]) -> list[list[str]]:
    rows = []
    for trial in trials:
        error = trial.worst_error(problem.lam_max)
        rows.append(
            [
                problem.name,
                trial.method,
                fmt_hvps(trial.hvps()),
                trial.claims(),
                fmt_values(trial.values()),
                f"{problem.lam_max:.6g}",
                fmt_err(error / problem.radius),
                fmt_err(error / abs(problem.lam_max)),
            ]
        )
    return rows


def top_report(rows: list[list[str]], starts: int) -> Report:
    headers = [
        "Problem",
        "Method",
        "HVPs median (max)",
        "claims converged",
        "λ̂_max returned",
        "exact λ_max",
        "worst |err|/ρ",
        "worst |err|/|λ_max|",
    ]
    note = (
        f"Over {starts} random starts (seeds 0..{starts - 1}, the same vectors for every method); "
        "tol=1e-3 for all; a value range [min, max] is shown when the starts disagree."
    )
    return Report("Top eigenvalue", headers, rows, note)


def smallest_rows(problem: Problem, starts: int) -> list[list[str]]:
    both = [lanczos_both(problem, seed) for seed in range(starts)]
    trials = [
        (run_trials("Lanczos smallest", lambda s: lanczos_smallest(problem, s), starts), None),
        (Trials("Lanczos both", [low for _, low in both]), Trials("", [top for top, _ in both])),
        (run_trials("scipy eigsh SA", lambda s: scipy_eigsh(problem, "SA", s), starts), None),
        (
            run_trials("power iteration, shifted", lambda s: power_smallest(problem, s), starts),
            None,
        ),
    ]
    rows = []
    for low, top in trials:
        top_error = (
            "—" if top is None else fmt_err(top.worst_error(problem.lam_max) / problem.radius)
        )
        rows.append(
            [
                problem.name,
                low.method,
                fmt_hvps(low.hvps()),
                low.claims(),
                fmt_values(low.values()),
                f"{problem.lam_min:.6g}",
                fmt_err(low.worst_error(problem.lam_min) / problem.radius),
                top_error,
            ]
        )
    return rows


def smallest_report(rows: list[list[str]], starts: int) -> Report:
    headers = [
        "Problem",
        "Method",
        "HVPs median (max)",
        "claims converged",
        "λ̂_min returned",
        "exact λ_min",
        "worst |err|/ρ",
        "top |err|/ρ (both)",
    ]
    note = (
        f"Over {starts} random starts. 'Lanczos both' gets both ends from one run (its HVPs "
        "cover both). 'power iteration, shifted' runs power iteration on H − λ̂_max·I after its "
        "own top estimate; its HVPs include that first run."
    )
    return Report("Smallest eigenvalue", headers, rows, note)


# ----------------------------------------------------------------------------- warm re-check
@dataclass(frozen=True)
class Recheck:
    """Lanczos on the Hessian after the extra training steps, warm or cold."""

    which: str
    label: str
    result: EigenResult
    problem: Problem
    start_residuals: str


def ritz_residuals(problem: Problem, vectors: Tensor) -> str:
    """``||H v - (v^T H v) v|| / rho`` of each (old) Ritz vector on the new Hessian."""
    texts = []
    with HessianOperator(problem.model, problem.loss_fn, problem.batch) as operator:
        for vector in vectors:
            unit = vector / torch.linalg.vector_norm(vector)
            product = operator.matvec(unit)
            residual = product - torch.dot(unit, product) * unit
            texts.append(fmt_err(float(torch.linalg.vector_norm(residual)) / problem.radius))
    return ", ".join(texts)


def warm_rechecks(trainer: Trainer, before: Problem, cfg: Config) -> list[Recheck]:
    """Lanczos before, then warm and cold after ``cfg.recheck_steps`` more Adam steps."""
    first = {which: lanczos(before, which, seed=0) for which in ("largest", "both")}
    trainer.train(cfg.recheck_steps)
    after = mlp_problem(
        f"{before.name} + {cfg.recheck_steps} steps", trainer.model, before.batch, cfg
    )
    rechecks = []
    for which, result in first.items():
        warm_start = result.warm_start()
        rechecks += [
            Recheck(which, "before the steps, cold", result, before, "—"),
            Recheck(
                which,
                f"after {cfg.recheck_steps} steps, warm",
                lanczos(after, which, seed=0, v0=warm_start),
                after,
                ritz_residuals(after, warm_start),
            ),
            Recheck(
                which,
                f"after {cfg.recheck_steps} steps, cold",
                lanczos(after, which, 0),
                after,
                "—",
            ),
        ]
    return rechecks


def recheck_row(check: Recheck) -> list[str]:
    result, problem = check.result, check.problem
    top = low = top_err = low_err = "—"
    if result.largest is not None:
        top = f"{float(result.largest[0]):.6g}"
        top_err = fmt_err(abs(float(result.largest[0]) - problem.lam_max) / problem.radius)
    if result.smallest is not None:
        low = f"{float(result.smallest[0]):.6g}"
        low_err = fmt_err(abs(float(result.smallest[0]) - problem.lam_min) / problem.radius)
    return [
        check.which,
        check.label,
        str(result.num_hvps),
        "yes" if result.converged else "no",
        top,
        f"{problem.lam_max:.6g}",
        top_err,
        low,
        low_err,
        check.start_residuals,
    ]


def recheck_report(rechecks: Sequence[Recheck], cfg: Config) -> Report:
    headers = [
        "which",
        "run",
        "HVPs",
        "converged",
        "λ̂_max",
        "exact λ_max",
        "|err|/ρ",
        "λ̂_min",
        "|err_min|/ρ",
        "old Ritz residual/ρ",
    ]
    note = (
        f"MLP after {cfg.recheck_steps} more Adam steps (lr {cfg.lr:g}, mini-batches of "
        f"{cfg.minibatch}); warm = v0=previous.warm_start(); cold = seed 0. 'old Ritz "
        "residual/ρ' is ||Hv − (vᵀHv)v||/ρ of each previous Ritz vector on the new Hessian "
        "(top, then smallest): the stop needs it ≤ 1e-3."
    )
    return Report("Warm-started re-check", headers, [recheck_row(c) for c in rechecks], note)


# ------------------------------------------------------------------------------------- timing
class TinyTransformer(nn.Module):
    """Linear embedding, ``nn.TransformerEncoder`` (dropout 0), mean pooling, linear head."""

    def __init__(self, features: int = 16, d_model: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(inputs)).mean(dim=1))


def interleaved_ms(
    runs: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Wall times in ms of each run, taken round-robin so that load from other processes on the
    machine hits every run alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            begin = time.perf_counter()
            run()
            times[name].append(1e3 * (time.perf_counter() - begin))
    return times


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of the ratio of two interleaved timings."""
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


def gradient_step(model: nn.Module, loss_fn: LossFn, batch: Any) -> Callable[[], object]:
    """One gradient: forward + ``torch.autograd.grad(loss, params)``."""
    params = [param for param in model.parameters() if param.requires_grad]

    def run() -> object:
        return torch.autograd.grad(loss_fn(model, batch), params)

    return run


def math_kernel_gradient(model: nn.Module, loss_fn: LossFn, batch: Any) -> Callable[[], object]:
    """The same gradient with attention forced onto the math SDPA kernel (as the HVP graph)."""
    inner = gradient_step(model, loss_fn, batch)

    def run() -> object:
        with sdpa_kernel(SDPBackend.MATH):
            return inner()

    return run


@dataclass(frozen=True)
class Timing:
    """Medians (ms) and medians of per-round ratios to the gradient of the same round."""

    name: str
    short: str
    params: int
    gradient: float
    gradient_math: float | None
    hvp: float
    build: float
    ratio: float
    math_ratio: float | None
    build_ratio: float


def time_model(
    name: str, short: str, model: nn.Module, loss_fn: LossFn, batch: Any, cfg: Config
) -> Timing:
    """Wall time of one gradient, one HVP and one operator build, interleaved."""
    runs = {"gradient": gradient_step(model, loss_fn, batch)}
    if any(isinstance(module, nn.MultiheadAttention) for module in model.modules()):
        runs["math"] = math_kernel_gradient(model, loss_fn, batch)
    runs["build"] = lambda: HessianOperator(model, loss_fn, batch).close()
    with HessianOperator(model, loss_fn, batch) as operator:
        vector = torch.randn(operator.size, generator=torch.Generator().manual_seed(5))
        vector = vector.to(operator.dtype)
        runs["hvp"] = lambda: operator.matvec(vector)
        times = interleaved_ms(runs, cfg.repeats, cfg.warmup)
        size = operator.size
    med = {key: statistics.median(values) for key, values in times.items()}
    grads = times["gradient"]
    return Timing(
        name=name,
        short=short,
        params=size,
        gradient=med["gradient"],
        gradient_math=med.get("math"),
        hvp=med["hvp"],
        build=med["build"],
        ratio=paired_ratio(times["hvp"], grads),
        math_ratio=paired_ratio(times["hvp"], times["math"]) if "math" in times else None,
        build_ratio=paired_ratio(times["build"], grads),
    )


def timings(cfg: Config) -> list[Timing]:
    torch.manual_seed(6)
    net = mlp(cfg.widths)
    batch = teacher_batch(cfg, torch.float32)
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randn(cfg.tf_batch, cfg.tf_seq, 16, generator=generator)
    labels = torch.randint(0, 10, (cfg.tf_batch,), generator=generator)
    transformer = TinyTransformer()
    widths = "-".join(map(str, cfg.widths))
    return [
        time_model(
            f"MLP {widths} f32, batch {cfg.samples}", "MLP", net, classification_loss, batch, cfg
        ),
        time_model(
            f"Transformer 2 layers d64/4 heads/ff128 f32, batch {cfg.tf_batch}x{cfg.tf_seq}",
            "transformer",
            transformer,
            classification_loss,
            (tokens, labels),
            cfg,
        ),
    ]


def timing_report(results: Sequence[Timing], cfg: Config) -> Report:
    rows = [
        [
            t.name,
            str(t.params),
            f"{t.gradient:.2f}",
            "—" if t.gradient_math is None else f"{t.gradient_math:.2f}",
            f"{t.hvp:.2f}",
            f"{t.ratio:.2f}",
            f"{t.build:.2f}",
            f"{t.build_ratio:.2f}",
        ]
        for t in results
    ]
    headers = [
        "Model",
        "params",
        "gradient ms",
        "gradient ms (math SDPA)",
        "HVP ms",
        "HVP / gradient",
        "build ms",
        "build / gradient",
    ]
    note = (
        f"Medians of {cfg.repeats} rounds after {cfg.warmup} warm-up rounds, each round timing "
        "every column once (interleaved); ratios are medians of the per-round ratios. torch "
        f"threads = {torch.get_num_threads()}. gradient = forward + torch.autograd.grad "
        "(default SDPA kernel; 'math SDPA' forces the math kernel, as the HVP graph uses); "
        "HVP = operator.matvec on an already built HessianOperator; build = constructing it "
        "(forward + gradient with create_graph=True, on the math SDPA kernel)."
    )
    return Report("Cost of one HVP", headers, rows, note)


# ------------------------------------------------------------------------------------ verdicts
def top_verdict(problem: Problem, lanczos_trials: Trials) -> Verdict:
    hvps = lanczos_trials.hvps()
    error = lanczos_trials.worst_error(problem.lam_max) / abs(problem.lam_max)
    met = max(hvps) <= TARGET_TOP_HVPS and error <= TOL
    gap = (problem.lam_max - float(problem.spectrum[-2])) / problem.radius
    detail = (
        f"{problem.name} ({problem.size} parameters): Lanczos used at most {max(hvps)} HVPs "
        f"(median {statistics.median(hvps):g}) over {len(hvps)} random starts, worst true error "
        f"{error:.1e}·|λ_max| (target: <= {TARGET_TOP_HVPS} HVPs and <= 1e-3). The residual stop "
        "(||Hy − θy|| <= 1e-3·ρ) bounds the error of θ, and the actual error is far smaller "
        "(about residual²/gap). The number of steps is set by how well λ_max is separated: "
        f"(λ_max−λ_2)/ρ = {gap:.3g}."
    )
    return Verdict(f"top eigenvalue within 1e-3 in <= {TARGET_TOP_HVPS} HVPs", met, detail)


def warm_verdicts(rechecks: Sequence[Recheck]) -> list[Verdict]:
    verdicts = []
    for which in ("largest", "both"):
        warm, cold = [check for check in rechecks if check.which == which][1:]
        problem = warm.problem
        assert warm.result.largest is not None
        error = abs(float(warm.result.largest[0]) - problem.lam_max) / problem.radius
        hvps = warm.result.num_hvps
        met = hvps <= TARGET_WARM_HVPS and error <= TOL and warm.result.converged
        detail = (
            f'which="{which}": the warm re-check took {hvps} HVPs against {cold.result.num_hvps} '
            f"cold, top error {error:.1e}·ρ. The training steps moved the eigenvectors: the "
            f"previous Ritz vectors have residual {warm.start_residuals} (·ρ) on the new Hessian, "
            "against the stop at 1e-3·ρ, so Lanczos needs steps to reconverge."
        )
        if which == "both":
            top_gap = (problem.lam_max - float(problem.spectrum[-2])) / problem.radius
            bottom_gap = (float(problem.spectrum[1]) - problem.lam_min) / problem.radius
            detail += (
                f" Relative gaps on the new Hessian: top {top_gap:.2g}, bottom {bottom_gap:.2g} "
                f"(λ_min/ρ = {problem.lam_min / problem.radius:.2g}); Lanczos converges more "
                "slowly at the end with the smaller gap."
            )
        verdicts.append(
            Verdict(f'warm re-check (which="{which}") in <= {TARGET_WARM_HVPS} HVPs', met, detail)
        )
    return verdicts


def timing_verdicts(results: Sequence[Timing]) -> list[Verdict]:
    verdicts = []
    for t in results:
        detail = (
            f"{t.name}: one HVP takes {t.ratio:.2f}x one gradient (medians {t.hvp:.2f} ms and "
            f"{t.gradient:.2f} ms)"
        )
        if t.math_ratio is not None:
            detail += f", {t.math_ratio:.2f}x a gradient on the math SDPA kernel"
        detail += (
            f"; building the operator (forward + create_graph gradient) costs {t.build_ratio:.2f} "
            "gradients, once."
        )
        verdicts.append(
            Verdict(
                f"one HVP <= {TARGET_HVP_RATIO:g}x one gradient ({t.short})",
                t.ratio <= TARGET_HVP_RATIO,
                detail,
            )
        )
    return verdicts


# ------------------------------------------------------------------------------------- output
def environment_line(elapsed: float, cfg: Config) -> str:
    mode = " --quick" if cfg.quick else ""
    return (
        f"Measured {datetime.date.today().isoformat()} at commit "
        f"{library_revision(LIBRARY_PATHS)} with torch "
        f"{torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs (torch "
        f"threads: {torch.get_num_threads()}), no GPU; command `{COMMAND}{mode}` (whole run "
        f"{elapsed:.0f} s; `--update-docs` rewrites this section)."
    )


def setup_text(cfg: Config) -> str:
    """What the problems and methods are, for the docs."""
    widths = "-".join(map(str, cfg.widths))
    teacher = f"{cfg.widths[0]}-{cfg.teacher_hidden}-{cfg.widths[-1]}"
    pairs = (cfg.saddle_size - 2) // 2
    return (
        f"Problems: **MLP** {widths} (tanh, float64) with cross-entropy on one fixed batch of "
        f"{cfg.samples} standard-normal inputs labelled by the argmax of a random {teacher} "
        f"teacher MLP; *trained* = after {cfg.train_steps} Adam steps (lr {cfg.lr:g}, "
        f"mini-batches of {cfg.minibatch} from that batch), *at init* = PyTorch's default "
        f"initialisation. **Saddle**: one float64 vector x of {cfg.saddle_size} entries, loss "
        "½·xᵀAx with A = Q·diag(λ)·Qᵀ, Q Haar-random, λ = ±1 and "
        f"{pairs} mirrored pairs ±u, u ~ U[0, {cfg.saddle_bulk:g}]. Exact spectra come from the "
        "dense Hessian (torch.func forward-over-reverse, i.e. torch.func.hessian, in chunks) and "
        "torch.linalg.eigvalsh in float64, or are the planted values.\n\n"
        "Methods, all at tol=1e-3: **Lanczos** = `hessian_eigenvalues(..., which=...)` (stop: "
        "every requested Ritz residual <= tol·ρ, default max_hvps=100); **power iteration** as "
        "PyHessian writes it (v ← Hv/‖Hv‖, estimate vᵀHv, stop when |new−old|/(|old|+1e-6) < "
        "tol, at most 100 iterations); **eigsh** = `scipy.sparse.linalg.eigsh(op."
        'as_linear_operator(), k=1, which="LA"/"SA", tol=1e-3)` (ARPACK, default ncv=20). All '
        "start from the same random vectors; HVPs are counted by the operator (building it is "
        "not an HVP)."
    )


def markdown_section(
    reports: Sequence[Report], verdicts: Sequence[Verdict], header: str, cfg: Config
) -> str:
    tables = [markdown_table(report) for report in reports]
    targets = "\n".join(
        wrap(f"**{'Met' if v.met else 'Missed'}:** {v.target}. {v.detail}", "- ", "  ")
        for v in verdicts
    )
    prose = [wrap(paragraph) for paragraph in [header, *setup_text(cfg).split("\n\n")]]
    return "\n\n".join([*prose, *tables, "### Targets", targets])


# --------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small problems, under 30 s")
    parser.add_argument(
        "--update-docs", action="store_true", help=f"rewrite '{SECTION_HEADING}' in {DOCS_PATH}"
    )
    args = parser.parse_args(argv)
    if args.quick and args.update_docs:
        parser.error("--update-docs records the full benchmark; drop --quick")
    return args


def eigen_reports(
    problems: Sequence[Problem], cfg: Config, log: Console
) -> tuple[Report, Report, list[Verdict]]:
    """Top and smallest eigenvalue tables, and the top-eigenvalue verdict on every MLP."""
    top_all: list[list[str]] = []
    low_all: list[list[str]] = []
    verdicts = []
    for problem in problems:
        log.log(f"eigenvalues: {problem.name}")
        trials = top_trials(problem, cfg.starts)
        top_all += top_rows(problem, trials)
        low_all += smallest_rows(problem, cfg.starts)
        if problem.mlp:
            verdicts.append(top_verdict(problem, trials[0]))
    return top_report(top_all, cfg.starts), smallest_report(low_all, cfg.starts), verdicts


def build_problems(cfg: Config, log: Console) -> tuple[Trainer, list[Problem]]:
    """The trained MLP (first: the warm re-check continues its training), the MLP at
    initialisation and the planted saddle."""
    widths = "-".join(map(str, cfg.widths))
    log.log("training the MLP, dense Hessian")
    trainer = trained_mlp(cfg, cfg.train_steps)
    problems = [mlp_problem(f"MLP {widths}, trained", trainer.model, trainer.batch, cfg)]
    log.log("dense Hessian of the MLP at initialisation")
    init = trained_mlp(cfg, 0)
    problems.append(mlp_problem(f"MLP {widths}, at init", init.model, init.batch, cfg))
    log.log("planting the saddle spectrum")
    problems.append(saddle_problem(cfg))
    return trainer, problems


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    torch.set_num_threads(THREADS)
    began = time.perf_counter()
    out, log = Console(width=200), Console(stderr=True)

    trainer, problems = build_problems(cfg, log)
    top, low, top_targets = eigen_reports(problems, cfg, log)
    log.log("warm-started re-check")
    rechecks = warm_rechecks(trainer, problems[0], cfg)
    log.log("HVP / gradient wall time")
    timed = timings(cfg)

    reports = [problem_report(problems), top, low, recheck_report(rechecks, cfg)]
    reports.append(timing_report(timed, cfg))
    verdicts = [*top_targets, *warm_verdicts(rechecks), *timing_verdicts(timed)]
    header = environment_line(time.perf_counter() - began, cfg)
    for report in reports:
        out.print(rich_table(report))
        out.print()
    if cfg.quick:
        out.print(Text("--quick: small problems; the targets are defined for the full run"))
    for verdict in verdicts:
        out.print(Text(verdict_line(verdict), style="green" if verdict.met else "red"))
    out.print(header)
    if args.update_docs:
        update_docs(SECTION_HEADING, markdown_section(reports, verdicts, header, cfg))
        out.print(f"updated '{SECTION_HEADING}' in {DOCS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
