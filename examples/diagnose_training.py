"""Attach optdiag's callbacks to an ordinary LightningModule and read the diagnoses.

The module is a small classifier on synthetic data, written the way anyone would write it; the
only optdiag code is the callback list. With ``--init zeros`` its weights start at zero, a
classic mistake: every hidden unit stays identical and the gradients of both weight matrices are
exactly zero, so training sits at a saddle point. The doctor says so, with the Hessian's
eigenvalues as evidence. With the default initialisation it trains and nothing is reported.

    python examples/diagnose_training.py --init zeros
    python examples/diagnose_training.py --json diagnoses.json
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optdiag.callbacks import (
    CurvatureMonitor,
    GradientMonitor,
    NonFiniteGuard,
    TrainingDoctor,
)


class Classifier(LightningModule):
    def __init__(self, init: str = "default", lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(10, 32, bias=False), nn.Tanh(), nn.Linear(32, 3, bias=False)
        )
        if init == "zeros":
            with torch.no_grad():
                for param in self.net.parameters():
                    param.zero_()
        self.lr = lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        loss = nn.functional.cross_entropy(self.net(inputs), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(inputs), labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def make_loaders(seed: int) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(3, 10, generator=generator)

    def sample(count: int) -> TensorDataset:
        labels = torch.randint(0, 3, (count,), generator=generator)
        inputs = centres[labels] + torch.randn(count, 10, generator=generator)
        return TensorDataset(inputs, labels)

    train = DataLoader(sample(2048), batch_size=64, shuffle=True, generator=generator)
    return train, DataLoader(sample(512), batch_size=512)


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--init",
        choices=("default", "zeros"),
        default="default",
        help="weight initialisation: PyTorch's default, or all zeros (a saddle point); "
        "default: default",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", type=Path, default=None, help="write the diagnoses here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # Lightning's INFO lines ("GPU available: False ...") are not results.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    seed_everything(args.seed, verbose=False)
    train, val = make_loaders(args.seed)
    doctor = TrainingDoctor(check_every_n_steps=25, window=100)
    callbacks = [
        GradientMonitor(),
        NonFiniteGuard(),
        # A model this small trains in a millisecond per step: check every 50 steps regardless
        # of cost (on a real model, keep the default 5% time budget).
        CurvatureMonitor(every_n_steps=50, max_overhead=None),
        doctor,
    ]
    trainer = Trainer(
        max_steps=args.steps,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        val_check_interval=100,
        check_val_every_n_epoch=None,
    )
    with warnings.catch_warnings():
        # Synthetic in-memory tensors need no loader workers; Lightning still suggests them.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        # Lightning 2.6 still uses a torch pytree class that newer torch deprecates (a
        # FutureWarning from inside Lightning, nothing to act on here).
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)", FutureWarning)
        trainer.fit(Classifier(init=args.init), train, val)  # prints the doctor's report
    if args.json is not None:
        doctor.to_json(args.json)
        written = json.loads(args.json.read_text())["diagnoses"]
        print(f"{len(written)} diagnoses written to {args.json}")
    return [diagnosis.kind for diagnosis in doctor.diagnoses]


if __name__ == "__main__":
    main()
