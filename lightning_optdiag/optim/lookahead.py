"""Lookahead: k fast steps with any optimizer, then pull slow weights towards the fast ones."""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_optdiag._validation import check_float, check_int
from lightning_optdiag.optim._base import Closure, group_by_device_and_dtype, use_foreach

__all__ = ["Lookahead"]

_STATE_KEY = "lookahead"


class Lookahead(Optimizer):
    r"""Wrap any optimizer with Lookahead (Zhang et al. 2019).

    Every :meth:`step` is one step of the base ("fast") optimizer; after every ``k`` of them the
    slow weights :math:`\phi` move towards the fast weights :math:`\theta` and the fast weights
    restart from there:

    .. math::
        \phi \leftarrow \phi + \alpha(\theta - \phi), \qquad \theta \leftarrow \phi.

    The slow weights start at the parameters' values when the wrapper is built. The base's own
    state (momentum, Adam moments) is kept across synchronisations, the paper's default.

    Sharing: ``param_groups``, ``state`` and ``defaults`` are the base optimizer's own objects,
    so an LR scheduler built on the wrapper (StepLR, OneCycleLR, ...), Lightning's LR monitor or
    any code reading ``param_groups[i]["lr"]`` acts on the base. They stay shared after
    :meth:`load_state_dict` (torch's loader replaces the base's lists) and after
    :meth:`add_param_group`.

    Checkpoints: :meth:`state_dict` is the base's state dict plus a ``"lookahead"`` entry with
    the slow weights (by parameter index, as torch numbers them), the step counter, ``k`` and
    ``alpha``; :meth:`load_state_dict` restores all of it. A plain state dict of the base
    optimizer also loads (e.g. when Lookahead is added to a run that started without it): the
    slow weights then restart from the current parameters and the counter from 0.

    Sparse gradients are whatever the base does with them.

    Args:
        base_optimizer: The fast optimizer, any :class:`torch.optim.Optimizer`.
        k: Number of fast steps between synchronisations, an integer >= 1 (default: 5).
        alpha: Slow step size, in (0, 1] (default: 0.5). ``k=1, alpha=1`` is the base optimizer.
        foreach: Use ``torch._foreach_*`` ops for the synchronisation; ``None`` (default) picks
            them for plain tensors.

    Raises:
        TypeError: If ``base_optimizer`` is not a torch optimizer, or ``k`` is not an integer.
        ValueError: For ``k < 1`` or ``alpha`` outside (0, 1].

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = Lookahead(torch.optim.Adam(model.parameters(), lr=1e-3), k=5, alpha=0.5)
        >>> scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> optimizer.step()

    References:
        Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back", 2019,
        arXiv:1907.08610.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        k: int = 5,
        alpha: float = 0.5,
        *,
        foreach: bool | None = None,
    ) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(
                "Invalid base_optimizer: expected a torch.optim.Optimizer, got "
                f"{type(base_optimizer).__name__}"
            )
        _check_k(k)
        _check_alpha(alpha)
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"Invalid foreach: {foreach!r} (expected True, False or None)")
        self.base_optimizer = base_optimizer
        self.k = k
        self.alpha = alpha
        self.foreach = foreach
        #: Fast steps taken so far; a synchronisation happens when it reaches a multiple of k.
        self.lookahead_step = 0
        self._slow_weights: dict[Tensor, Tensor] = {}
        self._sharing_base = False
        # torch's constructor registers the hooks and calls add_param_group for every group; our
        # add_param_group recognises the base's groups and only snapshots their slow weights.
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self._share_base()

    def _share_base(self) -> None:
        # The same objects, not copies: schedulers write "lr" into these dicts.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = self.base_optimizer.defaults
        self._sharing_base = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; its slow weights start at the current values."""
        if self._sharing_base:
            self.base_optimizer.add_param_group(param_group)
            self._share_base()
            group = self.param_groups[-1]
        else:
            # Called by Optimizer.__init__ with the base's existing groups.
            group = param_group
            self.param_groups.append(group)
        self._snapshot(group["params"])

    def _snapshot(self, params: list[Tensor]) -> None:
        with torch.no_grad():
            for p in params:
                self._slow_weights[p] = p.detach().clone(memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        """One fast step of the base optimizer, then a synchronisation every ``k`` steps.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss; passed
                to the base optimizer.

        Returns:
            What the base optimizer's ``step`` returned.
        """
        loss = (
            self.base_optimizer.step(closure) if closure is not None else self.base_optimizer.step()
        )
        self.lookahead_step += 1
        if self.lookahead_step % self.k == 0:
            self._synchronise()
        return loss

    def _synchronise(self) -> None:
        params = list(chain.from_iterable(group["params"] for group in self.param_groups))
        slow = [self._slow_weight(p) for p in params]
        if not use_foreach(self.foreach, params):
            for fast_weight, slow_weight in zip(params, slow, strict=True):
                # lerp is exact at alpha=1 (phi becomes theta), unlike phi + 1 * (theta - phi).
                slow_weight.lerp_(fast_weight, self.alpha)
                fast_weight.copy_(slow_weight)
            return
        for (chunk_fast, chunk_slow), _ in group_by_device_and_dtype([params, slow]):
            torch._foreach_lerp_(chunk_slow, chunk_fast, self.alpha)
            torch._foreach_copy_(chunk_fast, chunk_slow)

    def _slow_weight(self, p: Tensor) -> Tensor:
        slow = self._slow_weights[p]
        if slow.device != p.device or slow.dtype != p.dtype:
            # The module was moved (e.g. .to("cuda") after the optimizer was built).
            slow = self._slow_weights[p] = slow.to(device=p.device, dtype=p.dtype)
        return slow

    def slow_weights(self) -> list[Tensor]:
        """The slow weights, in the order of the parameters in ``param_groups``."""
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        return [self._slow_weight(p) for p in params]

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a ``"lookahead"`` entry (slow weights, counter).

        Like torch's, the returned tensors are references; copy them (``torch.save`` does) before
        taking more steps if the dict must stay a snapshot.
        """
        state_dict = self.base_optimizer.state_dict()
        state_dict[_STATE_KEY] = {
            "slow_weights": dict(enumerate(self.slow_weights())),
            "step": self.lookahead_step,
            "k": self.k,
            "alpha": self.alpha,
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the base optimizer, the slow weights and the counter.

        Raises:
            ValueError: If the slow weights do not match the parameters.
        """
        state_dict = dict(state_dict)
        lookahead = state_dict.pop(_STATE_KEY, None)
        self.base_optimizer.load_state_dict(state_dict)
        # torch's loader built new group dicts and a new list inside the base: share them again.
        self._share_base()
        params = list(chain.from_iterable(group["params"] for group in self.param_groups))
        if lookahead is None:
            self._snapshot(params)
            self.lookahead_step = 0
            return
        saved = lookahead["slow_weights"]
        if len(saved) != len(params):
            raise ValueError(
                f"Invalid Lookahead state: {len(saved)} slow weights for {len(params)} parameters"
            )
        with torch.no_grad():
            for index, p in enumerate(params):
                slow = saved[index]
                if slow.shape != p.shape:
                    raise ValueError(
                        f"Invalid Lookahead state: slow weight {index} has shape "
                        f"{tuple(slow.shape)}, its parameter {tuple(p.shape)}"
                    )
                self._slow_weights[p] = slow.to(device=p.device, dtype=p.dtype, copy=True)
        self.lookahead_step = int(lookahead["step"])
        self.k = lookahead.get("k", self.k)
        self.alpha = lookahead.get("alpha", self.alpha)

    def __getstate__(self) -> dict[str, Any]:
        # torch's version keeps only defaults/state/param_groups, which would drop the base.
        return dict(self.__dict__)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Delegate to the base optimizer."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, base={self.base_optimizer!r})"


def _check_k(k: object) -> None:
    check_int("k", k, minimum=1)


def _check_alpha(alpha: object) -> None:
    check_float("alpha", alpha, minimum=0.0, exclusive_minimum=True, maximum=1.0)
