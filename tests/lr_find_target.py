"""Tiny Lightning modules for the LR range test, importable as ``tests.lr_find_target:Name``.

``TinyRegression`` is a linear model trained with plain SGD on MSE over synthetic features of unit
variance. Its loss is quadratic, with Hessian ``H = 2/n [X 1]^T [X 1]`` over the full data set:
with full batches (``batch_size = samples``) gradient descent converges for every learning rate
below ``2 / lambda_max(H)`` and diverges above it, so the range test has a known answer.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def regression_data(samples: int = 64, features: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Features ~ N(0, 1) and targets ``X w + 0.1 noise``, the same for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, generator=generator)
    weights = torch.randn(features, 1, generator=generator)
    targets = inputs @ weights + 0.1 * torch.randn(samples, 1, generator=generator)
    return inputs, targets


def divergence_lr(inputs: Tensor) -> float:
    """``2 / lambda_max`` of the Hessian of the full-batch MSE of a linear model with bias."""
    design = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1).double()
    hessian = 2.0 / len(inputs) * design.T @ design
    return 2.0 / float(torch.linalg.eigvalsh(hessian).max())


class RegressionWithoutData(LightningModule):
    """The model and its optimizer, but no ``train_dataloader()``."""

    def __init__(
        self, lr: float = 0.05, batch_size: int = 16, samples: int = 64, seed: int = 0
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.batch_size = batch_size
        self.inputs, self.targets = regression_data(samples, seed=seed)
        self.layer = nn.Linear(self.inputs.shape[1], 1)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # independent of the global RNG
            self.layer.weight.copy_(0.5 * torch.randn(self.layer.weight.shape, generator=generator))
            self.layer.bias.fill_(0.5)

    def loss(self, batch: Any) -> Tensor:
        inputs, targets = batch
        return nn.functional.mse_loss(self.layer(inputs), targets)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def batches(self) -> list[tuple[Tensor, Tensor]]:
        """The training batches in the order the data loader yields them (no shuffling)."""
        return list(
            zip(
                self.inputs.split(self.batch_size), self.targets.split(self.batch_size), strict=True
            )
        )


class TinyRegression(RegressionWithoutData):
    """:class:`RegressionWithoutData` with its own ``train_dataloader()`` (no shuffling)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.inputs, self.targets), batch_size=self.batch_size)


class TwoOptimizers(TinyRegression):
    """Lightning's finder refuses modules with more than one optimizer (manual optimization)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.manual_backward(loss)
        optimizers = self.optimizers()
        assert isinstance(optimizers, list)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        return loss

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD([self.layer.weight], lr=self.lr),
            torch.optim.SGD([self.layer.bias]),
        ]


class TinyData(LightningDataModule):
    """The same data as :class:`TinyRegression`, as a data module."""

    def __init__(self, batch_size: int = 16, samples: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.inputs, self.targets = regression_data(samples, seed=seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.inputs, self.targets), batch_size=self.batch_size)


class NotAModule:
    """A plain class: ``optdiag lr-find`` must refuse it."""


class BrokenInit(TinyRegression):
    """A module whose constructor fails."""

    def __init__(self) -> None:
        raise RuntimeError("cannot build\nthis module")
