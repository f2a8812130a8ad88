"""Shared fixtures for the optimizer tests: a tiny model, deterministic batches, optimizer cases."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_optdiag.optim import (
    LAMB,
    LARS,
    SGDW,
    SWATS,
    AdaBound,
    AMSBound,
    Lookahead,
    param_groups_for_layer_adaptation,
)

IN_FEATURES = 6
OUT_FEATURES = 3


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """Linear -> LayerNorm -> Tanh -> Linear: weights, biases and norm parameters."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(IN_FEATURES, 8),
        nn.LayerNorm(8),
        nn.Tanh(),
        nn.Linear(8, OUT_FEATURES),
    )
    return model.to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The batch of a given step, the same in every run (so a resumed run sees the same data)."""
    generator = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(16, IN_FEATURES, generator=generator, dtype=torch.float64)
    targets = torch.randn(16, OUT_FEATURES, generator=generator, dtype=torch.float64)
    return inputs.to(dtype), targets.to(dtype)


def loss_at(model: nn.Module, step: int) -> Tensor:
    dtype = next(model.parameters()).dtype
    inputs, targets = batch(step, dtype)
    return nn.functional.mse_loss(model(inputs), targets)


def train(model: nn.Module, optimizer: Optimizer, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        loss_at(model, step).backward()
        optimizer.step()


def grad_of(p: Tensor) -> Tensor:
    """``p.grad``, which the test has set."""
    assert p.grad is not None
    return p.grad


def round_trip(obj: Any) -> Any:
    """Through torch.save / torch.load(weights_only=True), as a checkpoint would go."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@dataclass(frozen=True)
class Case:
    """A named optimizer configuration; ``build(model, foreach)`` returns a fresh optimizer."""

    name: str
    build: Callable[[nn.Module, bool | None], Optimizer]
    bundled: type[Optimizer]

    def __str__(self) -> str:
        return self.name


def _layer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    return param_groups_for_layer_adaptation(model, weight_decay=weight_decay)


CASES = [
    Case("swats", lambda m, f: SWATS(m.parameters(), lr=1e-2, foreach=f), SWATS),
    Case(
        "swats-per-layer",
        lambda m, f: SWATS(m.parameters(), lr=1e-2, mode="per_layer", foreach=f),
        SWATS,
    ),
    # Switches at step 9: a checkpoint at step 7 is taken in the Adam phase and the resumed run
    # must switch at the same step with the same Lambda.
    Case(
        "swats-switching",
        lambda m, f: SWATS(
            m.parameters(), lr=1e-2, switch_threshold=math.inf, switch_min_steps=9, foreach=f
        ),
        SWATS,
    ),
    Case(
        "swats-per-layer-switching",
        lambda m, f: SWATS(
            m.parameters(),
            lr=1e-2,
            weight_decay=1e-3,
            mode="per_layer",
            switch_threshold=math.inf,
            switch_min_steps=5,
            foreach=f,
        ),
        SWATS,
    ),
    # k=3: the checkpoint at step 7 falls inside a cycle.
    Case(
        "lookahead-adam",
        lambda m, f: Lookahead(torch.optim.Adam(m.parameters(), lr=1e-2), k=3, foreach=f),
        Lookahead,
    ),
    Case(
        "lookahead-sgdw",
        lambda m, f: Lookahead(
            SGDW(m.parameters(), lr=0.05, momentum=0.9, foreach=f), k=4, alpha=0.8, foreach=f
        ),
        Lookahead,
    ),
    Case(
        "adabound",
        lambda m, f: AdaBound(
            m.parameters(), lr=1e-2, final_lr=0.05, gamma=0.1, weight_decay=1e-3, foreach=f
        ),
        AdaBound,
    ),
    Case(
        "amsbound",
        lambda m, f: AMSBound(m.parameters(), lr=1e-2, final_lr=0.05, gamma=0.1, foreach=f),
        AMSBound,
    ),
    Case(
        "sgdw",
        lambda m, f: SGDW(m.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1, foreach=f),
        SGDW,
    ),
    Case(
        "sgdw-nesterov",
        lambda m, f: SGDW(
            m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, foreach=f
        ),
        SGDW,
    ),
    Case(
        "lars",
        lambda m, f: LARS(_layer_groups(m, 1e-3), lr=2.0, trust_coefficient=0.01, foreach=f),
        LARS,
    ),
    Case(
        "lamb",
        lambda m, f: LAMB(_layer_groups(m, 1e-2), lr=1e-2, foreach=f),
        LAMB,
    ),
]


def optimizer_tensors(optimizer: Optimizer) -> list[Tensor]:
    """Every tensor in the optimizer's state (and Lookahead's slow weights), in a fixed order."""
    tensors: list[Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            tensors.extend(v for _, v in sorted(state.items()) if isinstance(v, Tensor))
    if isinstance(optimizer, Lookahead):
        tensors.extend(optimizer.slow_weights())
    return tensors
