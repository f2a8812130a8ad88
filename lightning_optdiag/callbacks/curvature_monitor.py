"""CurvatureMonitor: Hessian eigenvalues of the training loss during training."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from typing_extensions import override

from lightning_optdiag._validation import check_float, check_int
from lightning_optdiag.callbacks._swap import unwrap
from lightning_optdiag.curvature import (
    EigenResult,
    HessianOperator,
    NonFiniteLossError,
    ScaledOperator,
    SpectralDensity,
    all_reduce_mean,
    estimate_spectral_density,
    estimate_trace,
    isolated_forward,
    lanczos_eigenvalues,
)
from lightning_optdiag.report.tensorboard import write_density_histogram
from lightning_optdiag.signals import (
    GradientNoiseScale,
    NoiseScaleEstimate,
    optimizer_family,
    stability_rule,
)

__all__ = ["CurvatureMonitor", "CurvatureRecord"]

PREFIX = "optdiag/hessian"
LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class CurvatureRecord:
    """One curvature check.

    Attributes:
        step: ``trainer.global_step`` after the optimizer step the check followed.
        lambda_max: largest eigenvalue of the training-loss Hessian on the probe batch.
        lambda_min: smallest eigenvalue.
        top_k: the ``k`` largest eigenvalues, descending.
        bottom_k: the ``k`` smallest eigenvalues, ascending.
        residual_max: Ritz residual of ``lambda_max`` (a bound on its error).
        residual_min: Ritz residual of ``lambda_min``.
        converged: both ends met the residual tolerance.
        loss: the probe loss.
        grad_norm: the probe gradient norm (local to this process).
        sharpness: what the optimizer's stability depends on: ``lambda_max`` for SGD,
            ``lambda_max(P^-1 H)`` for adaptive optimizers; ``None`` when unsupported.
        stability_threshold: the largest stable sharpness for the optimizer's current settings.
        sharpness_ratio: ``sharpness / stability_threshold`` (1: the edge of stability).
        optimizer_family: see :func:`~lightning_optdiag.signals.stability_rule`.
        trace: Hutch++ estimate of ``tr(H)`` when ``trace=True``.
        trace_standard_error: its standard error.
        noise_scale: the simple gradient noise scale ``B_simple`` (smoothed) when measured;
            ``inf`` while the estimate of ``|G|^2`` is not positive (the gradient signal is lost
            in the noise), which is kept here but not logged.
        noise_to_signal: ``B_simple / batch size``.
        num_hvps: Hessian-vector products spent.
        seconds: wall time of the check.
        warm_start: whether the eigenvalue runs were warm-started.
    """

    step: int
    lambda_max: float
    lambda_min: float
    top_k: list[float]
    bottom_k: list[float]
    residual_max: float
    residual_min: float
    converged: bool
    loss: float
    grad_norm: float
    sharpness: float | None = None
    stability_threshold: float | None = None
    sharpness_ratio: float | None = None
    optimizer_family: str | None = None
    trace: float | None = None
    trace_standard_error: float | None = None
    noise_scale: float | None = None
    noise_to_signal: float | None = None
    num_hvps: int = 0
    seconds: float = 0.0
    warm_start: bool = False


class CurvatureMonitor(Callback):
    r"""Estimates the extreme Hessian eigenvalues of the training loss while training runs.

    Every ``every_n_steps`` optimizer steps (stretched when checks are expensive, see
    ``max_overhead``), and whenever :meth:`measure` is called (the :class:`TrainingDoctor` does
    on a plateau), it builds the Hessian of the training loss on a fixed probe (the first
    ``probe_batches`` training batches, kept for the whole run) and runs Lanczos for
    ``lambda_max`` and ``lambda_min``, warm-started from the previous check's Ritz vectors (cold
    every ``cold_start_every`` checks, so that a new outlier is not missed).

    It also measures the **sharpness ratio**: the sharpness the optimizer in use sees against
    its stability threshold (field guide section 3): ``lambda_max`` against ``2 / lr`` for SGD
    and ``2 (1 + momentum) / lr`` with heavy-ball momentum; for the Adam family the
    preconditioned sharpness ``lambda_max(P^-1 H)``, ``P = diag(sqrt(v_hat) + eps)`` from the
    optimizer's own state, against ``(2 + 2 beta1) / ((1 - beta1) lr)``. A ratio near 1 is the
    edge of stability, above 1 means the learning rate is too high for the curvature.

    And the **gradient noise scale** (field guide section 4) from gradients at two batch sizes on
    the current training batch (a fresh one at every check; a fixed batch would freeze its own
    sampling error into the estimate): ``noise_chunks`` equal chunks against their mean, which
    under DDP is also averaged over processes.

    The check never changes the training trajectory: the probe loss runs under
    :func:`~lightning_optdiag.curvature.isolated_forward` (modes, buffers such as BatchNorm
    statistics, ``.grad`` and RNG states restored), on the LightningModule itself rather than
    the DDP wrapper (no gradient synchronisation is triggered). Under DDP every process uses its
    own probe and the Hessian-vector products are averaged, so the eigenvalues are those of the
    Hessian of the global probe batch; the checks stay in lock-step across processes.

    The loss is the module's ``training_step`` on the probe batch with ``self.log`` muted
    (its loss must be returned as a tensor or under ``"loss"``); pass ``loss_fn(module, batch)``
    to use something else, which is required under manual optimization. ``training_step`` is
    then called beyond the Trainer's own calls (once per probe batch, and ``noise_chunks`` times
    for the noise scale at each check): side effects in it other than logging (appending to a
    list, counters) happen again; read such values in a callback's ``on_train_batch_end``
    instead, or pass ``loss_fn``.

    Curvature is undefined where the probe loss is NaN or infinite (weights gone bad under
    ``NonFiniteGuard(action="warn")``, say): such a check is skipped, counted in
    ``skipped_checks`` and warned about once, and training goes on.

    Logged (rank zero): ``optdiag/hessian/lambda_max``, ``optdiag/hessian/lambda_min``,
    ``optdiag/hessian/sharpness``, ``optdiag/hessian/stability_threshold``,
    ``optdiag/hessian/sharpness_ratio``, ``optdiag/hessian/trace`` (with ``trace=True``),
    ``optdiag/hessian/noise_scale``, ``optdiag/hessian/num_hvps``; the spectral density
    (``density=True``) as the TensorBoard histogram ``optdiag/hessian/density``.

    Args:
        every_n_steps: optimizer steps between checks (the shortest interval).
        probe_batches: how many of the first training batches form the fixed probe.
        k: eigenvalues at each end of the spectrum.
        tol: Lanczos residual tolerance relative to the spectral radius.
        max_hvps: most Hessian-vector products per eigenvalue run.
        trace: also estimate ``tr(H)`` (Hutch++) at each check.
        trace_hvps: products spent on the trace.
        density: also estimate the spectral density (stochastic Lanczos quadrature).
        density_probes: random probes for the density.
        density_steps: Lanczos steps per density probe.
        noise_scale: measure the gradient noise scale at each check.
        noise_chunks: the current training batch is cut into this many chunks for the noise
            scale (one extra gradient per chunk, about one training step in all).
        loss_fn: ``loss_fn(module, batch) -> scalar`` replacing the muted ``training_step``.
        params: restrict the Hessian to a submodule or parameter name prefix (``"encoder"``).
        max_overhead: largest share of training time the checks may take, counted from the
            start of the run: a check is deferred until the training time it needs has passed,
            including the first (``None``: checks every ``every_n_steps`` whatever they cost).
            On-demand checks (:meth:`measure`) always run, and count towards the budget.
        cold_start_every: every how many checks the eigenvalue runs start from a random vector.
        optimizer_index: which of the trainer's optimizers the sharpness ratio refers to.
        seed: seed of the random start vectors (the same on every process).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range.

    Example::

        from lightning.pytorch import Trainer
        from lightning_optdiag.callbacks import CurvatureMonitor

        curvature = CurvatureMonitor(every_n_steps=100)
        trainer = Trainer(callbacks=[curvature])
        trainer.fit(model)
        print(curvature.latest.lambda_max, curvature.latest.sharpness_ratio)
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        probe_batches: int = 1,
        k: int = 1,
        tol: float = 1e-2,
        max_hvps: int = 40,
        trace: bool = False,
        trace_hvps: int = 30,
        density: bool = False,
        density_probes: int = 2,
        density_steps: int = 30,
        noise_scale: bool = True,
        noise_chunks: int = 8,
        loss_fn: LossFn | None = None,
        params: str | None = None,
        max_overhead: float | None = 0.05,
        cold_start_every: int = 10,
        optimizer_index: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        self.probe_batches = check_int("probe_batches", probe_batches, minimum=1)
        self.k = check_int("k", k, minimum=1)
        self.tol = check_float("tol", tol, minimum=0.0)
        self.max_hvps = check_int("max_hvps", max_hvps, minimum=max(2, k))
        for name, flag in (("trace", trace), ("density", density), ("noise_scale", noise_scale)):
            if not isinstance(flag, bool):
                raise TypeError(f"Invalid {name}: {flag!r} (expected a bool)")
        self.trace = trace
        self.trace_hvps = check_int("trace_hvps", trace_hvps, minimum=6)
        self.density = density
        self.density_probes = check_int("density_probes", density_probes, minimum=1)
        self.density_steps = check_int("density_steps", density_steps, minimum=2)
        self.noise_scale = noise_scale
        self.noise_chunks = check_int("noise_chunks", noise_chunks, minimum=2)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"Invalid loss_fn: {loss_fn!r} (expected a callable or None)")
        self.loss_fn = loss_fn
        if params is not None and not isinstance(params, str):
            raise TypeError(f"Invalid params: {params!r} (expected a module or parameter name)")
        self.params = params
        if max_overhead is not None:
            check_float("max_overhead", max_overhead, minimum=0.0, exclusive_minimum=True)
            if max_overhead >= 1.0:
                raise ValueError(
                    f"Invalid max_overhead: {max_overhead} (expected a number in (0, 1))"
                )
        self.max_overhead = max_overhead
        self.cold_start_every = check_int("cold_start_every", cold_start_every, minimum=1)
        self.optimizer_index = check_int("optimizer_index", optimizer_index, minimum=0)
        self.seed = check_int("seed", seed)
        self.history: list[CurvatureRecord] = []
        self.skipped_checks = 0
        self._warned_nonfinite = False
        self.density_estimate: SpectralDensity | None = None
        self._probe: list[tuple[Any, int]] = []
        self._current: tuple[Any, int] | None = None
        self._noise = GradientNoiseScale()
        self._warm: dict[str, Tensor] = {}
        self._checks = 0
        self._next_check = self.every_n_steps
        self._last_check_step = 0
        self._check_seconds = 0.0
        self._last_cost: float | None = None
        self._last_step_seen = -1
        self._train_seconds = 0.0
        self._train_steps = 0
        self._tick: float | None = None

    @property
    def latest(self) -> CurvatureRecord | None:
        """The most recent check, or ``None`` before the first."""
        return self.history[-1] if self.history else None

    @property
    def interval(self) -> int:
        """Steps from the last check to the next one planned (``every_n_steps``, or more when
        the ``max_overhead`` budget defers it)."""
        return self._next_check - self._last_check_step

    @property
    def next_check_step(self) -> int:
        """The step at which the next scheduled check is due (re-planned if the budget has
        not been earned by then)."""
        return self._next_check

    # ------------------------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError(
                "Invalid loss_fn: None under manual optimization (training_step runs its own "
                "backward and optimizer step, so CurvatureMonitor cannot reuse it; pass "
                "loss_fn=lambda module, batch: ... returning the loss)"
            )
        if self.optimizer_index >= max(1, len(trainer.optimizers)):
            raise ValueError(
                f"Invalid optimizer_index: {self.optimizer_index} (the trainer has "
                f"{len(trainer.optimizers)} optimizer(s))"
            )
        self._tick = None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here, unlike in on_fit_start, a resumed run already has its global_step back.
        self._probe = []
        self._last_step_seen = trainer.global_step

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if len(self._probe) < self.probe_batches:
            self._probe.append((tree_map(_detached_copy, batch), batch_idx))
        self._current = (batch, batch_idx)  # a fresh batch for the noise scale
        self._tick = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._tick is not None:
            self._train_seconds += time.perf_counter() - self._tick
        step = trainer.global_step
        if step == self._last_step_seen:
            return  # a micro-batch of gradient accumulation: no optimizer step yet
        self._last_step_seen = step
        self._train_steps += 1
        if step < self._next_check or not self._probe:
            return
        wait = self._steps_until_affordable(trainer)
        if wait > 0:
            self._next_check = step + wait
        else:
            self.measure(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.history or self._train_steps == 0:
            return
        # A short run can end before the first check: say so rather than leave a silent gap.
        if self.max_overhead is not None and self._next_check > self.every_n_steps:
            why = (
                f"the time budget (max_overhead={self.max_overhead:g}) put the first check at "
                f"step {self._next_check}; pass max_overhead=None for short runs"
            )
        else:
            why = f"the first check is due at step {self._next_check} (every_n_steps)"
        rank_zero_info(
            f"CurvatureMonitor: no curvature check in {trainer.global_step} steps: {why}"
        )

    # ------------------------------------------------------------------------------- measuring
    def measure(self, trainer: Trainer, pl_module: LightningModule) -> CurvatureRecord | None:
        """Run a check now and return its record (``None`` before the probe batch is known).

        Under DDP every process must call it at the same step (it runs collectives).
        """
        if not self._probe:
            return None
        started = time.perf_counter()
        distributed = (
            trainer.world_size > 1
            and torch.distributed.is_available()
            and (torch.distributed.is_initialized())
        )
        reduce = all_reduce_mean if distributed else None
        loss_fn = self._loss_function(pl_module)
        probe = [batch for batch, _ in self._probe] if self.loss_fn else self._probe
        cold = self._checks % self.cold_start_every == 0
        generator = torch.Generator().manual_seed(self.seed + self._checks)
        optimizer = unwrap(trainer.optimizers[self.optimizer_index]) if trainer.optimizers else None
        operator: HessianOperator | None = None
        with contextlib.suppress(NonFiniteLossError):
            operator = HessianOperator(
                pl_module, loss_fn, probe, params=self.params, hvp_reduce=reduce
            )
        # Every process must take the same branch: the check runs collectives.
        if trainer.strategy.reduce_boolean_decision(operator is None, all=False):
            if operator is not None:
                operator.close()
            self._skip_nonfinite(trainer)
            return None
        assert operator is not None
        with operator:
            warm = not cold and self._warm_start_for("hessian", operator.size) is not None
            spectrum = self._eigen(operator, "hessian", "both", cold, generator)
            record = _record_of(trainer.global_step, spectrum, operator)
            record.warm_start = warm
            if optimizer is not None:
                self._sharpness(record, operator, optimizer, spectrum, cold, generator)
            if self.trace:
                estimate = estimate_trace(operator, num_hvps=self.trace_hvps, generator=generator)
                record.trace, record.trace_standard_error = estimate.value, estimate.standard_error
            if self.density:
                self.density_estimate = estimate_spectral_density(
                    operator,
                    num_probes=self.density_probes,
                    num_steps=self.density_steps,
                    generator=generator,
                )
            if self.noise_scale:
                fresh = self._current if self._current is not None else self._probe[0]
                item = fresh[0] if self.loss_fn is not None else fresh
                self._measure_noise(pl_module, loss_fn, item, operator, distributed, record)
            record.num_hvps = operator.num_hvps
        record.seconds = time.perf_counter() - started
        self._checks += 1
        self._check_seconds += record.seconds
        self._last_cost = record.seconds
        self._last_check_step = trainer.global_step
        self._next_check = trainer.global_step + self.every_n_steps
        self.history.append(record)
        self._warned_nonfinite = False
        self._log(trainer, record)
        return record

    def _skip_nonfinite(self, trainer: Trainer) -> None:
        """No curvature at a non-finite loss: skip this check, say so once per episode."""
        self.skipped_checks += 1
        self._next_check = trainer.global_step + self.every_n_steps
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            rank_zero_warn(
                f"CurvatureMonitor: the probe batch's loss is not finite at step "
                f"{trainer.global_step}; curvature checks are skipped until it is (NonFiniteGuard "
                "reports the cause)"
            )

    def _eigen(
        self,
        operator: Any,
        key: str,
        which: str,
        cold: bool,
        generator: torch.Generator,
    ) -> EigenResult:
        previous = None if cold else self._warm_start_for(key, operator.size)
        k = min(self.k, operator.size)
        result = lanczos_eigenvalues(
            operator,
            k=k,
            which=which,
            tol=self.tol,
            max_hvps=min(self.max_hvps, operator.size),
            v0=previous,
            generator=generator,
        )
        self._warm[key] = result.warm_start()
        return result

    def _warm_start_for(self, key: str, size: int) -> Tensor | None:
        previous = self._warm.get(key)
        return previous if previous is not None and previous.shape[-1] == size else None

    def _sharpness(
        self,
        record: CurvatureRecord,
        operator: HessianOperator,
        optimizer: torch.optim.Optimizer,
        spectrum: EigenResult,
        cold: bool,
        generator: torch.Generator,
    ) -> None:
        rule = stability_rule(optimizer, operator.parameters)
        if rule is None:
            return
        if rule.scale is None:
            sharpness = record.lambda_max
        else:
            scale = torch.cat([s.reshape(-1) for s in rule.scale])
            scaled = ScaledOperator(operator, scale)
            top = self._eigen(scaled, "preconditioned", "largest", cold, generator).largest
            assert top is not None
            sharpness = float(top[0])
        record.sharpness = sharpness
        record.stability_threshold = rule.threshold
        record.sharpness_ratio = rule.ratio(sharpness)
        record.optimizer_family = rule.family

    def _measure_noise(
        self,
        module: LightningModule,
        loss_fn: LossFn,
        item: Any,
        operator: HessianOperator,
        distributed: bool,
        record: CurvatureRecord,
    ) -> None:
        """Update the noise-scale estimate from the gradients of ``noise_chunks`` equal chunks
        of a fresh training batch: ``E|g_chunk|^2 = |G|^2 + tr(Sigma) / B_chunk`` against
        ``E|g_batch|^2 = |G|^2 + tr(Sigma) / B``, with ``g_batch`` the chunks' mean (and, under
        DDP, averaged over processes too). A fixed probe batch would not do: its own sampling
        error is frozen into every estimate."""
        chunks = _chunks(item, self.noise_chunks, keyed=self.loss_fn is None)
        if chunks is None:
            return
        pieces, chunk_size = chunks
        grads = [_gradient(module, loss_fn, [piece], operator) for piece in pieces]
        small = torch.stack([grad @ grad for grad in grads]).mean()
        mean = torch.stack(grads).mean(dim=0)
        big_batch = float(chunk_size * len(pieces))
        if distributed:
            world = torch.distributed.get_world_size()
            small = all_reduce_mean(small.reshape(1))[0]
            mean = all_reduce_mean(mean)
            big_batch *= world
        self._noise.update(float(small), float(chunk_size), float(mean @ mean), big_batch)
        estimate: NoiseScaleEstimate | None = self._noise.estimate
        if estimate is not None:
            record.noise_scale = estimate.simple_noise_scale
            record.noise_to_signal = estimate.noise_to_signal

    @property
    def noise(self) -> NoiseScaleEstimate | None:
        """The smoothed gradient noise-scale estimate (``None`` before it is measured)."""
        return self._noise.estimate

    def _loss_function(self, pl_module: LightningModule) -> LossFn:
        if self.loss_fn is not None:
            user_fn = self.loss_fn

            def user_loss(module: nn.Module, batches: list[Any]) -> Tensor:
                return torch.stack([user_fn(module, batch).reshape(()) for batch in batches]).mean()

            return user_loss

        def training_loss(module: nn.Module, batches: list[tuple[Any, int]]) -> Tensor:
            assert isinstance(module, LightningModule)
            return torch.stack(
                [_muted_training_step(module, batch, index) for batch, index in batches]
            ).mean()

        return training_loss

    def _steps_until_affordable(self, trainer: Trainer) -> int:
        """Training steps still needed before the next check fits the ``max_overhead`` budget.

        A token bucket: checks may use ``max_overhead`` of the training time spent so far,
        and the next one is predicted to cost as much as the last (the first, as
        :meth:`_first_check_steps` training steps). So the share of time spent on checks never
        exceeds the budget by more than the error of that prediction, however long or short
        the run.
        """
        wait = 0
        if self.max_overhead is not None and self._train_steps > 0:
            per_step = self._train_seconds / self._train_steps
            predicted = self._last_cost
            if predicted is None:
                predicted = self._first_check_steps(trainer) * per_step
            deficit = (self._check_seconds + predicted) / self.max_overhead - self._train_seconds
            if deficit > 0 and per_step > 0:
                wait = math.ceil(deficit / per_step)
        # Every process must check at the same steps: rank zero decides.
        return int(trainer.strategy.broadcast(wait, src=0))

    def _first_check_steps(self, trainer: Trainer) -> float:
        """A guess of the first check's cost, in training steps, on the high side: half of
        ``max_hvps`` Lanczos steps per eigenvalue run (two runs for adaptive optimizers: H and
        P^-1 H), each costing about 3.5 training steps (an HVP is about two gradients, plus the
        reorthogonalisation), plus one training step per noise-scale chunk. On the benchmark
        model (AdamW, max_hvps=40) that is 148 steps against 121 to 138 measured."""
        optimizer = unwrap(trainer.optimizers[self.optimizer_index]) if trainer.optimizers else None
        family = optimizer_family(optimizer) if optimizer is not None else None
        runs = 2 if family in ("adam", "rmsprop", "adagrad") else 1
        return 1.75 * self.max_hvps * runs + (self.noise_chunks if self.noise_scale else 0)

    # -------------------------------------------------------------------------------- logging
    def _log(self, trainer: Trainer, record: CurvatureRecord) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {
            f"{PREFIX}/lambda_max": record.lambda_max,
            f"{PREFIX}/lambda_min": record.lambda_min,
            f"{PREFIX}/num_hvps": float(record.num_hvps),
        }
        optional = {
            "sharpness": record.sharpness,
            "stability_threshold": record.stability_threshold,
            "sharpness_ratio": record.sharpness_ratio,
            "trace": record.trace,
            "noise_scale": record.noise_scale,
        }
        if record.noise_scale is not None and not math.isfinite(record.noise_scale):
            # inf: the unbiased |G|^2 estimate is <= 0, the signal is lost in the noise. A chart
            # cannot show it; the record and the doctor keep it.
            del optional["noise_scale"]
        metrics.update(
            {f"{PREFIX}/{key}": value for key, value in optional.items() if value is not None}
        )
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=record.step)
            if self.density_estimate is not None and isinstance(logger, TensorBoardLogger):
                write_density_histogram(
                    logger.experiment, f"{PREFIX}/density", self.density_estimate, record.step
                )

    # ---------------------------------------------------------------------------- checkpoints
    @property
    @override
    def state_key(self) -> str:
        # Several monitors (on different parameter subsets, say) can share a Trainer.
        return self._generate_state_key(
            params=self.params, k=self.k, optimizer_index=self.optimizer_index
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [asdict(record) for record in self.history],
            "noise": self._noise.state_dict(),
            "checks": self._checks,
            "next_check": self._next_check,
            "check_seconds": self._check_seconds,
            "last_cost": self._last_cost,
            "last_check_step": self._last_check_step,
            "train_seconds": self._train_seconds,
            "train_steps": self._train_steps,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [CurvatureRecord(**record) for record in state_dict["history"]]
        self._noise.load_state_dict(state_dict["noise"])
        self._checks = int(state_dict["checks"])
        self._next_check = int(state_dict["next_check"])
        self._check_seconds = float(state_dict["check_seconds"])
        self._last_cost = state_dict["last_cost"]
        self._last_check_step = int(state_dict["last_check_step"])
        self._train_seconds = float(state_dict["train_seconds"])
        self._train_steps = int(state_dict["train_steps"])
        self._warm = {}  # the probe is re-drawn after a resume: start cold


# ----------------------------------------------------------------------------------- helpers
def _record_of(step: int, spectrum: EigenResult, operator: HessianOperator) -> CurvatureRecord:
    assert spectrum.largest is not None
    assert spectrum.smallest is not None
    assert spectrum.largest_residuals is not None
    assert spectrum.smallest_residuals is not None
    return CurvatureRecord(
        step=step,
        lambda_max=float(spectrum.largest[0]),
        lambda_min=float(spectrum.smallest[0]),
        top_k=spectrum.largest.tolist(),
        bottom_k=spectrum.smallest.tolist(),
        residual_max=float(spectrum.largest_residuals[0]),
        residual_min=float(spectrum.smallest_residuals[0]),
        converged=spectrum.converged,
        loss=operator.loss,
        grad_norm=float(torch.linalg.vector_norm(operator.gradient())),
    )


def _muted_training_step(module: LightningModule, batch: Any, batch_idx: int) -> Tensor:
    """``module.training_step`` with ``self.log`` / ``self.log_dict`` turned into no-ops."""
    shadowed = {name: name in module.__dict__ for name in ("log", "log_dict")}
    saved = {name: module.__dict__.get(name) for name in shadowed}
    module.__dict__["log"] = _no_op
    module.__dict__["log_dict"] = _no_op
    try:
        output = module.training_step(batch, batch_idx)
    finally:
        for name, existed in shadowed.items():
            if existed:
                module.__dict__[name] = saved[name]
            else:
                del module.__dict__[name]
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, Tensor):
        raise TypeError(
            "CurvatureMonitor: training_step returned "
            f"{type(output).__name__} (expected the loss as a tensor or under 'loss'); pass "
            "loss_fn=... to CurvatureMonitor"
        )
    return loss.reshape(())


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


