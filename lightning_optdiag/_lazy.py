"""Lazy package attributes (PEP 562): a name is imported from its submodule on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, submodules: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving ``name`` from ``package.<submodules[name]>``.

    Packages use it to keep ``import`` cheap (no torch just to read records back); type checkers
    and the documentation see the names through ``if TYPE_CHECKING:`` imports.
    """

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return getattr(importlib.import_module(f"{package}.{submodules[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
