"""Independent references for the curvature tests: dense Hessians and planted spectra."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian


def dense_hessian(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    names: list[str] | None = None,
) -> Tensor:
    """The exact Hessian over the named parameters (default: all trainable), via torch.func.

    Only for models without normalisation layers: on torch 2.13, torch.func.hessian returns
    wrong, non-symmetric Hessians through batch_norm and layer_norm when both their input and
    their weight depend on the parameters (test_operator.py writes those layers out instead).
    """
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if names is None else names
    fixed = {n: p.detach() for n, p in named.items() if n not in names}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]

    def loss_of(theta: Tensor) -> Tensor:
        chunks = torch.split(theta, sizes)
        state = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        state.update(fixed)
        state.update({n: b.clone() for n, b in buffers.items()})

        class Bound(nn.Module):
            def forward(self, *args: Any, **kwargs: Any) -> Any:
                return functional_call(model, state, args, kwargs)

        return loss_fn(Bound(), batch)

    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    return hessian(loss_of)(theta)


def planted_matrix(spectrum: Tensor, seed: int = 0) -> Tensor:
    """``Q diag(spectrum) Q^T`` with a random orthogonal ``Q`` (float64)."""
    generator = torch.Generator().manual_seed(seed)
    n = spectrum.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * spectrum.double()) @ q.T


class Quadratic(nn.Module):
    """A model whose loss ``0.5 x^T A x + b^T x`` has the Hessian ``A`` exactly."""

    def __init__(self, matrix: Tensor, dtype: torch.dtype = torch.float64, seed: int = 1) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        n = matrix.shape[0]
        self.register_buffer("matrix", matrix.to(dtype))
        self.register_buffer("offset", torch.randn(n, generator=generator, dtype=dtype))
        self.x = nn.Parameter(torch.randn(n, generator=generator, dtype=dtype))

    def forward(self, batch: Any = None) -> Tensor:
        return 0.5 * self.x @ (self.matrix @ self.x) + self.offset @ self.x


def quadratic_loss(model: nn.Module, batch: Any) -> Tensor:
    return model(batch)


class DenseOperator:
    """A symmetric matrix behind the operator protocol, counting its products."""

    def __init__(self, matrix: Tensor) -> None:
        self.matrix = matrix
        self.num_hvps = 0
        self.applied: list[Tensor] = []

    @property
    def size(self) -> int:
        return self.matrix.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def matvec(self, vector: Tensor) -> Tensor:
        self.num_hvps += 1
        self.applied.append(vector.clone())
        return self.matrix @ vector


def cross_entropy_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs), targets)


def mse_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    inputs, targets = batch
    return nn.functional.mse_loss(model(inputs), targets)


def small_mlp(dtype: torch.dtype = torch.float64, seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3)
    ).to(dtype)


def classification_batch(
    num: int = 64, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num, 6, generator=generator, dtype=dtype)
    targets = torch.randint(0, 3, (num,), generator=generator)
    return inputs, targets
