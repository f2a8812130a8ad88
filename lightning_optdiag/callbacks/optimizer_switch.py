"""OptimizerSwitch: replace the optimizer mid-training, e.g. Adam by momentum SGD (SWATS)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from typing_extensions import override

from lightning_optdiag._validation import check_choice, check_float, check_int
from lightning_optdiag.callbacks._console import console_for
from lightning_optdiag.callbacks._swap import replace_optimizer, unwrap
from lightning_optdiag.diagnosis import KINDS
from lightning_optdiag.optim import create_optimizer, list_optimizers
from lightning_optdiag.signals.swats import SwatsCriterion

__all__ = ["OptimizerSwitch", "SwitchEvent"]

POLICIES = ("swats", "plateau", "at_step", "at_epoch")
_ADAM_CLASSES = (torch.optim.Adam, torch.optim.AdamW)


@dataclass
class SwitchEvent:
    """One optimizer switch.

    Attributes:
        step: ``trainer.global_step`` after which the new optimizer takes over.
        epoch: the epoch of the switch.
        from_optimizer: class name of the replaced optimizer.
        to_optimizer: registry name of the new one.
        lr: learning rate of the new optimizer's first parameter group.
        reason: why it switched, in one sentence.
    """

    step: int
    epoch: int
    from_optimizer: str
    to_optimizer: str
    lr: float
    reason: str


class OptimizerSwitch(Callback):
    r"""Switches the optimizer during training, once, when its policy says so.

    Policies:

    - ``"swats"`` (Keskar & Socher 2017): from :class:`torch.optim.Adam` or
      :class:`~torch.optim.AdamW`, track after every step the SGD learning rate whose step
      projects like Adam's, :math:`\gamma_k = p_k^\top p_k / (-p_k^\top g_k)`, and its
      bias-corrected average :math:`\Lambda_k`; when
      :math:`|\Lambda_k - \gamma_k| < \epsilon \Lambda_k` (``switch_threshold``, relative:
      the paper's absolute :math:`10^{-9}` practically never fires), switch to momentum SGD
      with momentum :math:`\beta_1` and learning rate :math:`(1 - \beta_1)\Lambda_k` on fresh
      momentum buffers. The step :math:`p_k` is recomputed from Adam's own state after the step
      (``-lr m_hat / (sqrt(v_hat) + eps)``, AMSGrad's maximum included); the gradient includes
      Adam's L2 term (not AdamW's decoupled decay, which is not part of :math:`p_k`).
    - ``"plateau"``: switch when the :class:`TrainingDoctor` on the same Trainer reports a
      plateau.
    - ``"at_step"`` / ``"at_epoch"``: switch after optimizer step ``at_step`` / at the start of
      epoch ``at_epoch``.

    ``gate_on`` makes any policy wait until the doctor also reports one of those diagnoses
    (e.g. ``["gradient_noise", "plateau"]``: switch to SGD only once Adam has stalled).

    The swap is done inside Lightning (field guide section 8): ``trainer.strategy.optimizers``
    is replaced (fresh ``LightningOptimizer`` wrappers, so ``self.optimizers()`` in the module
    returns the new one), and every scheduler of the old optimizer is re-bound to the new one
    at the same point of its schedule, with ``initial_lr`` and ``base_lrs`` rescaled, so that
    LearningRateMonitor and the schedulers see the new learning rate. The new optimizer gets the
    old one's parameter groups (their ``weight_decay`` too, and learning rates in the same
    ratios), built with :func:`lightning_optdiag.optim.create_optimizer`.

    Checkpoints: the callback's state holds the criterion and, after a switch, what was built.
    Resuming from a checkpoint saved after the switch rebuilds the switched optimizer in
    ``on_fit_start`` (before Lightning loads the optimizer state into it, the order Lightning's
    StochasticWeightAveraging relies on); resuming from one saved before it switches at the
    same step. Both continue the uninterrupted run exactly.

    Every switch is recorded in ``switch.events``, printed (rank zero), written to TensorBoard
    as the text ``optdiag/switch`` and to the doctor's ``actions`` when a
    :class:`TrainingDoctor` is attached. Under DDP every process computes the same criterion
    from the same synchronised gradients and optimizer state, so all switch at the same step.

    Args:
        policy: ``"swats"``, ``"plateau"``, ``"at_step"`` or ``"at_epoch"``.
        target: registry name of the new optimizer (:func:`lightning_optdiag.optim.
            list_optimizers`); for ``"swats"`` ``"sgdm"`` (momentum SGD) or ``"nag"``. The old
            groups' ``weight_decay`` is carried over with the new optimizer's meaning: from
            AdamW (decoupled decay) choose ``"sgdw"`` to keep it decoupled, since ``"sgdm"``
            turns it into an L2 penalty.
        target_kwargs: constructor arguments of the new optimizer (``lr`` is computed for
            ``"swats"`` and defaults to the current learning rate otherwise).
        at_step: the step after which ``"at_step"`` switches.
        at_epoch: the epoch at whose start ``"at_epoch"`` switches.
        gate_on: diagnosis kinds of which the doctor must report one before switching.
        switch_threshold: SWATS's relative tolerance :math:`\epsilon`.
        switch_min_steps: first Adam step at which the SWATS test may fire.
        optimizer_index: which of the trainer's optimizers to replace.
        verbose: print each switch.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is invalid (an unknown policy, target or kind, a missing
            ``at_step``/``at_epoch``, an ``lr`` given to ``"swats"``).

    Example::

        from lightning.pytorch import Trainer
        from lightning_optdiag.callbacks import OptimizerSwitch

        switch = OptimizerSwitch(policy="swats")  # Adam until it settles, then SGD
        trainer = Trainer(callbacks=[switch])
        trainer.fit(model)
        print(switch.events)

    References:
        Keskar & Socher (2017), "Improving Generalization Performance by Switching from Adam
        to SGD", arXiv:1712.07628.
    """

    def __init__(
        self,
        policy: Literal["swats", "plateau", "at_step", "at_epoch"] = "swats",
        target: str = "sgdm",
        target_kwargs: dict[str, Any] | None = None,
        at_step: int | None = None,
        at_epoch: int | None = None,
        gate_on: list[str] | None = None,
        switch_threshold: float = 5e-3,
        switch_min_steps: int = 10,
        optimizer_index: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.policy = check_choice("policy", policy, POLICIES)
        if not isinstance(target, str) or target.strip().lower() not in list_optimizers():
            raise ValueError(
                f"Invalid target: {target!r} (expected one of {', '.join(list_optimizers())})"
            )
        self.target = target.strip().lower()
        if target_kwargs is not None and not isinstance(target_kwargs, dict):
            raise TypeError(f"Invalid target_kwargs: {target_kwargs!r} (expected a dict or None)")
        self.target_kwargs = dict(target_kwargs or {})
        if policy == "swats" and "lr" in self.target_kwargs:
            raise ValueError(
                f"Invalid target_kwargs: lr={self.target_kwargs['lr']!r} (the 'swats' policy "
                "computes the learning rate; remove it, or use another policy)"
            )
        self.at_step = None if at_step is None else check_int("at_step", at_step, minimum=0)
        self.at_epoch = None if at_epoch is None else check_int("at_epoch", at_epoch, minimum=0)
        if policy == "at_step" and at_step is None:
            raise ValueError("Invalid at_step: None (policy='at_step' needs the step)")
        if policy == "at_epoch" and at_epoch is None:
            raise ValueError("Invalid at_epoch: None (policy='at_epoch' needs the epoch)")
        if gate_on is not None and (
            not isinstance(gate_on, list | tuple) or not all(isinstance(k, str) for k in gate_on)
        ):
            raise TypeError(
                f"Invalid gate_on: {gate_on!r} (expected a list of diagnosis kinds, e.g. "
                "['plateau'])"
            )
        kinds = list(gate_on or [])
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(
                    f"Invalid gate_on: {kind!r} (expected diagnosis kinds from {', '.join(KINDS)})"
                )
        self.gate_on = kinds
        self.switch_threshold = check_float(
            "switch_threshold", switch_threshold, minimum=0.0, exclusive_minimum=True
        )
        self.switch_min_steps = check_int("switch_min_steps", switch_min_steps, minimum=2)
        self.optimizer_index = check_int("optimizer_index", optimizer_index, minimum=0)
        if not isinstance(verbose, bool):
            raise TypeError(f"Invalid verbose: {verbose!r} (expected a bool)")
        self.verbose = verbose
        self.events: list[SwitchEvent] = []
        self._criterion: SwatsCriterion | None = None
        self._built: dict[str, Any] | None = None  # what the switch built, to rebuild on resume
        self._adam_steps = -1
        self._batch_step = -1
        self._doctor: Any = None

    @property
    def switched(self) -> bool:
        """Whether the switch has happened."""
        return self._built is not None

    @property
    def lambda_estimate(self) -> float | None:
        """SWATS's current estimate :math:`\\Lambda` of the SGD learning rate."""
        return None if self._criterion is None else self._criterion.estimate

    # ------------------------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_optdiag.callbacks.training_doctor import TrainingDoctor, find_callback

        if self.optimizer_index >= len(trainer.optimizers):
            raise ValueError(
                f"Invalid optimizer_index: {self.optimizer_index} (the trainer has "
                f"{len(trainer.optimizers)} optimizer(s))"
            )
        self._doctor = find_callback(trainer, TrainingDoctor)
        if (self.policy == "plateau" or self.gate_on) and self._doctor is None:
            raise ValueError(
                f"Invalid policy: {self.policy!r} with gate_on={self.gate_on!r} needs a "
                "TrainingDoctor on the same Trainer (add TrainingDoctor() to the callbacks)"
            )
        if self._built is not None:
            # Resumed after the switch: rebuild what was built, before Lightning loads the
            # checkpoint's optimizer state into it.
            self._install(trainer, self._build(unwrap(trainer.optimizers[self.optimizer_index])))
            return
        optimizer = unwrap(trainer.optimizers[self.optimizer_index])
        if self.policy == "swats":
            if not isinstance(optimizer, _ADAM_CLASSES):
                raise ValueError(
                    f"Invalid policy: 'swats' needs torch.optim.Adam or AdamW as optimizer "
                    f"{self.optimizer_index}, got {type(optimizer).__name__}"
                )
            if any(group.get("maximize", False) for group in optimizer.param_groups):
                raise ValueError(
                    "Invalid policy: 'swats' with maximize=True (the criterion assumes Adam "
                    "descends; negate the objective instead)"
                )
            if self._criterion is None:
                beta2 = float(optimizer.param_groups[0]["betas"][1])
                self._criterion = SwatsCriterion(
                    beta2=beta2, threshold=self.switch_threshold, min_steps=self.switch_min_steps
                )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        first = self.policy == "at_step" and self.at_step == 0 and trainer.global_step == 0
        if first and not self.switched and self._gate_open():
            self._switch(trainer, "reached step 0")

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_step = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.switched or trainer.global_step == self._batch_step:
            return  # switched already, or a micro-batch without an optimizer step
        reason = None
        if self.policy == "swats":
            reason = self._swats_step(trainer)
        elif self.policy == "at_step" and self.at_step is not None:
            if trainer.global_step >= self.at_step:
                reason = f"reached step {self.at_step}"
        elif self.policy == "plateau" and self._doctor_reports(["plateau"]):
            reason = "the training loss plateaued"
        if reason is not None and self._gate_open():
            self._switch(trainer, reason)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.switched or self.policy != "at_epoch" or self.at_epoch is None:
            return
        if trainer.current_epoch >= self.at_epoch and self._gate_open():
            self._switch(trainer, f"reached epoch {self.at_epoch}")

    # ------------------------------------------------------------------------------------ SWATS
    def _swats_step(self, trainer: Trainer) -> str | None:
        optimizer = unwrap(trainer.optimizers[self.optimizer_index])
        assert self._criterion is not None
        measured = _adam_projections(optimizer)
        if measured is None:
            return None
        steps, squared_norm, projection = measured
        if steps == self._adam_steps:
            return None  # the step was skipped (an fp16 overflow): Adam did not move
        self._adam_steps = steps
        if not self._criterion.update(squared_norm, projection):
            return None
        estimate = self._criterion.estimate
        return (
            f"SWATS: Adam's projected SGD learning rate settled at Lambda = {estimate:.4g} "
            f"after {self._criterion.steps} steps"
        )

    # --------------------------------------------------------------------------------- switching
    def _gate_open(self) -> bool:
        return not self.gate_on or self._doctor_reports(self.gate_on)

    def _doctor_reports(self, kinds: list[str]) -> bool:
        if self._doctor is None:
            return False
        active = {diagnosis.kind for diagnosis in self._doctor.active}
        return bool(active & set(kinds))

    def _switch(self, trainer: Trainer, reason: str) -> None:
        old = unwrap(trainer.optimizers[self.optimizer_index])
        reference = max(float(group["lr"]) for group in old.param_groups)
        kwargs = dict(self.target_kwargs)
        if self.policy == "swats":
            assert self._criterion is not None
            assert self._criterion.estimate is not None
            beta1 = float(old.param_groups[0]["betas"][0])
            kwargs.setdefault("momentum", beta1)
            new_lr = (1.0 - beta1) * self._criterion.estimate
        else:
            new_lr = float(kwargs.pop("lr", reference))
        scales = [
            float(group["lr"]) / reference if reference else 1.0 for group in old.param_groups
        ]
        self._built = {
            "target": self.target,
            "kwargs": kwargs,
            "lrs": [new_lr * scale for scale in scales],
            "from": type(old).__name__,
        }
        self._install(trainer, self._build(old))
        event = SwitchEvent(
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            from_optimizer=type(old).__name__,
            to_optimizer=self.target,
            lr=self._built["lrs"][0],
            reason=reason,
        )
        self.events.append(event)
        self._report(trainer, event)

    def _build(self, old: torch.optim.Optimizer) -> torch.optim.Optimizer:
        assert self._built is not None
        groups = []
        for group, lr in zip(old.param_groups, self._built["lrs"], strict=True):
            new_group: dict[str, Any] = {"params": group["params"], "lr": lr}
            if "weight_decay" in group:
                new_group["weight_decay"] = group["weight_decay"]
            groups.append(new_group)
        kwargs = dict(self._built["kwargs"])
        return create_optimizer(self._built["target"], groups, **kwargs)

    def _install(self, trainer: Trainer, new: torch.optim.Optimizer) -> None:
        replace_optimizer(trainer, self.optimizer_index, new)

    def _report(self, trainer: Trainer, event: SwitchEvent) -> None:
        message = (
            f"step {event.step}: {event.from_optimizer} -> {event.to_optimizer} "
            f"(lr {event.lr:.4g}): {event.reason}"
        )
        if self._doctor is not None:
            self._doctor.record_action("optimizer_switch", event.step, message, asdict(event))
        if not trainer.is_global_zero:
            return
        if self.verbose:
            console_for(trainer).print(f"[bold]optdiag[/bold] · optimizer switch · {message}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("optdiag/switch", message, event.step)
            logger.log_metrics({"optdiag/switch/lr": event.lr}, step=event.step)

    # ---------------------------------------------------------------------------- checkpoints
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(policy=self.policy, optimizer_index=self.optimizer_index)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "criterion": None if self._criterion is None else self._criterion.state_dict(),
            "built": self._built,
            "adam_steps": self._adam_steps,
            "events": [asdict(event) for event in self.events],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        criterion = state_dict["criterion"]
        if criterion is not None:
            self._criterion = SwatsCriterion(
                threshold=self.switch_threshold, min_steps=self.switch_min_steps
            )
            self._criterion.load_state_dict(criterion)
        self._built = state_dict["built"]
        self._adam_steps = int(state_dict["adam_steps"])
        self.events = [SwitchEvent(**event) for event in state_dict["events"]]


def _adam_projections(optimizer: torch.optim.Optimizer) -> tuple[int, float, float] | None:
    """Adam's last step count, ``p . p`` and ``p . g`` over all its parameters, from its state
    (one device-to-host transfer); ``None`` before the first step."""
    squares: list[Tensor] = []
    projections: list[Tensor] = []
    steps = None
    for group in optimizer.param_groups:
        beta1, beta2 = (float(b) for b in group["betas"])
        params = [p for p in group["params"] if p.grad is not None and p in optimizer.state]
        if not params:
            continue
        states = [optimizer.state[p] for p in params]
        if any("exp_avg" not in state for state in states):
            return None
        step = int(float(states[0]["step"]))
        steps = step if steps is None else max(steps, step)
        second = [
            state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
            for state in states
        ]
        denominators = torch._foreach_sqrt(second)
        torch._foreach_div_(denominators, (1.0 - beta2**step) ** 0.5)
        torch._foreach_add_(denominators, float(group["eps"]))
        directions = torch._foreach_div([state["exp_avg"] for state in states], denominators)
        step_size = float(group["lr"]) / (1.0 - beta1**step)
        grads: list[Tensor] = [p.grad for p in params if p.grad is not None]
        weight_decay = float(group.get("weight_decay", 0.0))
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get(
            "decoupled_weight_decay", False
        )
        if weight_decay and not decoupled:
            # Adam's L2 term is part of the gradient it used; the parameters have moved by
            # p = -step_size * direction since.
            before = torch._foreach_add([p.detach() for p in params], directions, alpha=step_size)
            grads = list(torch._foreach_add(grads, before, alpha=weight_decay))
        norms = torch.stack(torch._foreach_norm(directions)).double()
        dots = torch.stack([(d * g).sum() for d, g in zip(directions, grads, strict=True)])
        squares.append(step_size**2 * (norms**2).sum())
        projections.append(-step_size * dots.double().sum())
    if steps is None:
        return None
    values = torch.stack([torch.stack(squares).sum(), torch.stack(projections).sum()]).tolist()
    return steps, float(values[0]), float(values[1])