def _detached_copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else value


def _batch_size(batch: Any) -> int:
    try:
        return int(extract_batch_size(batch))
    except Exception:  # Lightning raises MisconfigurationException on unknown structures
        return 1


def _chunks(item: Any, count: int, keyed: bool) -> tuple[list[Any], int] | None:
    """``item`` cut into ``count`` equal chunks (fewer if the batch has under ``2 count``
    rows, ``None`` under 4 rows) along the batch dimension, and the chunk size; leftover rows
    are dropped."""
    batch = item[0] if keyed else item
    size = _batch_size(batch)
    # At least two rows per chunk: BatchNorm in training mode refuses a batch of one.
    count = min(count, size // 2)
    if count < 2:
        return None
    chunk = size // count
    pieces = [_slice_batch(batch, size, j * chunk, (j + 1) * chunk) for j in range(count)]
    return [(piece, item[1]) if keyed else piece for piece in pieces], chunk


def _slice_batch(batch: Any, size: int, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of every tensor in ``batch`` whose first dimension is the batch size."""

    def cut(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
            return value[lo:hi]
        return value

    return tree_map(cut, batch)


def _gradient(module: nn.Module, loss_fn: LossFn, batch: Any, operator: HessianOperator) -> Tensor:
    params = operator.parameters
    with isolated_forward(module), torch.inference_mode(False), torch.enable_grad():
        loss = loss_fn(module, batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [
            torch.zeros(p.numel(), dtype=operator.dtype, device=operator.device)
            if g is None
            else g.detach().reshape(-1).to(operator.dtype)
            for p, g in zip(params, grads, strict=True)
        ]
    )
