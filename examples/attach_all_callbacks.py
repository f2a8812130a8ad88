"""All six optdiag callbacks on an ordinary LightningModule and DataModule, logging to TensorBoard.

``SpiralClassifier`` and ``SpiralDataModule`` below are written the way anyone would write them:
nothing in them knows about optdiag. Everything optdiag adds is the block of callbacks in
``main()``, where a comment says why each argument is set as it is. After training the script
prints what each callback found, and writes the doctor's diagnoses as JSON next to the logs.

    python examples/attach_all_callbacks.py --logdir runs
    tensorboard --logdir runs          # optdiag/ charts, and the doctor's custom-scalars layout
    python examples/attach_all_callbacks.py --fast --logdir /tmp/runs   # a few seconds
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from lightning_optdiag.callbacks import (
    CurvatureMonitor,
    GradientMonitor,
    NonFiniteGuard,
    OptimizerSwitch,
    ScheduleAdvisor,
    TrainingDoctor,
)


# ------------------------------------------------------------------ an ordinary Lightning project
class SpiralClassifier(LightningModule):
    """A small MLP classifying the arms of a spiral."""

    def __init__(self, hidden: int = 64, lr: float = 3e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 3),
        )

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        loss = nn.functional.cross_entropy(self(inputs), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        logits = self(inputs)
        self.log("val_loss", nn.functional.cross_entropy(logits, labels))
        self.log("val_acc", (logits.argmax(dim=1) == labels).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )


class SpiralDataModule(LightningDataModule):
    """Three interleaved noisy spiral arms in the plane."""

    def __init__(self, num_samples: int = 3000, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        labels = torch.randint(0, 3, (self.num_samples,), generator=generator)
        radius = torch.rand(self.num_samples, generator=generator)
        angle = 4.0 * radius + labels * (2 * math.pi / 3)
        angle = angle + 0.2 * torch.randn(self.num_samples, generator=generator)
        inputs = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
        dataset = TensorDataset(inputs, labels)
        self.train_set, self.val_set = random_split(dataset, [0.8, 0.2], generator=generator)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=len(self.val_set))


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, default=Path("runs"), help="TensorBoard root")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: 1500)")
    parser.add_argument("--fast", action="store_true", help="500 steps, for a quick check")
    parser.add_argument("--json", type=Path, default=None, help="default: <log dir>/diagnoses.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = 500 if args.fast else args.steps
    if steps < 1:
        parser.error(f"--steps must be >= 1, got {steps}")

    # Lightning's INFO lines ("GPU available: False ...") are not results.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    seed_everything(args.seed, verbose=False)

    # ------------------------------------------------------------------- what optdiag adds
    # Gradient, parameter and update norms per layer under optdiag/ in TensorBoard, logged
    # every `Trainer(log_every_n_steps)` (the default, None); spikes and vanishing layers are
    # checked on every step whatever the interval.
    monitor = GradientMonitor()
    # "skip" drops a step whose loss or gradients are NaN/inf instead of letting one bad batch
    # poison the weights and Adam's moments; locate=True names the first module whose output
    # went bad (it replays the batch, so healthy steps cost nothing extra).
    guard = NonFiniteGuard(action="skip", locate=True)
    # This model takes about a millisecond per step, so the default 5% time budget would defer
    # the first Hessian check for hundreds of steps: check every 100 steps whatever it costs
    # instead. On a real model keep max_overhead at its default.
    curvature = CurvatureMonitor(every_n_steps=100, max_overhead=None)
    # Evaluate every 25 steps on the last 100 losses: windows a few times shorter than the run
    # (the defaults, 50 and 200, suit runs of thousands of steps).
    doctor = TrainingDoctor(check_every_n_steps=25, window=100)
    # Switch Adam to momentum SGD (SWATS), but only once the doctor sees Adam stall: on a
    # plateau or with noise-dominated gradients. Ungated SWATS switches as soon as its estimate
    # settles, which can be long before Adam has stopped helping.
    switch = OptimizerSwitch(policy="swats", gate_on=["plateau", "gradient_noise"])
    # Recommend a schedule for what the doctor finds, without installing it: changing the
    # learning rate behind the user's back is the user's decision (auto_apply=True).
    advisor = ScheduleAdvisor(auto_apply=False)
    callbacks: list[Callback] = [monitor, guard, curvature, doctor, switch, advisor]

    logger = TensorBoardLogger(save_dir=args.logdir, name="attach_all", default_hp_metric=False)
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=10,
        val_check_interval=50,  # validation every 50 steps: the doctor reads val_loss there
        check_val_every_n_epoch=None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        # Synthetic in-memory tensors need no loader workers; Lightning still suggests them.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        # Lightning 2.6's CombinedLoader still uses a torch pytree class that newer torch
        # deprecates (a FutureWarning from inside Lightning, nothing to act on here).
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)", FutureWarning)
        trainer.fit(SpiralClassifier(), datamodule=SpiralDataModule(seed=args.seed))

    print(f"\nTensorBoard logs: {logger.log_dir}")
    latest = monitor.latest[0]
    print(
        f"GradientMonitor   step {latest.step}: gradient norm {latest.total:.3g} "
        f"(running median {latest.median_total:.3g}); {len(monitor.events)} events "
        f"{sorted({e.kind for e in monitor.events})}"
    )
    print(
        f"NonFiniteGuard    {len(guard.events)} events, {guard.skipped_steps} steps skipped, "
        f"{guard.scaler_skips} fp16 scaler skips"
    )
    record = curvature.latest
    if record is not None:
        print(
            f"CurvatureMonitor  {len(curvature.history)} checks; step {record.step}: lambda_max "
            f"{record.lambda_max:.4g}, lambda_min {record.lambda_min:+.3g}, sharpness/threshold "
            f"{_fmt(record.sharpness_ratio)}, noise scale {_fmt(record.noise_scale)}"
        )
    kinds = [f"{d.kind}@{d.step}" for d in doctor.diagnoses]
    print(
        f"TrainingDoctor    diagnoses {kinds or 'none'}; active {[d.kind for d in doctor.active]}"
    )
    print(f"OptimizerSwitch   {[f'{e.to_optimizer}@{e.step}' for e in switch.events] or 'none'}")
    advice = [f"{r['schedule']}@{r['step']}" for r in advisor.recommendations]
    print(f"ScheduleAdvisor   {advice or 'none'}")
    path = args.json or Path(logger.log_dir) / "diagnoses.json"
    doctor.to_json(path)
    print(f"Diagnoses written to {path}")
    return {"log_dir": logger.log_dir, "json": str(path)}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


if __name__ == "__main__":
    main()
