"""optdiag's callbacks under DDP on CPU: two processes with ``strategy="ddp_spawn"``.

An ordinary LightningModule, trained by ``Trainer(strategy="ddp_spawn", accelerator="cpu",
devices=2)`` with the callbacks attached as on one process. What DDP changes, and what the
callbacks do about it:

- ``GradientMonitor`` and ``NonFiniteGuard`` read the gradients after DDP's all-reduce, so every
  process measures the same norms; a loss is local, so the guard reduces its flags across
  processes and all of them take the same decision (a skip never leaves one waiting).
- ``CurvatureMonitor`` averages Hessian-vector products across processes: the eigenvalues are
  those of the global probe batch, and every process checks at the same steps.
- ``TrainingDoctor`` averages the losses across processes, so every process reaches the same
  diagnoses, and ``OptimizerSwitch`` switches at the same step everywhere.

Only rank 0 prints (the doctor's report, and the summary below, through a small callback that
runs in the worker processes: with ``ddp_spawn`` the callbacks in the launching process are
copies that training never touches). ``--record DIR`` makes every rank write what it measured
to ``DIR/rank<N>.json``, to check that the ranks agree.

    python examples/ddp_launch.py
    python examples/ddp_launch.py --devices 4 --steps 400
    python examples/ddp_launch.py --fast --record /tmp/ranks     # a few seconds

Everything the spawned processes need is defined at module level (they unpickle it by
importing this file), and the training runs only under ``if __name__ == "__main__":``, which a
spawned process importing the file skips.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optdiag.callbacks import (
    CurvatureMonitor,
    GradientMonitor,
    NonFiniteGuard,
    OptimizerSwitch,
    TrainingDoctor,
)

# The spawned ranks import this file (as ``__mp_main__``) without running ``main()``: what
# every process needs is set here, at import, not in ``main()``.
# Lightning's INFO lines ("GPU available: False", "Initializing distributed: GLOBAL_RANK: 1",
# ...), one set per rank, are not results.
for _name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# Synthetic in-memory tensors need no loader workers; Lightning still suggests them.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# Lightning 2.6's CombinedLoader still uses a torch pytree class that newer torch deprecates
# (a FutureWarning from inside Lightning, nothing to act on here).
warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)", FutureWarning)


class Regressor(LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.net(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.net(inputs), targets)
        self.log("val_loss", loss, sync_dist=True)  # an epoch-level metric: average the ranks

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def make_data(seed: int) -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(2560, 8, generator=generator)
    weights = torch.randn(8, 3, generator=generator)
    targets = torch.sin(inputs @ weights).sum(dim=1, keepdim=True)
    targets = targets + 0.1 * torch.randn(2560, 1, generator=generator)
    return TensorDataset(inputs[:2048], targets[:2048]), TensorDataset(
        inputs[2048:], targets[2048:]
    )


class Summary(Callback):
    """Prints what the callbacks found on rank 0; with ``record``, every rank writes it to
    ``record/rank<N>.json``. Runs in the worker processes, after the optdiag callbacks."""

    def __init__(self, record: str | None = None) -> None:
        self.record = record

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        callbacks = {type(cb).__name__: cb for cb in trainer.callbacks}  # type: ignore[attr-defined]
        monitor: GradientMonitor = callbacks["GradientMonitor"]
        guard: NonFiniteGuard = callbacks["NonFiniteGuard"]
        curvature: CurvatureMonitor = callbacks["CurvatureMonitor"]
        doctor: TrainingDoctor = callbacks["TrainingDoctor"]
        switch: OptimizerSwitch = callbacks["OptimizerSwitch"]
        found: dict[str, Any] = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "pid": os.getpid(),
            "global_step": trainer.global_step,
            "grad_norm": {"step": monitor.latest[0].step, "total": monitor.latest[0].total},
            "nonfinite_events": len(guard.events),
            "curvature": [
                {"step": r.step, "lambda_max": r.lambda_max, "lambda_min": r.lambda_min}
                for r in curvature.history
            ],
            "diagnoses": [{"kind": d.kind, "step": d.step} for d in doctor.diagnoses],
            "switches": [{"step": e.step, "lr": e.lr} for e in switch.events],
        }
        if self.record is not None:
            path = Path(self.record) / f"rank{trainer.global_rank}.json"
            path.write_text(json.dumps(found, indent=2))
        if not trainer.is_global_zero:
            return
        print(f"[rank 0 of {trainer.world_size}] {trainer.global_step} steps")
        print(
            f"  gradient norm at step {found['grad_norm']['step']}: {monitor.latest[0].total:.4g}"
        )
        print(f"  non-finite events: {len(guard.events)}")
        for r in curvature.history:
            print(f"  Hessian at step {r.step}: lambda_max {r.lambda_max:.4g}")
        print(f"  diagnoses: {[f'{d.kind}@{d.step}' for d in doctor.diagnoses] or 'none'}")
        print(f"  optimizer switches: {[f'{e.to_optimizer}@{e.step}' for e in switch.events]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="processes (default: 2)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (default: 600)")
    parser.add_argument("--fast", action="store_true", help="120 steps, for a quick check")
    parser.add_argument("--record", type=Path, default=None, help="write rank<N>.json here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = 120 if args.fast else args.steps
    if steps < 1 or args.devices < 1:
        parser.error("--steps and --devices must be >= 1")
    if args.record is not None:
        args.record.mkdir(parents=True, exist_ok=True)

    seed_everything(args.seed, verbose=False)  # also seeds the spawned ranks (PL_GLOBAL_SEED)
    train_set, val_set = make_data(args.seed)
    trainer = Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=args.devices,
        max_steps=steps,
        val_check_interval=50,
        check_val_every_n_epoch=None,
        callbacks=[
            GradientMonitor(),
            NonFiniteGuard(action="skip"),
            # A tiny model: check every 50 steps whatever it costs (keep the budget on real ones).
            CurvatureMonitor(every_n_steps=50, max_overhead=None),
            TrainingDoctor(check_every_n_steps=25, window=100),
            OptimizerSwitch(policy="swats"),
            Summary(None if args.record is None else str(args.record)),
        ],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Lightning's DistributedSampler shards the shuffled training set across the ranks.
    train = DataLoader(train_set, batch_size=32, shuffle=True)
    val = DataLoader(val_set, batch_size=len(val_set))
    trainer.fit(Regressor(), train, val)


if __name__ == "__main__":
    main()
