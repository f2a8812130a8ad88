"""CurvatureMonitor benchmark: its amortised share of training time at its defaults, the cost of
a Hessian check every 50 steps against a power-iteration baseline, what warm starts save, and
the cost of one Lanczos step against one bare HVP.

Every configuration trains its own copy of the benchmark model of ``benchmarks/callbacks.py``
(same initial weights, same batches, AdamW) with a real ``Trainer``, in lock-step with the
others (``callbacks.lockstep_session``: one thread per configuration, the threads taking turns
one step at a time, so that load from other processes hits all of them alike). Overheads are
ratios of total training time to the baseline's over the same rounds: the time of the checks is
included, amortised over the run.

* Overhead sessions (repeated): no callback, the same again (A/A control, the method's error)
  and ``CurvatureMonitor()`` at its defaults (a check is due every 100 steps, and deferred
  until the checks so far and the next one, predicted, fit in ``max_overhead=0.05`` of the
  training time so far: the first comes after about 1800 steps). The share is measured from
  the start of the run to right after each check (the worst moments) and to the end.
* One comparison session, checks every 50 steps: no callback; a top-eigenvalue check written
  here as power-iteration tools do it (PyHessian's algorithm and defaults: gradient with
  ``create_graph=True`` on the probe batch, ``v <- Hv / |Hv|``, estimate ``v.Hv``, stop when
  ``|new - old| / (|old| + 1e-6) < 1e-3`` or after 100 iterations);
  ``CurvatureMonitor(every_n_steps=50, max_overhead=None)`` (warm starts, cold every 10th
  check) and the same with ``cold_start_every=1`` (always cold). Since a check never changes
  the trajectory, the three see the same Hessians at the same steps: their eigenvalues and
  HVP counts compare check by check.
* Outside the Trainer, interleaved: one gradient, one bare HVP (what a power iteration
  spends per iteration), ``HessianOperator.matvec`` and ``lanczos_eigenvalues`` run for a fixed
  number of steps, per step.

Run from the repository root::

    python benchmarks/curvature_monitor.py                # full run: about 21 minutes on 2 cores
    python benchmarks/curvature_monitor.py --quick        # small model, under 20 s (smoke test)
    python benchmarks/curvature_monitor.py --update-docs  # full run, then rewrite the
                                                          # "CurvatureMonitor" section of
                                                          # docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import callbacks as bench  # benchmarks/callbacks.py: its model and lock-step timing
import lightning
import torch
from _report import (  # benchmarks/ is on sys.path when a script runs
    DOCS_PATH,
    Report,
    Verdict,
    library_revision,
    markdown_table,
    rich_table,
    status,
    update_docs,
    verdict_line,
    wrap,
)
from lightning.pytorch import Callback, LightningModule, Trainer
from rich.console import Console
from rich.text import Text
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from lightning_optdiag.callbacks import CurvatureMonitor, CurvatureRecord
from lightning_optdiag.curvature import HessianOperator, lanczos_eigenvalues

TARGET_OVERHEAD = 0.05
ISSUE_POWER_RANGE = (0.5, 0.9)
POWER_MAX_ITERS = 100  # PyHessian's maxIter
POWER_TOL = 1e-3  # PyHessian's tol
POWER_EPS = 1e-6
THREADS = 1
COMMAND = "python benchmarks/curvature_monitor.py"
SECTION_HEADING = "## CurvatureMonitor"
LIBRARY_PATHS = ("lightning_optdiag/callbacks", "lightning_optdiag/curvature")


# ------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    """Sizes of the run; :data:`FULL` is the benchmark, :data:`QUICK` a smoke test."""

    quick: bool
    model: bench.Config  # model, batch, optimizer and Trainer settings of benchmarks/callbacks.py
    warmup_steps: int
    overhead_steps: int
    overhead_sessions: int
    warmup_sessions: int
    compare_steps: int
    every: int
    lanczos_steps: tuple[int, ...]
    cost_rounds: int
    # Arguments of the monitor in the overhead sessions: its defaults in the benchmark.
    overhead_monitor: tuple[tuple[str, Any], ...] = ()

    @property
    def monitor_name(self) -> str:
        return f"CurvatureMonitor({', '.join(f'{k}={v!r}' for k, v in self.overhead_monitor)})"

    def session(self, measured_steps: int) -> bench.Config:
        return replace(self.model, warmup_steps=self.warmup_steps, measured_steps=measured_steps)


FULL = Config(
    quick=False,
    model=bench.FULL,
    warmup_steps=10,
    overhead_steps=4000,
    overhead_sessions=3,
    warmup_sessions=1,
    compare_steps=500,
    every=50,
    lanczos_steps=(8, 16, 32),
    cost_rounds=6,
)
QUICK = replace(
    FULL,
    quick=True,
    model=replace(bench.FULL, width=64, blocks=4, batch=32, log_every_n_steps=10),
    warmup_steps=5,
    overhead_steps=400,
    overhead_sessions=1,
    warmup_sessions=0,
    compare_steps=150,
    lanczos_steps=(4, 8),
    cost_rounds=5,
    # A smaller predicted first check, so that one comes within the short run.
    overhead_monitor=(("max_hvps", 4),),
)


# -------------------------------------------------------------------------- power iteration
@dataclass(frozen=True)
class PowerRecord:
    """One power-iteration check."""

    step: int
    eigenvalue: float
    hvps: int
    converged: bool
    seconds: float


def group_dot(first: Sequence[Tensor], second: Sequence[Tensor]) -> Tensor:
    return sum((torch.sum(a * b) for a, b in zip(first, second, strict=True)), torch.zeros(()))


def normalised(vectors: Sequence[Tensor]) -> list[Tensor]:
    norm = torch.sqrt(group_dot(vectors, vectors)) + POWER_EPS
    return [v / norm for v in vectors]


class PowerIterationCheck(Callback):
    """Top Hessian eigenvalue every ``every_n_steps`` steps, computed the way power-iteration
    tools such as PyHessian do (written here from the algorithm, defaults ``maxIter=100``,
    ``tol=1e-3``): on the probe batch (the first training batch, kept), the loss and its
    gradient with ``create_graph=True``; then from a random unit vector, repeatedly
    ``Hv = autograd.grad(grads, params, grad_outputs=v, retain_graph=True)``, estimate
    ``v.Hv``, ``v <- Hv / |Hv|``, until the estimate changes by less than ``tol`` relative to
    the previous one. Runs after the optimizer step, like CurvatureMonitor."""

    def __init__(self, every_n_steps: int, seed: int = 0) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.history: list[PowerRecord] = []
        self._probe: tuple[Tensor, Tensor] | None = None
        self._last_step = 0

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._probe is None:
            inputs, labels = batch
            self._probe = (inputs.detach().clone(), labels.detach().clone())

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step - self._last_step >= self.every_n_steps and self._probe is not None:
            self._last_step = step
            self.history.append(self.check(pl_module, step))

    def check(self, module: LightningModule, step: int) -> PowerRecord:
        assert self._probe is not None
        started = time.perf_counter()
        inputs, labels = self._probe
        params = [p for p in module.parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = F.cross_entropy(module(inputs), labels)
            grads = torch.autograd.grad(loss, params, create_graph=True)
        generator = torch.Generator().manual_seed(self.seed + len(self.history))
        vector = normalised([torch.randn(p.shape, generator=generator) for p in params])
        eigenvalue: float | None = None
        hvps, converged = 0, False
        for _ in range(POWER_MAX_ITERS):
            product = torch.autograd.grad(grads, params, grad_outputs=vector, retain_graph=True)
            hvps += 1
            estimate = float(group_dot(product, vector))
            vector = normalised(product)
            if eigenvalue is not None and (
                abs(estimate - eigenvalue) / (abs(eigenvalue) + POWER_EPS) < POWER_TOL
            ):
                eigenvalue, converged = estimate, True
                break
            eigenvalue = estimate
        del grads, loss
        assert eigenvalue is not None
        return PowerRecord(step, eigenvalue, hvps, converged, time.perf_counter() - started)


# ------------------------------------------------------------------------ monitor accounting
@dataclass
class CheckCost:
    """HVPs and seconds of the parts of one CurvatureMonitor check."""

    hvps: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class RecordingMonitor(CurvatureMonitor):
    """CurvatureMonitor noting, for every check, the HVPs and wall time of each eigenvalue run
    (``hessian``: both ends of H; ``preconditioned``: the top of P^-1 H for the Adam family)
    and the time of the noise-scale gradients. Behaviour unchanged: it wraps the private
    ``_eigen`` and ``_measure_noise`` steps of ``measure``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.costs: list[CheckCost] = []
        self._bench_cost = CheckCost()

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> CurvatureRecord | None:
        self._bench_cost = CheckCost()
        record = super().measure(trainer, pl_module)
        if record is not None:
            self.costs.append(self._bench_cost)
        return record

    def _eigen(self, operator: Any, key: str, which: str, cold: bool, generator: Any) -> Any:
        began = time.perf_counter()
        result = super()._eigen(operator, key, which, cold, generator)
        self._bench_cost.seconds[key] = time.perf_counter() - began
        self._bench_cost.hvps[key] = result.num_hvps
        return result

    def _measure_noise(self, *args: Any, **kwargs: Any) -> None:
        began = time.perf_counter()
        super()._measure_noise(*args, **kwargs)
        self._bench_cost.seconds["noise"] = time.perf_counter() - began


