"""optdiag's callbacks on a module with manual optimization: a small GAN with two optimizers.

``GAN`` sets ``automatic_optimization = False`` and steps its two optimizers itself in
``training_step`` (the discriminator with ``manual_backward`` and ``opt_d.step()``, then the
generator), the usual reason for manual optimization. What changes for optdiag:

- ``GradientMonitor`` measures each optimizer's gradients inside its own ``opt.step()``; with
  two optimizers the total norm is logged as ``optdiag/grad_norm/total_optimizer0`` and
  ``.../total_optimizer1``, and ``monitor.latest[i]`` holds each optimizer's latest numbers.
- ``NonFiniteGuard`` works as usual (``action="skip"`` drops the step of the optimizer whose
  gradients went bad), but ``locate=True`` is not available: it replays ``training_step``, which
  here would step the optimizers again.
- ``CurvatureMonitor`` cannot reuse ``training_step`` as the loss (it runs its own backward and
  steps), so it needs ``loss_fn=``: here the discriminator's loss on the probe batch, with the
  Hessian restricted to the discriminator (``params="discriminator"``) and the sharpness
  measured against the discriminator's optimizer (``optimizer_index=1``).

``TrainingDoctor`` supports manual optimization too (it reads the loss ``training_step``
returns), but it is left out here, and with it ``OptimizerSwitch`` and ``ScheduleAdvisor``
which act on its diagnoses: its rules read the loss as an objective to minimise, and a GAN's
discriminator loss levelling off near log 2 is the equilibrium, not the plateau and model bias
the doctor would report. On a module whose optimizers minimise one loss, add it as usual.

    python examples/manual_optimization.py --logdir runs
    python examples/manual_optimization.py --fast --logdir /tmp/runs   # a few seconds
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optdiag.callbacks import CurvatureMonitor, GradientMonitor, NonFiniteGuard

NOISE_DIM = 4


class GAN(LightningModule):
    """A generator of 2-D points against a discriminator, trained by alternating steps."""

    def __init__(self, hidden: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = nn.Sequential(
            nn.Linear(NOISE_DIM, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2),
        )
        self.discriminator = nn.Sequential(
            nn.Linear(2, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def discriminator_loss(self, real: Tensor, noise: Tensor) -> Tensor:
        fake = self.generator(noise).detach()
        logits = self.discriminator(torch.cat([real, fake]))
        labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(fake), 1)]).to(logits)
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)

    def generator_loss(self, noise: Tensor) -> Tensor:
        logits = self.discriminator(self.generator(noise))
        return nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        (real,) = batch
        opt_g, opt_d = self.optimizers()  # type: ignore[attr-defined]  # a list here
        noise = torch.randn(len(real), NOISE_DIM, device=real.device)

        d_loss = self.discriminator_loss(real, noise)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()

        g_loss = self.generator_loss(noise)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

        self.log_dict({"d_loss": d_loss, "g_loss": g_loss})
        return d_loss.detach()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = (0.5, 0.999)  # the usual GAN setting: less momentum than Adam's default
        return [
            torch.optim.Adam(self.generator.parameters(), lr=self.hparams["lr"], betas=betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams["lr"], betas=betas),
        ]


def ring_of_gaussians(num_samples: int, seed: int) -> TensorDataset:
    """Eight Gaussian blobs on the unit circle: the classic toy target for GANs."""
    generator = torch.Generator().manual_seed(seed)
    mode = torch.randint(0, 8, (num_samples,), generator=generator)
    angle = mode * (2 * math.pi / 8)
    centres = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return TensorDataset(centres + 0.05 * torch.randn(num_samples, 2, generator=generator))


def probe_discriminator_loss(module: nn.Module, batch: tuple[Tensor]) -> Tensor:
    """The discriminator's loss on the probe batch for CurvatureMonitor, against generated
    points from fixed noise, so that every check measures the same function."""
    assert isinstance(module, GAN)
    (real,) = batch
    noise = torch.randn(len(real), NOISE_DIM, generator=torch.Generator().manual_seed(0))
    return module.discriminator_loss(real, noise.to(real.device))


def main(argv: list[str] | None = None) -> dict[int, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, default=Path("runs"), help="TensorBoard root")
    parser.add_argument("--steps", type=int, default=2000, help="training batches (default: 2000)")
    parser.add_argument("--fast", action="store_true", help="200 batches, for a quick check")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    batches = 200 if args.fast else args.steps
    if batches < 1:
        parser.error(f"--steps must be >= 1, got {batches}")

    # Lightning's INFO lines ("GPU available: False ...") are not results.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    seed_everything(args.seed, verbose=False)
    monitor = GradientMonitor()
    guard = NonFiniteGuard(action="skip")  # no locate=True under manual optimization
    curvature = CurvatureMonitor(
        loss_fn=probe_discriminator_loss,  # required under manual optimization
        params="discriminator",  # the Hessian of the discriminator's loss in its own weights
        optimizer_index=1,  # ... against the stability threshold of its own optimizer
        every_n_steps=100,
        max_overhead=None,  # a tiny model: check every 100 steps whatever it costs
    )
    logger = TensorBoardLogger(save_dir=args.logdir, name="manual", default_hp_metric=False)
    # Under manual optimization every opt.step() counts as a step: two per batch here, so
    # max_steps is twice the number of batches (and so are the callbacks' step numbers).
    trainer = Trainer(
        max_steps=2 * batches,
        accelerator="cpu",
        logger=logger,
        callbacks=[monitor, guard, curvature],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(ring_of_gaussians(4096, args.seed), batch_size=64, shuffle=True)
    with warnings.catch_warnings():
        # Synthetic in-memory tensors need no loader workers; Lightning still suggests them.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        # Lightning 2.6's CombinedLoader still uses a torch pytree class that newer torch
        # deprecates (a FutureWarning from inside Lightning, nothing to act on here).
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)", FutureWarning)
        trainer.fit(GAN(), loader)

    print(f"\nTensorBoard logs: {logger.log_dir}")
    totals: dict[int, float] = {}
    for index, name in ((0, "generator"), (1, "discriminator")):
        stats = monitor.latest[index]
        totals[index] = stats.total
        layers = ", ".join(f"{layer} {norm:.3g}" for layer, norm in stats.layers.items())
        print(f"optimizer {index} ({name}): gradient norm {stats.total:.3g} [{layers}]")
    print(f"gradient events: {[(e.kind, e.optimizer_index, e.step) for e in monitor.events]}")
    print(f"non-finite events: {len(guard.events)}, skipped steps: {guard.skipped_steps}")
    for record in curvature.history[-3:]:
        print(
            f"discriminator Hessian at step {record.step}: lambda_max {record.lambda_max:.4g}, "
            f"lambda_min {record.lambda_min:+.3g}, sharpness/threshold "
            f"{_fmt(record.sharpness_ratio)}, noise scale {_fmt(record.noise_scale)}"
        )
    return totals


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


if __name__ == "__main__":
    main()
