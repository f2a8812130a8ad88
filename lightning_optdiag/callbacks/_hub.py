"""One device-to-host transfer per optimizer step, shared by every optdiag callback.

During a step, callbacks hand device tensors they want to read later to the trainer's
:class:`SignalHub` (``defer``): the loss, the parameter norms after the previous step, update
norms. When the first callback asks for the step's gradient norms, the hub computes all of them
with one fused reduction and reads everything back in a single ``tolist()``; the second callback
gets the cached reading. On a healthy step that is the only synchronisation optdiag adds.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_optdiag.signals import tensor_norms

__all__ = ["GradientReading", "SignalHub", "hub_for"]

Consumer = Callable[[np.ndarray], None]


@dataclass(frozen=True)
class GradientReading:
    """The gradient norms of one optimizer at one step, read back to the host.

    Attributes:
        step: the trainer's ``global_step`` when the optimizer was about to step.
        names: names of the parameters that have a gradient, in the optimizer's order.
        params: those parameters.
        norms: their gradient norms (float64 NumPy array; non-finite when the gradient is).
        total: the norm of all these gradients together.
    """

    step: int
    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    norms: np.ndarray
    total: float


class SignalHub:
    """Collects deferred device tensors and reads them back with the step's gradient norms."""

    def __init__(self) -> None:
        self._pending: list[tuple[Tensor, Consumer]] = []
        self._readings: dict[tuple[int, int, float], GradientReading] = {}
        self._layouts: dict[
            int, tuple[tuple[int, int], tuple[nn.Parameter, ...], tuple[str, ...]]
        ] = {}

    def defer(self, values: Tensor, consumer: Consumer) -> None:
        """Read ``values`` at the next transfer; ``consumer`` gets them flattened, as float64."""
        self._pending.append((values.detach().reshape(-1), consumer))

    def gradient_reading(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, step: int, norm_type: float
    ) -> GradientReading:
        """The gradient norms of ``optimizer``'s parameters at ``step``, computed once per step."""
        key = (step, id(optimizer), norm_type)
        cached = self._readings.get(key)
        if cached is not None:
            return cached
        params, names = self._layout(module, optimizer)
        grads = [param.grad for param in params]
        if any(grad is None for grad in grads):  # parameters this step did not reach
            keep = [i for i, grad in enumerate(grads) if grad is not None]
            params = tuple(params[i] for i in keep)
            names = tuple(names[i] for i in keep)
            grads = [grads[i] for i in keep]
        norms = tensor_norms(grads, norm_type)  # type: ignore[arg-type]
        norms_host = self._transfer(norms)[: len(params)]
        reading = GradientReading(step, names, params, norms_host, _combined(norms_host, norm_type))
        self._readings = {key: reading}  # older steps are never asked for again
        return reading

    def flush(self) -> None:
        """Read whatever is still deferred (end of training, before a checkpoint)."""
        if self._pending:
            self._transfer(torch.zeros(0))

    def _transfer(self, head: Tensor) -> np.ndarray:
        pending, self._pending = self._pending, []
        device = head.device if head.numel() or not pending else pending[0][0].device
        parts = [head.to(device=device, dtype=torch.float64)]
        parts += [values.to(device=device, dtype=torch.float64) for values, _ in pending]
        host = torch.cat(parts).cpu().numpy()  # the one synchronisation
        offset = head.numel()
        for values, consume in pending:
            consume(host[offset : offset + values.numel()])
            offset += values.numel()
        return host

    def _layout(
        self, module: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[tuple[nn.Parameter, ...], tuple[str, ...]]:
        """The optimizer's parameters and their names, rebuilt only when its groups change."""
        groups = optimizer.param_groups
        signature = (len(groups), sum(len(group["params"]) for group in groups))
        cached = self._layouts.get(id(optimizer))
        if cached is not None and cached[0] == signature:
            return cached[1], cached[2]
        names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
        params = tuple(param for group in groups for param in group["params"])
        labels = tuple(names.get(id(p), f"<unnamed {tuple(p.shape)}>") for p in params)
        self._layouts[id(optimizer)] = (signature, params, labels)
        return params, labels


_HUBS: weakref.WeakKeyDictionary[Any, SignalHub] = weakref.WeakKeyDictionary()


def hub_for(trainer: Any) -> SignalHub:
    """The hub shared by all optdiag callbacks of ``trainer``."""
    hub = _HUBS.get(trainer)
    if hub is None:
        hub = _HUBS[trainer] = SignalHub()
    return hub


def _combined(norms: np.ndarray, norm_type: float) -> float:
    """The norm of all tensors together from their norms (non-finite if any of them is)."""
    if norms.size == 0:
        return 0.0
    if math.isinf(norm_type):
        return float(norms.max())
    if norm_type == 2.0:
        return math.sqrt(float(norms @ norms))
    return float((norms**norm_type).sum() ** (1.0 / norm_type))


def layer_of(name: str) -> str:
    """The module that owns parameter ``name`` (``"encoder.0.weight"`` -> ``"encoder.0"``)."""
    return name.rsplit(".", 1)[0] if "." in name else name


def nonfinite_names(names: Sequence[str], norms: np.ndarray) -> list[str]:
    """Names whose norm is non-finite (candidates: a huge finite tensor can overflow its norm)."""
    return [name for name, norm in zip(names, norms, strict=True) if not np.isfinite(norm)]
