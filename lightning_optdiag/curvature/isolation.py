"""Run extra forward passes on a model without any trace on the training run.

A curvature probe evaluates the training loss once more. Left alone, that forward pass would
update BatchNorm running statistics, draw dropout masks from the global RNG (shifting every later
draw of the training loop), and could leave modules in another mode. :func:`isolated_forward`
prevents all of it:

- buffers are swapped for private copies for the duration of the block, so the model's own buffer
  tensors are never written (not even their autograd version counters move; a graph built inside
  the block keeps the copies alive and stays valid after the block);
- the CPU, CUDA (when initialised), Python ``random`` and NumPy global RNG states are restored;
- every module's ``training`` flag is restored;
- every parameter's ``.grad`` attribute is re-bound to the tensor it held before.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["isolated_forward"]


@dataclass
class _RngSnapshot:
    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None
    python: tuple[Any, ...]
    numpy: dict[str, Any]

    @classmethod
    def take(cls) -> _RngSnapshot:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(
            cpu=torch.get_rng_state(),
            cuda=cuda,
            python=random.getstate(),
            # The legacy global state is what user code drawing from np.random consumes.
            numpy=np.random.get_state(legacy=False),  # noqa: NPY002
        )

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        np.random.set_state(self.numpy)  # noqa: NPY002


def _swap_in_buffer_copies(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Replace every buffer of ``model`` by a copy and return what to put back.

    Tied buffers (one tensor registered in several modules) share one copy, as they shared the
    original.
    """
    copies: dict[int, torch.Tensor] = {}
    originals: list[tuple[nn.Module, str, torch.Tensor]] = []
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is None:
                continue
            if id(buffer) not in copies:
                copies[id(buffer)] = buffer.detach().clone()
            originals.append((module, name, buffer))
            module._buffers[name] = copies[id(buffer)]
    return originals


@contextmanager
def isolated_forward(model: nn.Module) -> Iterator[None]:
    """Context manager under which forward passes of ``model`` leave no trace on training.

    Use it around any extra evaluation of the training loss (curvature probes, replays of a bad
    batch). Autograd graphs built inside remain usable after the block.

    Args:
        model: the module whose state must be preserved.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example::

        with isolated_forward(model):
            loss = loss_fn(model, batch)
        # model buffers, modes, .grad and the global RNG streams are as before the block
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
    modes = [(module, module.training) for module in model.modules()]
    grads = [(param, param.grad) for param in model.parameters()]
    rng = _RngSnapshot.take()
    originals = _swap_in_buffer_copies(model)
    try:
        yield
    finally:
        for module, name, buffer in originals:
            module._buffers[name] = buffer
        for module, training in modes:
            module.training = training
        for param, grad in grads:
            if param.grad is not grad:
                param.grad = grad
        rng.restore()