# ----------------------------------------------------------------------------------- sessions
@dataclass(frozen=True)
class Arm:
    """One configuration: the callbacks its Trainer gets."""

    key: str
    name: str
    make: Callable[[], list[Callback]] = list


def overhead_arms(cfg: Config) -> list[Arm]:
    kwargs = dict(cfg.overhead_monitor)
    return [
        Arm("baseline", "baseline (no callback)"),
        Arm("control", "baseline again (A/A control)"),
        Arm("monitor", cfg.monitor_name, lambda: [CurvatureMonitor(**kwargs)]),
    ]


def compare_arms(every: int) -> list[Arm]:
    return [
        Arm("baseline", "baseline (no callback)"),
        Arm(
            "power",
            f"power iteration, top eigenvalue every {every} steps",
            lambda: [PowerIterationCheck(every)],
        ),
        Arm(
            "warm",
            f"CurvatureMonitor(every_n_steps={every}, max_overhead=None)",
            lambda: [RecordingMonitor(every_n_steps=every, max_overhead=None)],
        ),
        Arm(
            "cold",
            f"CurvatureMonitor(every_n_steps={every}, max_overhead=None, cold_start_every=1)",
            lambda: [RecordingMonitor(every_n_steps=every, max_overhead=None, cold_start_every=1)],
        ),
    ]


@dataclass
class Session:
    """Step times (ms, after the warm-up steps) and the callbacks of each configuration."""

    steps: dict[str, list[float]]
    callbacks: dict[str, Callback]
    seconds: float

    def total(self, key: str) -> float:
        return sum(self.steps[key]) / 1e3

    def overhead(self, key: str) -> float:
        return self.total(key) / self.total("baseline") - 1

    def base_step_ms(self) -> float:
        return statistics.median(self.steps["baseline"])

    def share(self, key: str, upto: int | None = None) -> float:
        """Training time of ``key`` over the baseline's, minus 1, over the first ``upto``
        measured steps."""
        return sum(self.steps[key][:upto]) / sum(self.steps["baseline"][:upto]) - 1


