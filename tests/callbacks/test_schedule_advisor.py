"""ScheduleAdvisor on real Lightning runs.

Two kinds of runs. The ``oscillation`` demo (SGD at 1.5x the stability threshold) with every
optdiag callback, where the real TrainingDoctor diagnoses ``lr_too_high`` and the advisor answers
it; and small regressions where a ``Script`` callback hands the doctor chosen diagnoses at chosen
steps, so that each schedule is installed at a known step. The learning rates the optimizer
really used (read in ``on_before_optimizer_step``) are compared with a ``torch.optim.lr_scheduler``
built directly on a standalone optimizer with the documented arguments, with the lrs of a run
without the advisor, or with the uninterrupted run when resuming from a checkpoint.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    CyclicLR,
    LambdaLR,
    LinearLR,
    OneCycleLR,
    StepLR,
)
from torch.utils.data import DataLoader, TensorDataset

from lightning_optdiag import demo
from lightning_optdiag.callbacks import (
    CurvatureMonitor,
    GradientMonitor,
    NonFiniteGuard,
    ScheduleAdvisor,
    TrainingDoctor,
)
from lightning_optdiag.diagnosis import Diagnosis

QUIET: dict[str, Any] = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "accelerator": "cpu",
    "devices": 1,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}

Lrs = dict[int, list[float]]


# ------------------------------------------------------------------------------ the pieces
def torch_optimizer(optimizer: Any) -> Optimizer:
    return getattr(optimizer, "_optimizer", optimizer)


class LrRecorder(Callback):
    """The learning rates of every optimizer step, keyed by the step (``global_step`` then)."""

    def __init__(self) -> None:
        self.lrs: Lrs = {}

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        groups = torch_optimizer(optimizer).param_groups
        self.lrs[trainer.global_step] = [float(group["lr"]) for group in groups]


def scripted(kind: str, step: int, cleared: int | None = None, **evidence: Any) -> Diagnosis:
    return Diagnosis(
        kind=kind,
        step=step,
        severity="warning",
        confidence=0.9,
        evidence=evidence,
        message=f"{kind} (scripted)",
        recommendation="-",
        cleared_step=cleared,
    )


class Script(Callback):
    """Appends ``script[step]`` to the doctor's diagnoses when ``global_step`` reaches ``step``
    (in ``on_train_batch_end``, like the doctor's own evaluations). Placed after the doctor and
    before the advisor."""

    def __init__(self, script: dict[int, list[Diagnosis]]) -> None:
        self.script = script

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        doctor = next(c for c in trainer.callbacks if isinstance(c, TrainingDoctor))  # type: ignore[attr-defined]
        doctor.diagnoses.extend(self.script.get(trainer.global_step, []))


def quiet_doctor() -> TrainingDoctor:
    # A window longer than any run here: the doctor's own rules never fire, only the script.
    return TrainingDoctor(check_every_n_steps=1000, window=10_000, console=False, tensorboard=False)


class Regression(LightningModule):
    """Linear regression on fixed data; one or two parameter groups, an optional scheduler."""

    def __init__(
        self,
        optimizer: str = "sgd",
        lrs: tuple[float, ...] = (0.02, 0.01),
        scheduler: Callable[[Optimizer], Any] | None = None,
        seed: int = 0,
        manual: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Linear(4, 1)
        self.optimizer_name = optimizer
        self.lrs = lrs
        self.scheduler = scheduler
        self.automatic_optimization = not manual

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        loss = F.mse_loss(self.net(inputs), targets)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(loss)
            optimizer.step()  # type: ignore[union-attr]
        return loss

    def configure_optimizers(self) -> Any:
        weight, bias = self.net.weight, self.net.bias
        groups = [{"params": [weight], "lr": self.lrs[0]}]
        if len(self.lrs) > 1:
            groups.append({"params": [bias], "lr": self.lrs[1]})
        else:
            groups[0]["params"].append(bias)
        if self.optimizer_name == "adam":
            optimizer: Optimizer = torch.optim.Adam(groups, betas=(0.9, 0.9))
        else:
            optimizer = torch.optim.SGD(groups, momentum=0.9)
        if self.scheduler is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def loader(batches: int = 1) -> DataLoader[tuple[Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(32, 4, generator=generator)
    targets = inputs @ torch.randn(4, 1, generator=generator) + 0.5
    return DataLoader(TensorDataset(inputs, targets), batch_size=32 // batches, shuffle=False)


def fit(
    module: LightningModule,
    callbacks: list[Callback],
    steps: int,
    batches: int = 1,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> Trainer:
    options = {**QUIET, "max_steps": steps, "max_epochs": -1, **trainer_kwargs}
    trainer = Trainer(callbacks=callbacks, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader(batches), ckpt_path=ckpt_path)
    return trainer


def scripted_run(
    script: dict[int, list[Diagnosis]],
    steps: int,
    advisor: ScheduleAdvisor | None = None,
    module: Regression | None = None,
    **fit_kwargs: Any,
) -> tuple[Trainer, Regression, LrRecorder, TrainingDoctor, ScheduleAdvisor]:
    advisor = advisor or ScheduleAdvisor(auto_apply=True, verbose=False)
    module = module or Regression()
    recorder, doctor = LrRecorder(), quiet_doctor()
    trainer = fit(module, [recorder, doctor, Script(script), advisor], steps, **fit_kwargs)
    return trainer, module, recorder, doctor, advisor


def reference_lrs(
    group_lrs: list[float], build: Callable[[Optimizer], Any], count: int, optimizer: str = "sgd"
) -> list[list[float]]:
    """The lrs of ``count`` steps of ``build(optimizer)`` on a standalone optimizer."""
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in group_lrs]
    if optimizer == "adam":
        standalone: Optimizer = torch.optim.Adam(groups, betas=(0.9, 0.9))
    else:
        standalone = torch.optim.SGD(groups, momentum=0.9)
    scheduler = build(standalone)
    lrs = []
    for index in range(count):
        lrs.append([group["lr"] for group in standalone.param_groups])
        standalone.step()
        if index < count - 1:
            scheduler.step()
    return lrs


def params_of(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_bitwise_equal(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def schedulers_of(trainer: Trainer, optimizer: Optimizer) -> list[Any]:
    return [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]


# ------------------------------------------------------------------------------ validation
def test_constructor_validates_its_arguments() -> None:
    with pytest.raises(TypeError, match=r"Invalid auto_apply: 'yes' \(expected a bool\)"):
        ScheduleAdvisor(auto_apply="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Invalid verbose: 1 \(expected a bool\)"):
        ScheduleAdvisor(verbose=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Invalid optimizer_index: -1 \(expected an integer >= 0"):
        ScheduleAdvisor(optimizer_index=-1)
    with pytest.raises(TypeError, match=r"Invalid optimizer_index: 1\.0"):
        ScheduleAdvisor(optimizer_index=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Invalid optimizer_index: True"):
        ScheduleAdvisor(optimizer_index=True)
    advisor = ScheduleAdvisor()
    assert (advisor.auto_apply, advisor.optimizer_index, advisor.verbose) == (False, 0, True)
    assert advisor.recommendations == []


def test_without_a_training_doctor_fit_start_raises_naming_it() -> None:
    module = Regression()
    before = params_of(module)
    with pytest.raises(ValueError, match="needs a TrainingDoctor") as error:
        fit(module, [ScheduleAdvisor()], steps=3)
    assert "TrainingDoctor()" in str(error.value)
    assert_bitwise_equal(params_of(module), before)  # raised before any step


def test_optimizer_index_beyond_the_trainer_optimizers_raises_at_fit_start() -> None:
    with pytest.raises(ValueError, match=r"Invalid optimizer_index: 1 \(the trainer has 1 "):
        fit(Regression(), [quiet_doctor(), ScheduleAdvisor(optimizer_index=1)], steps=3)


# --------------------------------------------------------------------- the oscillation demo
OSCILLATION_STEPS = 400


@functools.cache
def oscillation(mode: str, logdir: str | None = None) -> dict[str, Any]:
    """The ``oscillation`` demo for 400 steps, built like ``run_demo``; ``mode``: ``"none"``
    (no advisor), ``"recommend"`` or ``"apply"``."""
    demo._quiet_lightning()
    seed_everything(0, verbose=False)
    spec = demo.SCENARIOS["oscillation"]
    train, _ = spec.data(0)
    recorder = LrRecorder()
    doctor = TrainingDoctor(check_every_n_steps=20, window=100, console=False)
    callbacks: list[Callback] = [
        recorder,
        GradientMonitor(log_every_n_steps=10),
        NonFiniteGuard(action="skip", locate=True, max_consecutive_skips=10),
        CurvatureMonitor(every_n_steps=50, max_overhead=None),
        doctor,
    ]
    advisor = None
    if mode != "none":
        advisor = ScheduleAdvisor(auto_apply=mode == "apply", verbose=False)
        callbacks.append(advisor)
    logger: Any = False
    if logdir is not None:
        logger = TensorBoardLogger(logdir, name="oscillation", version=0, default_hp_metric=False)
    trainer = Trainer(
        **{**QUIET, "logger": logger},
        max_steps=OSCILLATION_STEPS,
        max_epochs=-1,
        callbacks=callbacks,
        log_every_n_steps=10,
        **spec.trainer,
    )
    module = demo.make_module(spec, 0, train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train)
    inputs, targets = train.dataset.tensors  # type: ignore[attr-defined]
    with torch.no_grad():
        final_loss = float(F.mse_loss(module.net(inputs), targets))
    return {
        "trainer": trainer,
        "module": module,
        "lrs": recorder.lrs,
        "doctor": doctor,
        "advisor": advisor,
        "final_loss": final_loss,
        "logdir": None if logdir is None else logger.log_dir,
    }


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return oscillation("apply", str(tmp_path_factory.mktemp("tb")))


def lr_too_high_of(doctor: TrainingDoctor) -> Diagnosis:
    (found,) = [d for d in doctor.diagnoses if d.kind == "lr_too_high"]
    return found


def test_oscillation_without_advisor_stays_stuck() -> None:
    run = oscillation("none")
    assert 10.0 < run["final_loss"] < 20.0  # docs/switching.md: stuck at 13.7
    assert lr_too_high_of(run["doctor"]).active
    assert set(run["lrs"]) == set(range(OSCILLATION_STEPS))
    assert len({tuple(lrs) for lrs in run["lrs"].values()}) == 1  # a constant rate


@pytest.mark.slow
def test_recommend_only_leaves_training_bitwise_unchanged() -> None:
    baseline, run = oscillation("none"), oscillation("recommend")
    assert run["lrs"] == baseline["lrs"]
    assert_bitwise_equal(params_of(run["module"]), params_of(baseline["module"]))
    assert run["trainer"].lr_scheduler_configs == []
    diagnosis = lr_too_high_of(run["doctor"])
    factor = 1.0 / max(2.0, 1.5 * diagnosis.evidence["sharpness_ratio"])
    (record,) = run["advisor"].recommendations
    assert record["schedule"] == "decay"
    assert record["diagnosis"] == "lr_too_high"
    assert record["installed"] is False
    assert record["step"] == diagnosis.step
    assert record["settings"]["factor"] == pytest.approx(factor, rel=1e-12)
    (action,) = run["doctor"].actions
    assert action["kind"] == "schedule_recommended"
    assert action["step"] == diagnosis.step
    assert "decay schedule recommended for lr_too_high" in action["message"]
    assert action["details"] == record
    assert diagnosis.active  # nothing was done about it


@pytest.mark.slow
def test_auto_apply_installs_the_decay_at_the_diagnosis_and_the_loss_falls(
    applied: dict[str, Any],
) -> None:
    trainer, doctor, advisor, lrs = (
        applied["trainer"],
        applied["doctor"],
        applied["advisor"],
        applied["lrs"],
    )
    diagnosis = lr_too_high_of(doctor)
    step = diagnosis.step
    assert 150 <= step <= 210  # docs/switching.md: diagnosed at step 180
    factor = 1.0 / max(2.0, 1.5 * diagnosis.evidence["sharpness_ratio"])
    # The recommendation, installed at the step of the diagnosis.
    (record,) = advisor.recommendations
    assert (record["schedule"], record["diagnosis"], record["installed"]) == (
        "decay",
        "lr_too_high",
        True,
    )
    assert record["step"] == step
    assert record["settings"]["factor"] == pytest.approx(factor, rel=1e-12)
    # The lr drops by exactly that factor from the next optimizer step on, and stays there.
    (lr0,) = lrs[0]
    assert all(lrs[s] == [lr0] for s in range(step))
    decayed = lr0 * record["settings"]["factor"]
    assert all(lrs[s] == [decayed] for s in range(step, OSCILLATION_STEPS))
    # One LambdaLR, driving the trainer's current optimizer every step, from the rate at install.
    optimizer = torch_optimizer(trainer.optimizers[0])
    (config,) = trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, LambdaLR)
    assert config.scheduler.optimizer is optimizer
    assert (config.interval, config.frequency) == ("step", 1)
    assert config.scheduler.base_lrs == [lr0]
    assert optimizer.param_groups[0]["initial_lr"] == lr0
    assert optimizer.param_groups[0]["lr"] == decayed
    # The diagnosis clears (docs: 40 steps later) and the loss falls (docs: 0.008 vs 13.7).
    assert diagnosis.cleared_step is not None
    assert step < diagnosis.cleared_step <= step + 100
    assert applied["final_loss"] < 0.1
    assert applied["final_loss"] < oscillation("none")["final_loss"] / 100
    (action,) = doctor.actions
    assert action["kind"] == "schedule_installed"
    assert action["step"] == step
    assert action["message"].startswith(f"step {step}: decay schedule installed for lr_too_high")
    assert action["details"] == record


@pytest.mark.slow
def test_auto_apply_writes_the_tensorboard_text(applied: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import (
        TENSORS,
        EventAccumulator,
    )

    events = EventAccumulator(applied["logdir"], size_guidance={TENSORS: 0})
    events.Reload()
    tags = [t for t in events.PluginTagToContent("text") if t.startswith("optdiag/schedule")]
    assert len(tags) == 1
    texts = [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tags[0])]
    (record,) = applied["advisor"].recommendations
    assert texts == [(record["step"], applied["doctor"].actions[0]["message"])]
    assert "decay schedule installed for lr_too_high" in texts[0][1]


# ------------------------------------------------------------ installed schedules, scripted
INSTALL_STEP = 4
STEPS = 30
THIRD = 1.0 / max(2.0, 1.5 * 2.0)  # the decay factor for a sharpness ratio of 2
REFERENCES: dict[str, tuple[Diagnosis, str, Callable[[list[float], int], Any]]] = {
    # diagnosis -> (schedule, the torch scheduler with the documented arguments)
    "needs_warmup": (
        scripted("needs_warmup", INSTALL_STEP),
        "warmup",
        # Adam betas (0.9, 0.9): 2 / (1 - 0.9) = 20 steps, fewer than the 26 remaining.
        lambda lrs, remaining: lambda o: LinearLR(o, start_factor=0.01, total_iters=20),
    ),
    "lr_too_high": (
        scripted("lr_too_high", INSTALL_STEP, sharpness_ratio=2.0),
        "decay",
        lambda lrs, remaining: lambda o: LambdaLR(o, lambda _: THIRD),
    ),
    "lr_too_small": (
        scripted("lr_too_small", INSTALL_STEP, sharpness_ratio=0.2),
        "one_cycle",
        lambda lrs, remaining: (
            lambda o: OneCycleLR(o, max_lr=[2.5 * lr for lr in lrs], total_steps=remaining)
        ),
    ),
    "saddle_point": (
        scripted("saddle_point", INSTALL_STEP),
        "cyclical",
        # half a cycle: min(remaining // 4, 200) = 6 steps (module docstring of schedules.py)
        lambda lrs, remaining: (
            lambda o: CyclicLR(
                o,
                base_lr=lrs,
                max_lr=[3.0 * lr for lr in lrs],
                step_size_up=remaining // 4,
                cycle_momentum=False,
            )
        ),
    ),
    "gradient_noise": (
        scripted("gradient_noise", INSTALL_STEP),
        "cosine",
        lambda lrs, remaining: (
            lambda o: CosineAnnealingLR(o, T_max=remaining, eta_min=0.01 * min(lrs))
        ),
    ),
    "plateau": (
        scripted("plateau", INSTALL_STEP),
        "warm_restarts",
        # period: min(remaining // 3, 1000) = 8 steps
        lambda lrs, remaining: lambda o: CosineAnnealingWarmRestarts(o, T_0=remaining // 3),
    ),
}


@pytest.mark.parametrize("kind", list(REFERENCES))
def test_installed_schedule_drives_the_lr_like_the_torch_scheduler(kind: str) -> None:
    diagnosis, schedule, reference = REFERENCES[kind]
    module = Regression(optimizer="adam", lrs=(0.02, 0.01))
    trainer, module, recorder, doctor, advisor = scripted_run(
        {INSTALL_STEP: [diagnosis]}, STEPS, module=module
    )
    (record,) = advisor.recommendations
    assert (record["schedule"], record["step"], record["installed"]) == (
        schedule,
        INSTALL_STEP,
        True,
    )
    lrs = recorder.lrs
    assert all(lrs[s] == [0.02, 0.01] for s in range(INSTALL_STEP))
    remaining = STEPS - INSTALL_STEP
    expected = reference_lrs([0.02, 0.01], reference([0.02, 0.01], remaining), remaining, "adam")
    assert [lrs[s] for s in range(INSTALL_STEP, STEPS)] == expected
    optimizer = torch_optimizer(trainer.optimizers[0])
    (config,) = trainer.lr_scheduler_configs
    assert config.scheduler.optimizer is optimizer
    assert (config.interval, config.frequency) == ("step", 1)
    assert [a["kind"] for a in doctor.actions] == ["schedule_installed"]


def test_cleared_and_already_answered_diagnoses_install_nothing_new() -> None:
    script = {
        3: [scripted("gradient_noise", 2, cleared=3)],
        6: [scripted("lr_too_high", 6, sharpness_ratio=2.0)],
    }
    trainer, _, recorder, _, advisor = scripted_run(script, 12)
    # The cleared diagnosis is ignored; the decay, installed once, is not reinstalled later.
    assert [(r["schedule"], r["step"]) for r in advisor.recommendations] == [("decay", 6)]
    assert all(recorder.lrs[s] == [0.02 * THIRD, 0.01 * THIRD] for s in range(6, 12))
    assert len(trainer.lr_scheduler_configs) == 1


def test_installing_over_a_user_scheduler_replaces_it() -> None:
    # StepLR halves the rates every 5 steps; the decay arrives at step 12 (rates / 4 by then).
    module = Regression(scheduler=lambda o: StepLR(o, step_size=5, gamma=0.5))
    script = {12: [scripted("lr_too_high", 12, sharpness_ratio=2.0)]}
    trainer, module, recorder, _, advisor = scripted_run(script, 24, module=module)
    assert [(r["schedule"], r["step"]) for r in advisor.recommendations] == [("decay", 12)]
    lrs = recorder.lrs
    at_install = [0.02 * 0.25, 0.01 * 0.25]
    assert [lrs[s] for s in (0, 5, 10, 11)] == [
        [0.02, 0.01],
        [0.01, 0.005],
        at_install,
        at_install,
    ]
    # From step 12 on only the decay drives the rates: no more halving at 15 and 20.
    assert all(lrs[s] == [lr * THIRD for lr in at_install] for s in range(12, 24))
    optimizer = torch_optimizer(trainer.optimizers[0])
    (scheduler,) = schedulers_of(trainer, optimizer)
    assert len(trainer.lr_scheduler_configs) == 1
    assert isinstance(scheduler, LambdaLR)
    assert scheduler.base_lrs == at_install
    assert [g["initial_lr"] for g in optimizer.param_groups] == at_install
    assert module.lr_schedulers() is scheduler


def test_a_later_recommendation_replaces_the_installed_schedule() -> None:
    script = {
        5: [scripted("lr_too_high", 5, sharpness_ratio=2.0)],
        10: [scripted("gradient_noise", 10)],
    }
    trainer, _, recorder, doctor, advisor = scripted_run(script, 20)
    assert [(r["schedule"], r["step"]) for r in advisor.recommendations] == [
        ("decay", 5),
        ("cosine", 10),
    ]
    decayed = [0.02 * THIRD, 0.01 * THIRD]
    assert all(recorder.lrs[s] == decayed for s in range(5, 10))
    expected = reference_lrs(
        decayed, lambda o: CosineAnnealingLR(o, T_max=10, eta_min=0.01 * min(decayed)), 10
    )
    assert [recorder.lrs[s] for s in range(10, 20)] == expected
    (config,) = trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, CosineAnnealingLR)
    assert config.scheduler.base_lrs == decayed
    assert [a["step"] for a in doctor.actions] == [5, 10]


def test_recommendation_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    advisor = ScheduleAdvisor(auto_apply=False, verbose=True)
    script = {5: [scripted("gradient_noise", 5)]}
    scripted_run(script, 8, advisor=advisor)
    printed = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "optdiag · schedule · step 5: cosine schedule recommended for gradient_noise" in printed
    assert "over the remaining 3 steps" in printed


def test_verbose_false_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    scripted_run({5: [scripted("gradient_noise", 5)]}, 8)
    assert "schedule" not in capsys.readouterr().out


# ------------------------------------------------------------------------- checkpoint/resume
RESUME_CASES = {
    "decay": scripted("lr_too_high", 12, sharpness_ratio=1.5),
    "cosine": scripted("gradient_noise", 12),
    "cyclical": scripted("saddle_point", 12),
    "one_cycle": scripted("lr_too_small", 12, sharpness_ratio=0.25),
}


@pytest.mark.parametrize("schedule", list(RESUME_CASES))
def test_resume_continues_with_the_installed_schedule_bitwise(
    schedule: str, tmp_path: Path
) -> None:
    """Installed at step 12 of 40; resumed from the checkpoints at steps 8 (before) and 16
    (after) by a fresh Trainer, module (other initial weights) and callbacks."""
    script = {12: [RESUME_CASES[schedule]]}
    steps = 40
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)
    trainer, module, recorder, doctor, advisor = _run_with_checkpoints(script, steps, saver)
    assert [(r["schedule"], r["step"]) for r in advisor.recommendations] == [(schedule, 12)]
    assert [a["step"] for a in doctor.actions] == [12]
    expected_params = params_of(module)
    expected_state = trainer.optimizers[0].state_dict()
    for resume_step in (8, 16):
        (path,) = tmp_path.glob(f"*step={resume_step}.ckpt")
        resumed = Regression(seed=123)
        trainer2, module2, recorder2, doctor2, advisor2 = scripted_run(
            script, steps, module=resumed, ckpt_path=str(path)
        )
        assert sorted(recorder2.lrs) == list(range(resume_step, steps))
        for s in range(resume_step, steps):
            assert recorder2.lrs[s] == recorder.lrs[s], (resume_step, s)
        assert_bitwise_equal(params_of(module2), expected_params)
        state = trainer2.optimizers[0].state_dict()
        assert state["param_groups"] == expected_state["param_groups"]
        for index, values in expected_state["state"].items():
            for key, value in values.items():
                assert torch.equal(state["state"][index][key], value), (index, key)
        assert advisor2.recommendations == advisor.recommendations
        assert doctor2.actions == doctor.actions
        optimizer = torch_optimizer(trainer2.optimizers[0])
        (config,) = trainer2.lr_scheduler_configs
        assert type(config.scheduler) is type(trainer.lr_scheduler_configs[0].scheduler)
        assert config.scheduler.optimizer is optimizer
        assert config.scheduler.last_epoch == trainer.lr_scheduler_configs[0].scheduler.last_epoch


def _run_with_checkpoints(
    script: dict[int, list[Diagnosis]], steps: int, saver: ModelCheckpoint
) -> tuple[Trainer, Regression, LrRecorder, TrainingDoctor, ScheduleAdvisor]:
    advisor = ScheduleAdvisor(auto_apply=True, verbose=False)
    module = Regression()
    recorder, doctor = LrRecorder(), quiet_doctor()
    trainer = fit(
        module,
        [recorder, doctor, Script(script), advisor, saver],
        steps,
        enable_checkpointing=True,
    )
    return trainer, module, recorder, doctor, advisor


def test_state_dict_round_trip() -> None:
    script = {3: [scripted("lr_too_high", 3, sharpness_ratio=2.0)]}
    *_, advisor = scripted_run(script, 5)
    state = advisor.state_dict()
    assert state["installed"]["schedule"] == "decay"
    assert state["seen"] == 1
    restored = ScheduleAdvisor(auto_apply=True)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored.recommendations is not advisor.recommendations


# ------------------------------------------------------------------------------------ bugs
def test_plateau_after_an_active_lr_too_high_gets_no_warm_restarts() -> None:
    script = {
        5: [scripted("lr_too_high", 5, sharpness_ratio=2.0)],
        10: [scripted("plateau", 10)],
    }
    trainer, _, _, _, advisor = scripted_run(script, 16)
    assert [r["schedule"] for r in advisor.recommendations] == ["decay"]
    assert isinstance(trainer.lr_scheduler_configs[0].scheduler, LambdaLR)


def test_remaining_steps_of_a_run_limited_by_epochs() -> None:
    script = {5: [scripted("gradient_noise", 5)]}
    advisor = ScheduleAdvisor(auto_apply=False, verbose=False)
    # 3 epochs of 4 batches: 12 optimizer steps, 7 left at step 5.
    scripted_run(script, -1, advisor=advisor, batches=4, max_epochs=3)
    (record,) = advisor.recommendations
    assert record["settings"] == {"steps": 7}


def test_installed_schedule_is_stepped_under_manual_optimization() -> None:
    module = Regression(manual=True)
    _, _, recorder, _, advisor = scripted_run(
        {4: [scripted("gradient_noise", 4)]}, 12, module=module
    )
    assert [r["schedule"] for r in advisor.recommendations] == ["cosine"]
    expected = reference_lrs(
        [0.02, 0.01], lambda o: CosineAnnealingLR(o, T_max=8, eta_min=0.01 * 0.01), 8
    )
    assert [recorder.lrs[s] for s in range(4, 12)] == expected


def test_docs_table_factor_matches_the_measured_demo_factor(applied: dict[str, Any]) -> None:
    """docs/switching.md: 'LambdaLR at 1 / (1.5 ratio)': 1.5x the threshold gives 1 / 2.25."""
    ratio = lr_too_high_of(applied["doctor"]).evidence["sharpness_ratio"]
    assert ratio == pytest.approx(1.5, abs=0.01)  # the demo runs SGD at 1.5x the threshold
    factor = applied["advisor"].recommendations[0]["settings"]["factor"]
    assert factor == pytest.approx(1.0 / 2.25, rel=0.01)
    assert math.isclose(factor, 1.0 / (1.5 * ratio), rel_tol=1e-12)
