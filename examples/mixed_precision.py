"""optdiag's callbacks under mixed precision on CPU: bf16, and fp16 with a loss scaler.

The same ordinary classifier is trained twice from the same seed, with the callbacks attached:

- ``precision="bf16-mixed"``: bfloat16 autocast. bf16 has float32's exponent range, so there is
  no loss scaler, and any NaN/inf is a real failure that ``NonFiniteGuard`` reports.
- fp16 (``"16-mixed"``): float16 autocast with a ``GradScaler``. The scaler multiplies the loss
  by a large factor so that small gradients survive float16; when the scaled gradients overflow
  it skips the step and halves the factor, a burst of skips at the start and about one every
  2000 steps being normal. ``NonFiniteGuard`` counts these in ``guard.scaler_skips`` and does
  not report them (a false alarm on every fp16 run otherwise) unless ``max_scaler_skips``
  happen in a row or the scale falls below ``min_loss_scale``.

fp16 on CPU: ``Trainer(accelerator="cpu", precision="16-mixed")`` does not run fp16 in
Lightning 2.6: it warns that AMP with fp16 is not supported on CPU and falls back to bf16. On a
GPU, pass ``precision="16-mixed"`` and nothing else. To show fp16 here anyway, the script gives
the Trainer the precision plugin explicitly, ``MixedPrecision("16-mixed", device="cpu",
scaler=torch.amp.GradScaler("cpu", init_scale=2.0**20))``, which PyTorch does run on CPU (slowly).
The initial scale is deliberately higher than the default 2**16, so that this small model shows
the burst of skipped steps at the start that large models get on a GPU.

    python examples/mixed_precision.py                     # both, 600 steps each
    python examples/mixed_precision.py --precision bf16-mixed
    python examples/mixed_precision.py --fast              # both, a few seconds
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optdiag.callbacks import (
    CurvatureMonitor,
    GradientMonitor,
    NonFiniteGuard,
    TrainingDoctor,
)

PRECISIONS = ("bf16-mixed", "16-mixed")


class Classifier(LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10)
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        loss = nn.functional.cross_entropy(self.net(inputs), labels)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def make_loader(seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(4096, 32, generator=generator)
    teacher = torch.randn(32, 10, generator=generator)
    labels = (inputs @ teacher + 0.5 * torch.randn(4096, 10, generator=generator)).argmax(dim=1)
    dataset = TensorDataset(inputs, labels)
    return DataLoader(dataset, batch_size=64, shuffle=True, generator=generator)


class LossHistory(Callback):
    """Keeps every training loss (the loss is computed in float32 under both precisions)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


@dataclass
class Result:
    precision: str
    losses: list[float]
    guard: NonFiniteGuard
    monitor: GradientMonitor
    curvature: CurvatureMonitor
    doctor: TrainingDoctor
    final_scale: float | None


def train(precision: str, steps: int, seed: int) -> Result:
    seed_everything(seed, verbose=False)
    model = Classifier()
    guard = NonFiniteGuard(action="skip")  # defaults: 10 scaler skips in a row are a failure
    monitor = GradientMonitor()
    curvature = CurvatureMonitor(every_n_steps=100, max_overhead=None)  # tiny model: no budget
    doctor = TrainingDoctor(check_every_n_steps=25, window=100, console=False)
    history = LossHistory()
    callbacks: list[Callback] = [monitor, guard, curvature, doctor, history]
    options: dict[str, object] = {"precision": precision}
    if precision == "16-mixed":
        # On a GPU: Trainer(precision="16-mixed"). On CPU, the plugin given explicitly.
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
        options = {"plugins": [MixedPrecision("16-mixed", device="cpu", scaler=scaler)]}
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,  # type: ignore[arg-type]
    )
    with warnings.catch_warnings():
        # Synthetic in-memory tensors need no loader workers; Lightning still suggests them.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        # Lightning 2.6's CombinedLoader still uses a torch pytree class that newer torch
        # deprecates (a FutureWarning from inside Lightning, nothing to act on here).
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)", FutureWarning)
        trainer.fit(model, make_loader(seed))
    used_scaler = getattr(trainer.precision_plugin, "scaler", None)
    return Result(
        precision=precision,
        losses=history.losses,
        guard=guard,
        monitor=monitor,
        curvature=curvature,
        doctor=doctor,
        final_scale=None if used_scaler is None else float(used_scaler.get_scale()),
    )


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=(*PRECISIONS, "both"), default="both")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (default: 600)")
    parser.add_argument("--fast", action="store_true", help="150 steps, for a quick check")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = 150 if args.fast else args.steps
    if steps < 1:
        parser.error(f"--steps must be >= 1, got {steps}")

    # Lightning's INFO lines ("Using bfloat16 Automatic Mixed Precision", ...) are not results.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    precisions = PRECISIONS if args.precision == "both" else (args.precision,)
    results = [train(precision, steps, args.seed) for precision in precisions]
    for result in results:
        losses = result.losses
        finite = all(math.isfinite(loss) for loss in losses)
        start = sum(losses[:10]) / len(losses[:10])
        end = sum(losses[-10:]) / len(losses[-10:])
        scale = "-" if result.final_scale is None else f"{result.final_scale:g}"
        record = result.curvature.latest
        print(
            f"{result.precision}: {len(losses)} steps, loss {start:.3f} -> {end:.3f} "
            f"(all finite: {finite})"
        )
        print(
            f"  NonFiniteGuard: {len(result.guard.events)} events, "
            f"{result.guard.scaler_skips} scaler skips, final loss scale {scale}"
        )
        print(
            f"  GradientMonitor: gradient norm {result.monitor.latest[0].total:.3g}, "
            f"{len(result.monitor.events)} events"
        )
        if record is not None:
            print(
                f"  CurvatureMonitor: lambda_max {record.lambda_max:.4g} at step {record.step}, "
                f"sharpness/threshold {record.sharpness_ratio or math.nan:.3g}"
            )
        kinds = [f"{d.kind}@{d.step}" for d in result.doctor.diagnoses]
        print(f"  TrainingDoctor: {kinds or 'no diagnoses'}")
    return results


if __name__ == "__main__":
    main()
