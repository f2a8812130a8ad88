"""Shared set-up for the callback tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """One intra-op thread: tiny models run faster, and results do not depend on the machine's
    thread count (reductions split differently across threads round differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_rejected(
    factory: Callable[..., Any], kwargs: dict[str, Any], error: type[Exception], words: list[str]
) -> None:
    """``factory(**kwargs)`` raises exactly ``error``, with every one of ``words`` in its
    message (the argument's name, the bad value, what is accepted)."""
    with pytest.raises(error) as info:
        factory(**kwargs)
    assert type(info.value) is error
    for word in words:
        assert word in str(info.value)
