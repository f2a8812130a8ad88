"""Switch from Adam to momentum SGD when Adam's step settles (SWATS), and compare.

An ordinary LightningModule trained with ``torch.optim.Adam``; the only
optdiag code is ``OptimizerSwitch(policy="swats")`` in the callback list. The script trains it
three times from the same seed: Adam throughout, SWATS, and SWATS gated on the doctor seeing
Adam stall (``gate_on=["plateau", "gradient_noise"]``), and prints when each switch happened, at
which learning rate, and the final training and validation losses. On this problem SGD does not
beat Adam within 600 steps: the switch is a tool, not a guaranteed gain.

    python examples/swats_switch.py
    python examples/swats_switch.py --steps 300
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optdiag.callbacks import CurvatureMonitor, OptimizerSwitch, TrainingDoctor


class Regressor(LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
        )
        self.lr = lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # A constant rate: SWATS's average of the projected SGD rate has a memory of about
        # 1 / (1 - beta2) = 1000 steps, so under a decaying schedule it lags the current value
        # and the test rarely passes.
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def make_data(seed: int) -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(1280, 8, generator=generator)
    weights = torch.randn(8, 3, generator=generator)
    targets = torch.sin(inputs @ weights).sum(dim=1, keepdim=True)
    targets = targets + 0.1 * torch.randn(1280, 1, generator=generator)
    return TensorDataset(inputs[:1024], targets[:1024]), TensorDataset(
        inputs[1024:], targets[1024:]
    )


def train(switch: str | None, steps: int, seed: int) -> tuple[float, float, OptimizerSwitch | None]:
    seed_everything(seed, verbose=False)
    train_set, val_set = make_data(seed)
    module = Regressor()
    callbacks: list = []
    callback = None
    if switch == "swats":
        callback = OptimizerSwitch(policy="swats", verbose=False)
        callbacks = [callback]
    elif switch == "gated":
        # Switch only once the doctor sees Adam stall: a plateau or a noise-dominated gradient.
        callback = OptimizerSwitch(
            policy="swats", gate_on=["plateau", "gradient_noise"], verbose=False
        )
        curvature = CurvatureMonitor(every_n_steps=100, max_overhead=None)
        doctor = TrainingDoctor(check_every_n_steps=25, window=100, console=False)
        callbacks = [curvature, doctor, callback]
    trainer = Trainer(
        max_steps=steps,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    loader = DataLoader(train_set, batch_size=32, shuffle=True)
    with warnings.catch_warnings():
        # Synthetic in-memory tensors need no loader workers; Lightning still suggests them.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        # Lightning 2.6 still uses a torch pytree class that newer torch deprecates (a
        # FutureWarning from inside Lightning, nothing to act on here).
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)", FutureWarning)
        trainer.fit(module, loader)
    with torch.no_grad():
        losses = [
            nn.functional.mse_loss(module.net(x), y).item() for x, y in (train_set[:], val_set[:])
        ]
    return losses[0], losses[1], callback


def main(argv: list[str] | None = None) -> dict[str, list[int]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # Lightning's INFO lines ("GPU available: False ...") are not results.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    runs = {
        "Adam throughout": None,
        "SWATS": "swats",
        "SWATS gated on a stall": "gated",
    }
    switch_steps: dict[str, list[int]] = {}
    print(f"{'run':<26}{'switch':>26}{'train loss':>12}{'val loss':>10}")
    for name, switch in runs.items():
        train_loss, val_loss, callback = train(switch, args.steps, args.seed)
        events = [] if callback is None else callback.events
        switch_steps[name] = [event.step for event in events]
        where = "-" if callback is None else "none"
        if events:
            where = f"step {events[0].step}, lr {events[0].lr:.3g}"
        print(f"{name:<26}{where:>26}{train_loss:>12.4f}{val_loss:>10.4f}")
    return switch_steps


if __name__ == "__main__":
    main()
