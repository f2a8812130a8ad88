"""optdiag's callbacks switched on from a LightningCLI YAML config, logging to TensorBoard.

The script is an ordinary LightningCLI entry point: a model, a datamodule and ``LightningCLI``.
The callbacks are not in the code but in ``config.yaml``, under ``trainer.callbacks`` as
``class_path: lightning_optdiag.callbacks.GradientMonitor`` with their ``init_args``, and the
logger is a ``TensorBoardLogger``. The only optdiag-aware line in the script is in
``after_fit``: it writes the doctor's diagnoses next to the logs, if a doctor was configured.

    python examples/lightning_cli/train.py fit --config examples/lightning_cli/config.yaml
    tensorboard --logdir runs/lightning_cli
    optdiag report runs/lightning_cli --latest

LightningCLI needs ``jsonargparse[signatures]`` (``pip install -e '.[examples]'``; installed by
``scripts/demo.sh``).

Any setting can be overridden on the command line, e.g. a quick check in a few seconds:

    python examples/lightning_cli/train.py fit --config examples/lightning_cli/config.yaml \\
        --trainer.max_steps 20 --trainer.logger.init_args.save_dir /tmp/runs
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optdiag.callbacks import TrainingDoctor


class Regressor(LightningModule):
    """An MLP fitting a smooth function of its inputs."""

    def __init__(self, hidden: int = 64, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(8, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 1),
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.net(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(inputs), targets))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


class SyntheticData(LightningDataModule):
    """``y = sum(sin(x W)) + noise`` for Gaussian ``x`` and a fixed random ``W``."""

    def __init__(self, num_samples: int = 2560, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        inputs = torch.randn(self.num_samples, 8, generator=generator)
        weights = torch.randn(8, 3, generator=generator)
        targets = torch.sin(inputs @ weights).sum(dim=1, keepdim=True)
        targets = targets + 0.1 * torch.randn(self.num_samples, 1, generator=generator)
        split = self.num_samples * 4 // 5
        self.train_set = TensorDataset(inputs[:split], targets[:split])
        self.val_set = TensorDataset(inputs[split:], targets[split:])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=len(self.val_set))


class CLI(LightningCLI):
    def after_fit(self) -> None:
        """Write the diagnoses of a configured TrainingDoctor next to the logs."""
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]
        doctors = [cb for cb in callbacks if isinstance(cb, TrainingDoctor)]
        if not doctors or not self.trainer.is_global_zero:
            return
        path = Path(self.trainer.log_dir or ".") / "diagnoses.json"
        doctors[0].to_json(path)
        kinds = [diagnosis.kind for diagnosis in doctors[0].diagnoses]
        print(f"{len(kinds)} diagnoses {kinds} written to {path}")


def main() -> None:
    # Lightning's INFO lines ("GPU available: False ...") are not results.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        # Synthetic in-memory tensors need no loader workers; Lightning still suggests them.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        # Lightning 2.6's CombinedLoader still uses a torch pytree class that newer torch
        # deprecates (a FutureWarning from inside Lightning, nothing to act on here).
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)", FutureWarning)
        CLI(Regressor, SyntheticData)


if __name__ == "__main__":
    main()