def run_session(arms: Sequence[Arm], cfg: bench.Config, data: TensorDataset, seed: int) -> Session:
    made: dict[str, Callback] = {}

    def factory(arm: Arm) -> Callable[[], list[Callback]]:
        def build() -> list[Callback]:
            callbacks = arm.make()
            if callbacks:
                made[arm.key] = callbacks[0]
            return callbacks

        return build

    setups = [
        bench.Setup(arm.name, arm.key, factory(arm), module=bench.BenchModule) for arm in arms
    ]
    began = time.perf_counter()
    steps = bench.lockstep_session(cfg, data, seed, setups)
    for arm in arms:
        assert len(steps[arm.key]) == cfg.measured_steps, (arm.key, len(steps[arm.key]))
    return Session(steps, made, time.perf_counter() - began)


def overhead_sessions(cfg: Config, data: TensorDataset, log: Console) -> list[Session]:
    sessions = []
    for index in range(cfg.warmup_sessions + cfg.overhead_sessions):
        warm = index < cfg.warmup_sessions
        name = "warm-up" if warm else f"{index + 1 - cfg.warmup_sessions}/{cfg.overhead_sessions}"
        # A warm-up session only needs the first steps (lazy initialisation, first logging).
        steps = 2 if warm else cfg.overhead_steps
        log.log(f"overhead session {name}: {steps} measured steps")
        session = run_session(overhead_arms(cfg), cfg.session(steps), data, seed=index)
        if not warm:
            sessions.append(session)
    return sessions


def compare_session(cfg: Config, data: TensorDataset, log: Console) -> Session:
    log.log(f"comparison session: {cfg.compare_steps} steps, checks every {cfg.every}")
    return run_session(compare_arms(cfg.every), cfg.session(cfg.compare_steps), data, seed=100)


# -------------------------------------------------------------------------------- statistics
def pct(value: float) -> str:
    return f"{100 * value:+.1f}%"


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


@dataclass(frozen=True)
class OverheadSession:
    """The default monitor in one overhead session: its checks and its share of training time
    (training time over the baseline's, minus 1) from the start to right after each check and
    to the end, with the A/A control's over the same steps."""

    records: list[CurvatureRecord]
    after_checks: list[float]
    control_after_checks: list[float]
    # The checks' own wall time (record.seconds, summed) over the baseline's training time,
    # from the start to right after each check.
    instrumented: list[float]
    end: float
    control_end: float
    base_total: float
    monitor_total: float
    next_check: int

    @property
    def worst(self) -> float:
        """The share right after the last check (the end of the run if none ran)."""
        return self.after_checks[-1] if self.after_checks else self.end

    @property
    def instrumented_worst(self) -> float:
        return self.instrumented[-1] if self.instrumented else 0.0

    @property
    def control_worst(self) -> float:
        return self.control_after_checks[-1] if self.control_after_checks else self.control_end


def overhead_stats(session: Session, warmup_steps: int) -> OverheadSession:
    mon = session.callbacks["monitor"]
    assert isinstance(mon, CurvatureMonitor)
    # A check at global step s follows the optimizer step of batch s - 1: it is timed in that
    # step, the (s - warmup_steps)-th measured one.
    upto = [max(1, record.step - warmup_steps) for record in mon.history]
    return OverheadSession(
        records=list(mon.history),
        after_checks=[session.share("monitor", n) for n in upto],
        control_after_checks=[session.share("control", n) for n in upto],
        instrumented=[
            sum(r.seconds for r in mon.history[: i + 1])
            / (sum(session.steps["baseline"][:n]) / 1e3)
            for i, n in enumerate(upto)
        ],
        end=session.share("monitor"),
        control_end=session.share("control"),
        base_total=session.total("baseline"),
        monitor_total=session.total("monitor"),
        next_check=mon.next_check_step,
    )


def check_seconds(callback: Callback) -> list[float]:
    if isinstance(callback, PowerIterationCheck):
        return [r.seconds for r in callback.history]
    assert isinstance(callback, CurvatureMonitor)
    return [r.seconds for r in callback.history]


def check_steps(callback: Callback) -> list[int]:
    if isinstance(callback, PowerIterationCheck):
        return [r.step for r in callback.history]
    assert isinstance(callback, CurvatureMonitor)
    return [r.step for r in callback.history]


def monitor(session: Session, key: str) -> RecordingMonitor:
    callback = session.callbacks[key]
    assert isinstance(callback, RecordingMonitor)
    return callback


def power(session: Session) -> PowerIterationCheck:
    callback = session.callbacks["power"]
    assert isinstance(callback, PowerIterationCheck)
    return callback


def relative_gap(a: float, b: float, scale: float) -> float:
    return abs(a - b) / scale if scale > 0 else float("nan")


def spectral_scale(record: CurvatureRecord) -> float:
    return max(abs(record.lambda_max), abs(record.lambda_min))


def lower_bounds(session: Session) -> dict[int, float]:
    """Per check step, the largest Rayleigh quotient any configuration found there: λ_max is
    at least that (Ritz values and power iteration's v·Hv never exceed it)."""
    bounds: dict[int, float] = {}
    for key in ("warm", "cold"):
        for r in monitor(session, key).history:
            bounds[r.step] = max(bounds.get(r.step, -math.inf), r.lambda_max)
    for p in power(session).history:
        bounds[p.step] = max(bounds.get(p.step, -math.inf), p.eigenvalue)
    return bounds


def off_by_more_than_tol(record: CurvatureRecord, bound: float, tol: float) -> bool:
    """Whether the check's λ_max is provably further from the true λ_max than the tolerance it
    claims (tol·ρ, ρ its own spectral-radius estimate): the run found another eigenvalue."""
    return record.converged and bound - record.lambda_max > tol * spectral_scale(record)


