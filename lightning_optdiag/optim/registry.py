"""One registry over torch.optim's optimizers and the bundled ones."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from lightning_optdiag.optim.adabound import AdaBound, AMSBound
from lightning_optdiag.optim.lamb import LAMB
from lightning_optdiag.optim.lars import LARS
from lightning_optdiag.optim.lookahead import Lookahead
from lightning_optdiag.optim.sgdw import SGDW
from lightning_optdiag.optim.swats import SWATS

__all__ = ["create_optimizer", "list_optimizers"]


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Optimizer]
    # Defaults the name implies but the caller may override (sgdm's momentum=0.9).
    defaults: dict[str, Any] = field(default_factory=dict)
    # Settings that define the name (nag's nesterov=True); contradicting them is an error.
    fixed: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, _Entry] = {
    # torch.optim natives: reused, never rewritten.
    "sgd": _Entry(torch.optim.SGD),
    "sgdm": _Entry(torch.optim.SGD, defaults={"momentum": 0.9}),
    "nag": _Entry(torch.optim.SGD, defaults={"momentum": 0.9}, fixed={"nesterov": True}),
    "adagrad": _Entry(torch.optim.Adagrad),
    "rmsprop": _Entry(torch.optim.RMSprop),
    "adadelta": _Entry(torch.optim.Adadelta),
    "adam": _Entry(torch.optim.Adam),
    "amsgrad": _Entry(torch.optim.Adam, fixed={"amsgrad": True}),
    "adamw": _Entry(torch.optim.AdamW),
    "nadam": _Entry(torch.optim.NAdam),
    "radam": _Entry(torch.optim.RAdam),
    # Bundled: what torch.optim lacks.
    "swats": _Entry(SWATS),
    "adabound": _Entry(AdaBound),
    "amsbound": _Entry(AMSBound),
    "sgdw": _Entry(SGDW),
    "lars": _Entry(LARS),
    "lamb": _Entry(LAMB),
}
_LOOKAHEAD = "lookahead"
_LOOKAHEAD_KEYS = ("k", "alpha")


def list_optimizers() -> list[str]:
    """The names :func:`create_optimizer` accepts, sorted.

    Returns:
        Lower-case names: the torch natives (sgd, sgdm, nag, adagrad, rmsprop, adadelta, adam,
        amsgrad, adamw, nadam, radam), the bundled optimizers (swats, adabound, amsbound, sgdw,
        lars, lamb) and lookahead.

    Example:
        >>> "swats" in list_optimizers()
        True
    """
    return sorted([*_REGISTRY, _LOOKAHEAD])


def create_optimizer(name: str, params: ParamsT, **kwargs: Any) -> Optimizer:
    """Build an optimizer by name; keyword arguments go to its constructor.

    Presets: ``sgd`` is ``torch.optim.SGD`` as is; ``sgdm`` defaults to ``momentum=0.9``;
    ``nag`` is SGD with ``nesterov=True`` (and ``momentum=0.9`` by default); ``amsgrad`` is
    ``torch.optim.Adam(amsgrad=True)``. ``lookahead`` wraps another registered optimizer:
    ``create_optimizer("lookahead", params, base="adam", k=5, alpha=0.5, lr=1e-3)`` passes
    ``k`` and ``alpha`` to :class:`~lightning_optdiag.optim.Lookahead` and the rest to the base
    (default base: ``"adam"``).

    Args:
        name: Case-insensitive name from :func:`list_optimizers`.
        params: Parameters or param-group dicts, as for any torch optimizer.
        **kwargs: Constructor arguments; invalid ones raise the optimizer's own error.

    Returns:
        The optimizer.

    Raises:
        TypeError: If ``name`` is not a string, or from the constructor (unknown argument).
        ValueError: For an unknown name (the message lists the valid ones), an argument that
            contradicts the preset (``nag`` with ``nesterov=False``), or from the constructor
            (invalid value).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = create_optimizer("NAG", model.parameters(), lr=0.1)
        >>> optimizer.param_groups[0]["nesterov"]
        True
    """
    key = _normalise(name)
    if key == _LOOKAHEAD:
        return _create_lookahead(params, kwargs)
    entry = _REGISTRY[key]
    for argument, required in entry.fixed.items():
        if argument in kwargs and kwargs[argument] != required:
            raise ValueError(
                f"Invalid {argument} for optimizer {key!r}: {kwargs[argument]!r} "
                f"({key!r} always uses {argument}={required!r})"
            )
    return entry.factory(params, **{**entry.defaults, **kwargs, **entry.fixed})


def _create_lookahead(params: ParamsT, kwargs: dict[str, Any]) -> Optimizer:
    base_kwargs = dict(kwargs)
    base_name = _normalise(base_kwargs.pop("base", "adam"))
    if base_name == _LOOKAHEAD:
        raise ValueError(
            "Invalid base for optimizer 'lookahead': 'lookahead' (nesting it is not supported)"
        )
    wrapper_kwargs = {key: base_kwargs.pop(key) for key in _LOOKAHEAD_KEYS if key in base_kwargs}
    return Lookahead(create_optimizer(base_name, params, **base_kwargs), **wrapper_kwargs)


def _normalise(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"Invalid optimizer name: {name!r} (expected a string)")
    key = name.strip().lower()
    if key not in _REGISTRY and key != _LOOKAHEAD:
        raise ValueError(
            f"Unknown optimizer: {name!r} (valid names: {', '.join(list_optimizers())})"
        )
    return key