@dataclass(frozen=True)
class WarmCold:
    """Warm-started checks of the warm monitor against the cold monitor at the same steps."""

    steps: list[int]
    warm_hessian: list[int]
    cold_hessian: list[int]
    warm_pre: list[int]
    cold_pre: list[int]
    warm_total: list[int]
    cold_total: list[int]
    max_gap: float  # max |lambda_max warm - cold| / spectral radius, over every check
    max_gap_min: float  # the same for lambda_min
    max_min_relative: float  # max |lambda_min warm - cold| / |lambda_min cold|
    warm_off: list[int]  # steps where the warm check's lambda_max is off by more than tol
    cold_off: list[int]
    max_power_gap: float  # max |power - cold lambda_max| / |cold lambda_max|


def warm_cold(session: Session) -> WarmCold:
    warm, cold, pw = monitor(session, "warm"), monitor(session, "cold"), power(session)
    pairs = list(zip(warm.history, cold.history, warm.costs, cold.costs, strict=True))
    warmed = [(w, c, wc, cc) for w, c, wc, cc in pairs if w.warm_start]
    power_by_step = {r.step: r for r in pw.history}
    bounds = lower_bounds(session)
    power_gaps = [
        relative_gap(power_by_step[c.step].eigenvalue, c.lambda_max, abs(c.lambda_max))
        for c in cold.history
        if c.step in power_by_step
    ]
    return WarmCold(
        steps=[w.step for w, _, _, _ in warmed],
        warm_hessian=[wc.hvps.get("hessian", 0) for _, _, wc, _ in warmed],
        cold_hessian=[cc.hvps.get("hessian", 0) for _, _, _, cc in warmed],
        warm_pre=[wc.hvps.get("preconditioned", 0) for _, _, wc, _ in warmed],
        cold_pre=[cc.hvps.get("preconditioned", 0) for _, _, _, cc in warmed],
        warm_total=[w.num_hvps for w, _, _, _ in warmed],
        cold_total=[c.num_hvps for _, c, _, _ in warmed],
        max_gap=max(
            relative_gap(w.lambda_max, c.lambda_max, spectral_scale(c)) for w, c, _, _ in pairs
        ),
        max_gap_min=max(
            relative_gap(w.lambda_min, c.lambda_min, spectral_scale(c)) for w, c, _, _ in pairs
        ),
        max_min_relative=max(
            relative_gap(w.lambda_min, c.lambda_min, abs(c.lambda_min)) for w, c, _, _ in pairs
        ),
        warm_off=[
            w.step for w in warm.history if off_by_more_than_tol(w, bounds[w.step], warm.tol)
        ],
        cold_off=[
            c.step for c in cold.history if off_by_more_than_tol(c, bounds[c.step], cold.tol)
        ],
        max_power_gap=max(power_gaps) if power_gaps else float("nan"),
    )


# ---------------------------------------------------------------------- cost of a Lanczos step
@dataclass(frozen=True)
class StepCost:
    """Median wall time of one call, per HVP or Lanczos step, and its ratio to a bare HVP."""

    key: str
    name: str
    steps: int
    ms: float
    per_step: float
    ratio: float


def probe_loss(module: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    inputs, labels = batch
    return F.cross_entropy(module(inputs), labels)


def step_costs(cfg: Config, data: TensorDataset) -> list[StepCost]:
    """One gradient, one bare HVP, HessianOperator.matvec and lanczos_eigenvalues for a fixed
    number of steps (tol=0), on the benchmark model at initialisation and its first batch, in
    interleaved rounds (one warm-up round)."""
    torch.manual_seed(0)
    module = bench.BenchModule(cfg.model)
    batch = (data.tensors[0][: cfg.model.batch], data.tensors[1][: cfg.model.batch])
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(probe_loss(module, batch), params, create_graph=True)
    runs: dict[str, tuple[str, int, Callable[[], object]]] = {}
    with HessianOperator(module, probe_loss, batch) as operator:
        vector = torch.randn(operator.size, generator=torch.Generator().manual_seed(1))
        vector = vector / torch.linalg.vector_norm(vector)
        pieces = operator.split(vector)
        runs["gradient"] = (
            "one gradient (forward + backward)",
            1,
            lambda: torch.autograd.grad(probe_loss(module, batch), params),
        )
        runs["hvp"] = (
            "one bare HVP: autograd.grad(grads, params, grad_outputs=v, retain_graph=True)",
            1,
            lambda: torch.autograd.grad(grads, params, grad_outputs=pieces, retain_graph=True),
        )
        runs["matvec"] = ("HessianOperator.matvec", 1, lambda: operator.matvec(vector))
        for steps in cfg.lanczos_steps:
            runs[f"lanczos{steps}"] = (
                f'lanczos_eigenvalues(which="both", tol=0, max_hvps={steps})',
                steps,
                functools.partial(
                    lanczos_eigenvalues,
                    operator,
                    which="both",
                    tol=0.0,
                    max_hvps=steps,
                    generator=torch.Generator().manual_seed(2),
                ),
            )
        times: dict[str, list[float]] = {key: [] for key in runs}
        for round_index in range(cfg.cost_rounds + 1):
            for key, (_, _, run) in runs.items():
                began = time.perf_counter()
                run()
                if round_index:  # the first round warms up
                    times[key].append(1e3 * (time.perf_counter() - began))
    hvp = times["hvp"]
    return [
        StepCost(
            key=key,
            name=name,
            steps=steps,
            ms=statistics.median(times[key]),
            per_step=statistics.median(times[key]) / steps,
            ratio=statistics.median(t / steps / h for t, h in zip(times[key], hvp, strict=True)),
        )
        for key, (name, steps, _) in runs.items()
    ]


def step_cost_report(costs: Sequence[StepCost], cfg: Config) -> Report:
    headers = ["Operation", "ms per call", "steps", "ms per HVP or step", "per step / bare HVP"]
    rows = [
        [c.name, f"{c.ms:.1f}", str(c.steps), f"{c.per_step:.1f}", f"{c.ratio:.2f}"] for c in costs
    ]
    note = (
        f"Medians of {cfg.cost_rounds} interleaved rounds (after one warm-up round) in the main "
        f"thread, torch threads = {torch.get_num_threads()}, on the benchmark model at "
        "initialisation and its first batch (operator and create_graph gradient built once). "
        "per step / bare HVP: median over rounds of the ratio. A Lanczos step is one "
        "HessianOperator.matvec plus the Lanczos recurrence, the full reorthogonalisation of "
        "the new vector against the basis (classical Gram-Schmidt, twice) and the tridiagonal "
        "eigenproblem for the stopping test; the basis is allocated anew at every run."
    )
    return Report("Cost of one Lanczos step against one HVP", headers, rows, note)


# ------------------------------------------------------------------------------------ reports
def overhead_report(
    sessions: Sequence[Session], stats: Sequence[OverheadSession], cfg: Config
) -> Report:
    headers = [
        "Session",
        "training s: baseline / A/A / monitor",
        "checks at steps",
        "s per check",
        "HVPs per check",
        "share right after each check (A/A) [checks' own time]",
        "share at the end (A/A)",
        "next check due at step",
    ]
    rows = []
    for index, (session, st) in enumerate(zip(sessions, stats, strict=True), start=1):
        rows.append(
            [
                str(index),
                f"{st.base_total:.1f} / {session.total('control'):.1f} / {st.monitor_total:.1f}",
                ", ".join(str(r.step) for r in st.records) or "none",
                ", ".join(f"{r.seconds:.2f}" for r in st.records) or "—",
                ", ".join(str(r.num_hvps) for r in st.records) or "—",
                ", ".join(
                    f"{pct(a)} ({pct(c)}) [{pct(i)[1:]}]"
                    for a, c, i in zip(
                        st.after_checks, st.control_after_checks, st.instrumented, strict=True
                    )
                )
                or "—",
                f"{pct(st.end)} ({pct(st.control_end)})",
                str(st.next_check),
            ]
        )
    rows.append(
        [
            "median",
            "—",
            "—",
            "—",
            "—",
            f"{pct(statistics.median(st.worst for st in stats))} "
            f"({pct(statistics.median(st.control_worst for st in stats))}) "
            f"[{pct(statistics.median(st.instrumented_worst for st in stats))[1:]}] after the "
            "last check",
            f"{pct(statistics.median(st.end for st in stats))} "
            f"({pct(statistics.median(st.control_end for st in stats))})",
            "—",
        ]
    )
    base_ms = statistics.median(t for s in sessions for t in s.steps["baseline"])
    note = (
        f"{cfg.monitor_name} against no callback and an A/A control (a second baseline: what "
        f"a zero overhead measures as), in {len(sessions)} lock-step sessions (after "
        f"{cfg.warmup_sessions} short warm-up session) of {cfg.overhead_steps} measured steps "
        f"(after {cfg.warmup_steps} warm-up steps), "
        f"{' + '.join(f'{s.seconds:.0f}' for s in sessions)} s. training s: the sum of the "
        "measured steps' wall times, each from its on_train_batch_start to the next, so a check "
        "is part of the step it follows. share = the configuration's training time over the "
        "baseline's over the same steps, minus 1, from the first measured step to the step the "
        "check followed (right after a check: the worst moment to stop a run) and to the end; "
        "checks' own time: the checks' record.seconds summed, over the baseline's training time "
        "to the same step. "
        f"Median baseline step {base_ms:.1f} ms. HVPs per check = record.num_hvps (the Lanczos "
        "runs on H and, the optimizer being AdamW, on P^-1 H); a check also builds the operator "
        "(forward + gradient with create_graph=True) and computes the extra gradients of the "
        "noise-scale estimate. next check due: CurvatureMonitor.next_check_step at the end."
    )
    return Report("Amortised overhead at the defaults", headers, rows, note)


def compare_report(session: Session, cfg: Config) -> Report:
    base_ms = session.base_step_ms()
    headers = [
        "Configuration",
        "training s",
        "overhead",
        "checks",
        "s per check (median)",
        "check / baseline step",
        "HVPs per check (mean)",
        "of which: H both ends / P^-1 H top",
        "s per check: H / P^-1 H / noise scale / rest",
        "computes",
    ]
    pw = power(session)
    seconds = check_seconds(pw)
    hvps = [r.hvps for r in pw.history]
    unconverged = sum(not r.converged for r in pw.history)
    rows = [
        ["baseline (no callback)", f"{session.total('baseline'):.1f}", pct(0.0), *["—"] * 7],
        [
            compare_arms(cfg.every)[1].name,
            f"{session.total('power'):.1f}",
            pct(session.overhead("power")),
            str(len(pw.history)),
            f"{statistics.median(seconds):.2f}" if seconds else "—",
            f"{1e3 * statistics.median(seconds) / base_ms:.0f}x" if seconds else "—",
            f"{mean(hvps):.1f} (min {min(hvps, default=0)}, max {max(hvps, default=0)})",
            "—",
            "—",
            f"λ_max (power iteration; {unconverged} of {len(hvps)} checks hit 100 iterations)",
        ],
    ]
    for key, arm in zip(("warm", "cold"), compare_arms(cfg.every)[2:], strict=True):
        mon = monitor(session, key)
        seconds = check_seconds(mon)
        totals = [r.num_hvps for r in mon.history]
        hessian = [c.hvps.get("hessian", 0) for c in mon.costs]
        pre = [c.hvps.get("preconditioned", 0) for c in mon.costs]

        def part(name: str, costs: Sequence[CheckCost] = mon.costs) -> float:
            return statistics.median(c.seconds.get(name, 0.0) for c in costs)

        rest = statistics.median(
            r.seconds - sum(c.seconds.values()) for r, c in zip(mon.history, mon.costs, strict=True)
        )
        rows.append(
            [
                arm.name,
                f"{session.total(key):.1f}",
                pct(session.overhead(key)),
                str(len(mon.history)),
                f"{statistics.median(seconds):.2f}",
                f"{1e3 * statistics.median(seconds) / base_ms:.0f}x",
                f"{mean(totals):.1f} (min {min(totals)}, max {max(totals)})",
                f"{mean(hessian):.1f} / {mean(pre):.1f}",
                f"{part('hessian'):.2f} / {part('preconditioned'):.2f} / {part('noise'):.2f} / "
                f"{rest:.2f}",
                "λ_max, λ_min (Lanczos, tol 1e-2·ρ), λ_max(P^-1 H), noise scale",
            ]
        )
    note = (
        f"One lock-step session of {cfg.compare_steps} measured steps (after "
        f"{cfg.warmup_steps} warm-up steps), {session.seconds:.0f} s; checks every "
        f"{cfg.every} steps, after the optimizer step. overhead = training s / the baseline's "
        f"− 1 (median baseline step {base_ms:.1f} ms). check / baseline step: the median check "
        "in median baseline steps. For the monitors, H = the Lanczos run for both ends of the "
        "Hessian, P^-1 H = the run for the preconditioned sharpness (AdamW), noise scale = its "
        "extra gradients, rest = the operator build (forward + gradient with "
        "create_graph=True) and the record (medians of each part over the checks, so they need "
        "not add up to the median check). The first check of each monitor is cold, and the warm "
        "one starts cold again every 10th check."
    )
    return Report(f"Checks every {cfg.every} steps", headers, rows, note)


def warm_cold_report(session: Session) -> Report:
    warm, cold, pw = monitor(session, "warm"), monitor(session, "cold"), power(session)
    power_by_step = {r.step: r for r in pw.history}
    bounds = lower_bounds(session)

    def off(record: CurvatureRecord, tol: float) -> str:
        return "YES" if off_by_more_than_tol(record, bounds[record.step], tol) else "no"

    headers = [
        "step",
        "warm monitor: start",
        "HVPs warm: H / P^-1 H",
        "HVPs cold: H / P^-1 H",
        "λ_max warm",
        "λ_max cold",
        "|Δλ_max| / ρ",
        "λ_max off by > tol·ρ: warm / cold",
        "λ_min warm / cold",
        "power iteration λ (HVPs)",
    ]
    rows = []
    for w, c, wc, cc in zip(warm.history, cold.history, warm.costs, cold.costs, strict=True):
        p = power_by_step.get(c.step)
        rows.append(
            [
                str(c.step),
                "warm" if w.warm_start else "cold",
                f"{wc.hvps.get('hessian', 0)} / {wc.hvps.get('preconditioned', 0)}",
                f"{cc.hvps.get('hessian', 0)} / {cc.hvps.get('preconditioned', 0)}",
                f"{w.lambda_max:.4g}",
                f"{c.lambda_max:.4g}",
                f"{relative_gap(w.lambda_max, c.lambda_max, spectral_scale(c)):.1e}",
                f"{off(w, warm.tol)} / {off(c, cold.tol)}",
                f"{w.lambda_min:.4g} / {c.lambda_min:.4g}",
                "—" if p is None else f"{p.eigenvalue:.4g} ({p.hvps})",
            ]
        )
    note = (
        "Check by check in the comparison session: the warm monitor (warm starts from the "
        "previous check's Ritz vectors, cold every 10th check) against the always-cold one, on "
        "the same Hessians (a check does not change the trajectory: the same weights at the same "
        "step). ρ = max(|λ_max|, |λ_min|) of the cold check; the monitors stop when the Ritz "
        "residuals are <= 1e-2·ρ (tol=1e-2), each residual bounding the distance to the "
        "nearest eigenvalue. λ_max off by > tol·ρ: a Ritz value and power iteration's v·Hv "
        "never exceed λ_max, so when the largest of the three values at a step exceeds a "
        "converged check's λ_max by more than that check's tol·ρ, the check's run converged "
        "to another eigenvalue."
    )
    return Report("Warm against cold starts, check by check", headers, rows, note)


# ------------------------------------------------------------------------------------ verdicts
def overhead_verdict(stats: Sequence[OverheadSession], base_ms: float, cfg: Config) -> Verdict:
    worst = statistics.median(st.worst for st in stats)
    end = statistics.median(st.end for st in stats)
    noise = max(abs(x) for st in stats for x in (st.control_worst, st.control_end))
    checked = [st for st in stats if st.records]
    detail = (
        f"From the start of a {cfg.overhead_steps}-step run to right after its last check (the "
        f"worst moment to stop), the monitor's share of training time is {pct(worst)} (median "
        f"of {len(stats)} sessions: {', '.join(pct(st.worst) for st in stats)}); to the end of "
        f"the run {pct(end)}. The A/A control measures up to {pct(noise)} in magnitude at the "
        "same points."
    )
    if checked:
        first = [st.records[0] for st in checked]
        seconds = statistics.median(r.seconds for r in first)
        detail += (
            f" The first check came at step {', '.join(str(r.step) for r in first)} (the budget "
            "defers it until the training time so far pays for its predicted cost) and took "
            f"{seconds:.2f} s, {statistics.median(r.num_hvps for r in first):g} HVPs (medians), "
            f"the time of {1e3 * seconds / base_ms:.0f} baseline steps ({base_ms:.1f} ms): "
            + (
                "more than the 5% of the training time before it that the budget had predicted "
                "it would fit in. "
                if worst > TARGET_OVERHEAD
                else "within 5% of the training time before it. "
            )
            + "The bucket then repays: the next check is due at step "
            f"{', '.join(str(st.next_check) for st in checked)}, where the share would be down "
            f"to about {pct(seconds / (checked[0].next_check * base_ms / 1e3))} (projected from "
            "the median check and baseline step)."
        )
    else:
        detail += " No check ran within the run: the budget deferred every one."
    if worst > TARGET_OVERHEAD + noise:
        met: bool | None = False
    elif worst <= TARGET_OVERHEAD - noise:
        met = True
    else:
        own = statistics.median(st.instrumented_worst for st in stats)
        met = own <= TARGET_OVERHEAD
        detail += (
            " The step times cannot resolve the difference from 5% (the A/A control's error); "
            "the checks' own wall time (record.seconds) is "
            f"{', '.join(pct(st.instrumented_worst)[1:] for st in stats)} of the baseline's "
            "training time up to right after the last check: decided on that "
            f"(median {pct(own)[1:]})."
        )
    defaults = "" if cfg.overhead_monitor else " at its defaults"
    return Verdict(
        f"{cfg.monitor_name}{defaults} <= {100 * TARGET_OVERHEAD:g}% of training time (amortised)",
        met,
        detail,
    )


def verdicts(
    stats: Sequence[OverheadSession],
    base_ms: float,
    session: Session,
    costs: Sequence[StepCost],
    cfg: Config,
) -> list[Verdict]:
    pw = power(session)
    power_overhead = session.overhead("power")
    hvps = [r.hvps for r in pw.history]
    low, high = ISSUE_POWER_RANGE
    warm = monitor(session, "warm")
    warm_overhead = session.overhead("warm")
    power_detail = (
        f"Measured {pct(power_overhead)}: {len(hvps)} checks of {mean(hvps):.1f} HVPs on "
        f"average (median {statistics.median(check_seconds(pw)):.2f} s per check against a "
        f"{session.base_step_ms():.1f} ms baseline step, i.e. {cfg.every} steps of training "
        f"take {cfg.every * session.base_step_ms() / 1e3:.2f} s). CurvatureMonitor at the "
        f"same cadence (every_n_steps={cfg.every}, max_overhead=None) costs "
        f"{pct(warm_overhead)}, {mean([r.num_hvps for r in warm.history]):.1f} HVPs per check "
        "for λ_max, λ_min and the preconditioned sharpness, plus the noise scale."
    )
    power_verdict = Verdict(
        f"the issue's premise: a top-eigenvalue check every {cfg.every} steps with a "
        f"power-iteration tool costs {100 * low:.0f}-{100 * high:.0f}% here",
        low <= power_overhead <= high,
        power_detail,
    )
    hessian_hvps = mean([c.hvps.get("hessian", 0) for c in warm.costs])
    hessian_s = statistics.median(c.seconds.get("hessian", 0.0) for c in warm.costs)
    by_key = {c.key: c for c in costs}
    hvp, lanczos = by_key["hvp"], [c for c in costs if c.key.startswith("lanczos")]
    power_s = statistics.median(check_seconds(pw))
    cheaper_detail = (
        f"{pct(warm_overhead)} against {pct(power_overhead)} (same session, same steps); per "
        f"check {statistics.median(check_seconds(warm)):.2f} s against {power_s:.2f} s "
        "(medians). A check does more (λ_min, the sharpness AdamW sees, the noise scale); its "
        f"Lanczos run on H alone takes {hessian_s:.2f} s for {hessian_hvps:.1f} HVPs on "
        f"average ({1e3 * hessian_s / hessian_hvps:.0f} ms per step), the power iteration "
        f"{power_s:.2f} s for {mean(hvps):.1f} HVPs ({1e3 * power_s / mean(hvps):.0f} ms per "
        f"HVP, operator build included). Outside the Trainer a bare HVP takes {hvp.ms:.1f} ms "
        "and a Lanczos step "
        + ", ".join(f"{c.per_step:.1f} ms ({c.ratio:.2f}x) over {c.steps} steps" for c in lanczos)
        + "; besides its HVP, a step reorthogonalises against the whole basis (classical "
        "Gram-Schmidt, twice), reading the basis twice, a cost that grows with the basis."
    )
    cheaper = Verdict(
        f"CurvatureMonitor every {cfg.every} steps costs less than the power-iteration check "
        "at the same cadence",
        warm_overhead < power_overhead,
        cheaper_detail,
    )

    wc = warm_cold(session)
    target = "warm-started checks spend fewer HVPs than cold ones, with the same λ_max"
    if wc.steps:
        fewer = mean(wc.warm_hessian) < mean(wc.cold_hessian)
        detail = (
            f"Over the {len(wc.steps)} warm-started checks, the Lanczos run on H took "
            f"{mean(wc.warm_hessian):.1f} HVPs on average warm against "
            f"{mean(wc.cold_hessian):.1f} cold at the same steps; the preconditioned run "
            f"{mean(wc.warm_pre):.1f} against {mean(wc.cold_pre):.1f}; record.num_hvps (both "
            f"runs) {mean(wc.warm_total):.1f} against {mean(wc.cold_total):.1f}. λ_max differs "
            f"by up to {wc.max_gap:.1e}·ρ between warm and cold (tol = {warm.tol:g}). "
        )
        if wc.warm_off or wc.cold_off:
            detail += (
                "A converged check's λ_max was provably off by more than its tol·ρ (another "
                "check's Ritz value or power iteration's v·Hv at the same step exceeds it by "
                f"more: its run converged to another eigenvalue) at step(s) "
                f"{', '.join(map(str, wc.warm_off)) or 'none'} warm and "
                f"{', '.join(map(str, wc.cold_off)) or 'none'} cold. "
            )
        else:
            detail += "No check's λ_max is off by more than its tolerance. "
        loosest = max(
            warm.tol * spectral_scale(c) / abs(c.lambda_min)
            for c in monitor(session, "cold").history
        )
        detail += (
            f"λ_min differs by up to {wc.max_gap_min:.1e}·ρ, {100 * wc.max_min_relative:.0f}% "
            "of |λ_min|: the tolerance is relative to ρ, so λ_min is only known to ±tol·ρ, up "
            f"to {100 * loosest:.0f}% of |λ_min| at these checks. Power iteration's λ_max "
            f"differs from the cold monitor's by up to {100 * wc.max_power_gap:.1f}%."
        )
        warm_verdict = Verdict(target, fewer and not wc.warm_off, detail)
    else:
        warm_verdict = Verdict(target, None, "No warm-started check in this run.")
    return [overhead_verdict(stats, base_ms, cfg), power_verdict, cheaper, warm_verdict]


# ------------------------------------------------------------------------------------- output
def environment_line(elapsed: float, cfg: Config, loads: tuple[float, float]) -> str:
    mode = " --quick" if cfg.quick else ""
    if torch.get_num_threads() != THREADS:
        mode += f" --threads {torch.get_num_threads()}"
    return (
        f"Measured {datetime.date.today().isoformat()} at commit "
        f"{library_revision(LIBRARY_PATHS)} with torch {torch.__version__}, lightning "
        f"{lightning.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs "
        f"({bench.cpu_model()}; torch threads: {torch.get_num_threads()}), no GPU; command "
        f"`{COMMAND}{mode}` (whole run {elapsed:.0f} s; `--update-docs` rewrites this section). "
        f"Load average (1 min) at the start and the end of the run: {loads[0]:.1f}, "
        f"{loads[1]:.1f}."
    )


def setup_text(cfg: Config) -> str:
    m = cfg.model
    tensors, _, params = bench.model_facts(m)
    return (
        "Model: the benchmark model of the Callbacks section (`benchmarks/callbacks.py`): a "
        f"residual MLP in float32, Linear {m.features}→{m.width}, {m.blocks} pre-LayerNorm "
        f"blocks x + GELU(Linear(LayerNorm(x))), Linear head →{m.classes}: {tensors} parameter "
        f"tensors, {params:,} parameters; cross-entropy on fixed synthetic batches of {m.batch} "
        f"(standard-normal inputs, random labels), AdamW (lr {m.lr:g}); a real Trainer with a "
        f"CSV logger (log_every_n_steps={m.log_every_n_steps}), a fresh model with the same "
        "initial weights for every fit. The probe of every check is the first training batch.\n\n"
        "Configurations: **CurvatureMonitor()** at its defaults (every_n_steps=100, "
        "max_overhead=0.05, tol=1e-2, max_hvps=40, k=1, noise_scale=True, "
        "cold_start_every=10): a check is due every 100 steps, and deferred until the time of "
        "the checks so far plus the predicted cost of the next fits in 5% of the training time "
        "so far; each check runs Lanczos for both ends of H, Lanczos for the top of P^-1 H (the "
        "sharpness AdamW sees) and the extra gradients of the noise-scale estimate. "
        f"**power iteration**: a callback written for this benchmark doing what PyHessian's "
        f"top-eigenvalue routine does, every {cfg.every} steps: the probe loss, its gradient "
        "with create_graph=True, then from a random unit vector v ← Hv/‖Hv‖ with Hv = "
        "autograd.grad(grads, params, grad_outputs=v, retain_graph=True), estimate v·Hv, stop "
        f"when |new − old|/(|old| + 1e-6) < {POWER_TOL:g} or after {POWER_MAX_ITERS} "
        "iterations (PyHessian's tol and maxIter); it finds λ_max only. "
        f"**CurvatureMonitor(every_n_steps={cfg.every}, max_overhead=None)**: the same cadence, "
        "never deferred, warm starts (cold every 10th check); with **cold_start_every=1** "
        "every check starts cold.\n\n"
        f"torch runs {torch.get_num_threads()} intra-op thread(s), as in the Callbacks section "
        "(other processes share the 2 cores)."
    )


def markdown_section(
    reports: Sequence[Report], found: Sequence[Verdict], header: str, cfg: Config
) -> str:
    tables = [markdown_table(report) for report in reports]
    targets = "\n".join(wrap(f"**{status(v)}:** {v.target}. {v.detail}", "- ", "  ") for v in found)
    prose = [wrap(paragraph) for paragraph in [header, *setup_text(cfg).split("\n\n")]]
    return "\n\n".join([*prose, *tables, "### Targets", targets])


# --------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, under 20 s")
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"torch intra-op threads (default {THREADS}: robust to load from other processes)",
    )
    parser.add_argument(
        "--update-docs", action="store_true", help=f"rewrite '{SECTION_HEADING}' in {DOCS_PATH}"
    )
    args = parser.parse_args(argv)
    if args.quick and args.update_docs:
        parser.error("--update-docs records the full benchmark; drop --quick")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    bench.quiet_lightning()
    load_start = os.getloadavg()[0]
    began = time.perf_counter()
    out, log = Console(width=200), Console(stderr=True)
    data = bench.dataset(cfg.session(max(cfg.overhead_steps, cfg.compare_steps)))

    sessions = overhead_sessions(cfg, data, log)
    session = compare_session(cfg, data, log)
    log.log("cost of one Lanczos step")
    costs = step_costs(cfg, data)
    stats = [overhead_stats(s, cfg.warmup_steps) for s in sessions]
    base_ms = statistics.median(t for s in sessions for t in s.steps["baseline"])

    reports = [
        overhead_report(sessions, stats, cfg),
        compare_report(session, cfg),
        warm_cold_report(session),
        step_cost_report(costs, cfg),
    ]
    found = verdicts(stats, base_ms, session, costs, cfg)
    loads = (load_start, os.getloadavg()[0])
    header = environment_line(time.perf_counter() - began, cfg, loads)
    for report in reports:
        out.print(rich_table(report))
        out.print()
    if cfg.quick:
        out.print(
            Text("--quick: small model, short runs; the targets are defined for the full run")
        )
    for verdict in found:
        style = {True: "green", False: "red", None: "yellow"}[verdict.met]
        out.print(Text(verdict_line(verdict), style=style))
    out.print(header)
    if args.update_docs:
        update_docs(SECTION_HEADING, markdown_section(reports, found, header, cfg))
        out.print(f"updated '{SECTION_HEADING}' in {DOCS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
