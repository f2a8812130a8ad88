"""The Hessian of a training loss as a linear operator on flat parameter vectors."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from lightning_optdiag.curvature.isolation import isolated_forward

__all__ = [
    "HessianOperator",
    "LossFn",
    "NonFiniteLossError",
    "ParamSelection",
    "SymmetricOperator",
]


class NonFiniteLossError(ValueError):
    """The loss is NaN or infinite where the Hessian was asked for: curvature is undefined."""


LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar tensor``, differentiable in the model's parameters."""

ParamSelection = nn.Module | str | nn.Parameter | Iterable[nn.Parameter | str] | None
"""Which parameters the Hessian is taken over: see :class:`HessianOperator`."""

HvpReduce = Callable[[Tensor], Tensor]


@runtime_checkable
class SymmetricOperator(Protocol):
    """What the eigenvalue, trace and density estimators need from an operator."""

    @property
    def size(self) -> int:
        """Dimension of the space the operator acts on."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the vectors :meth:`matvec` takes and returns."""
        ...

    @property
    def device(self) -> torch.device:
        """Device of the vectors :meth:`matvec` takes and returns."""
        ...

    def matvec(self, vector: Tensor) -> Tensor:
        """Return the operator applied to a 1-D ``vector`` of length :attr:`size`."""
        ...


class HessianOperator:
    """The Hessian of ``loss_fn(model, batch)`` with respect to (some of) the model's parameters.

    Construction runs one forward pass and one gradient with ``create_graph=True``; every
    Hessian-vector product (HVP) is then a reverse-over-reverse product on that retained graph
    (Pearlmutter, 1994). All products therefore apply the *same* matrix, even when the model has
    dropout or BatchNorm in training mode: the dropout masks and batch statistics of the single
    forward pass are part of the graph.

    The forward pass runs under :func:`~lightning_optdiag.curvature.isolated_forward`, so buffers
    (BatchNorm running statistics), module modes, ``.grad`` and the global RNG streams are exactly
    as before. Attention runs on PyTorch's math SDPA kernel for that pass, because the fused
    kernels have no double backward. ``loss_fn`` must not call ``backward()`` itself.

    Parameters with ``requires_grad=False`` are never part of the operator. Vectors are flat, in
    the order of ``model.named_parameters()``, on the parameters' device; the working precision is
    float64 when any selected parameter is float64 and float32 otherwise (half-precision
    parameters have their products promoted to float32).

    Args:
        model: the module whose loss is differentiated.
        loss_fn: ``loss_fn(model, batch)`` returning a finite scalar (one-element) tensor.
        batch: passed to ``loss_fn`` (inference-mode tensors in it are cloned, since autograd
            cannot use them).
        params: the parameters to take the Hessian over. ``None`` (default) takes every trainable
            parameter; otherwise a submodule of ``model``, a parameter, a name, or an iterable of
            parameters and names. A name selects the parameter of that name or, as a prefix, all
            parameters of the submodule of that name (``"encoder.layers.0"``).
        hvp_reduce: applied to every product before it is returned, e.g.
            :func:`~lightning_optdiag.curvature.all_reduce_mean` to average the operator across
            data-parallel processes so that each of them sees the Hessian of the global batch.

    Raises:
        TypeError: ``model`` is not a module, ``loss_fn`` is not callable or does not return a
            tensor, or the selected parameters mix devices.
        ValueError: no trainable parameter is selected, a name matches nothing, or the loss is
            not a scalar or not connected to the selected parameters.
        NonFiniteLossError: the loss is NaN or infinite (a ``ValueError``).

    Example::

        def loss_fn(model, batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(model(x), y)

        with HessianOperator(model, loss_fn, (x, y)) as hessian:
            hv = hessian.matvec(torch.ones(hessian.size))
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        *,
        params: ParamSelection = None,
        hvp_reduce: HvpReduce | None = None,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(
                f"Invalid loss_fn: {loss_fn!r} (expected a callable loss_fn(model, batch))"
            )
        if hvp_reduce is not None and not callable(hvp_reduce):
            raise TypeError(f"Invalid hvp_reduce: {hvp_reduce!r} (expected a callable or None)")
        named = select_parameters(model, params)
        self._names = [name for name, _ in named]
        self._params = [param for _, param in named]
        self._numels = [param.numel() for param in self._params]
        self._size = sum(self._numels)
        self._device = _common_device(named)
        self._dtype = _working_dtype(self._params)
        self._hvp_reduce = hvp_reduce
        self._num_hvps = 0
        self._closed = False

        loss, grads = self._loss_and_graph(model, loss_fn, batch)
        self._loss = loss
        self._grads = grads
        # Products only flow through gradients that depend on the parameters again; a loss that
        # is linear in some parameter gives that parameter's gradient no graph (zero Hessian block).
        self._second_order = [
            i for i, grad in enumerate(grads) if grad is not None and grad.requires_grad
        ]
        self._second_order_grads: list[Tensor] = [
            grad for grad in grads if grad is not None and grad.requires_grad
        ]

    # ----------------------------------------------------------------------------------- protocol
    @property
    def size(self) -> int:
        """Number of scalar parameters the Hessian is taken over (its dimension)."""
        return self._size

    @property
    def dtype(self) -> torch.dtype:
        """Working precision of the flat vectors."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of the parameters and of every vector."""
        return self._device

    @property
    def num_hvps(self) -> int:
        """Number of Hessian-vector products computed so far."""
        return self._num_hvps

    @property
    def loss(self) -> float:
        """Value of the loss the operator was built on."""
        return self._loss

    @property
    def parameter_names(self) -> list[str]:
        """Names of the parameters in the operator, in the order of the flat vectors."""
        return list(self._names)

    @property
    def parameters(self) -> list[Tensor]:
        """The parameters in the operator, in the order of the flat vectors."""
        return list(self._params)

    def matvec(self, vector: Tensor) -> Tensor:
        """Return the Hessian-vector product ``H @ vector`` (one HVP).

        Args:
            vector: 1-D tensor of length :attr:`size`.

        Raises:
            RuntimeError: the operator was closed.
            TypeError: ``vector`` is not a tensor.
            ValueError: ``vector`` has the wrong shape.
        """
        self._check_open()
        if not isinstance(vector, Tensor):
            raise TypeError(f"Invalid vector: expected a tensor, got {type(vector).__name__}")
        if vector.shape != (self._size,):
            raise ValueError(
                f"Invalid vector: shape {tuple(vector.shape)} (expected ({self._size},), "
                "one entry per selected parameter)"
            )
        pieces = self.split(vector)
        hv: Sequence[Tensor | None] = [None] * len(self._params)
        if self._second_order:
            directions = [pieces[i].to(self._params[i].dtype) for i in self._second_order]
            hv = torch.autograd.grad(
                self._second_order_grads,
                self._params,
                grad_outputs=directions,
                retain_graph=True,
                allow_unused=True,
            )
        product = [
            torch.zeros_like(param, dtype=self._dtype) if piece is None else piece.to(self._dtype)
            for param, piece in zip(self._params, hv, strict=True)
        ]
        flat = torch.cat([piece.reshape(-1) for piece in product])
        if self._hvp_reduce is not None:
            flat = self._hvp_reduce(flat)
        self._num_hvps += 1
        return flat

    __matmul__ = matvec

    # ---------------------------------------------------------------------------------- utilities
    def gradient(self) -> Tensor:
        """The loss gradient as a flat vector (local to this process, never reduced).

        Raises:
            RuntimeError: the operator was closed.
        """
        self._check_open()
        return torch.cat(
            [
                torch.zeros(numel, dtype=self._dtype, device=self._device)
                if grad is None
                else grad.detach().reshape(-1).to(self._dtype)
                for grad, numel in zip(self._grads, self._numels, strict=True)
            ]
        )

    def split(self, vector: Tensor) -> list[Tensor]:
        """Split a flat vector into views shaped like the selected parameters."""
        chunks = torch.split(vector, self._numels)
        return [chunk.view(param.shape) for chunk, param in zip(chunks, self._params, strict=True)]

    def as_linear_operator(self) -> Any:
        """A :class:`scipy.sparse.linalg.LinearOperator` (float64, NumPy) over this operator.

        Every product copies the vector between NumPy and the device: meant for cross-checks with
        SciPy, not for speed.
        """
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def matvec(x: np.ndarray) -> np.ndarray:
            vector = torch.as_tensor(np.ravel(x), dtype=self._dtype, device=self._device)
            return self.matvec(vector).detach().cpu().double().numpy()

        return LinearOperator(
            (self._size, self._size), matvec=matvec, rmatvec=matvec, dtype=np.float64
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("HessianOperator is closed; build a new one to compute products")

    def close(self) -> None:
        """Release the retained autograd graph. Further products raise ``RuntimeError``."""
        self._grads = []
        self._second_order = []
        self._second_order_grads = []
        self._closed = True

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"num_hvps={self._num_hvps}"
        return (
            f"HessianOperator(size={self._size}, params={len(self._params)}, dtype={self._dtype}, "
            f"device={self._device}, {state})"
        )

    # ------------------------------------------------------------------------------------ private
    def _loss_and_graph(
        self, model: nn.Module, loss_fn: LossFn, batch: Any
    ) -> tuple[float, list[Tensor | None]]:
        with ExitStack() as stack:
            stack.enter_context(isolated_forward(model))
            # Lightning validates under inference mode: curvature needs autograd regardless.
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            loss = loss_fn(model, _usable_in_autograd(batch))
            value = _validated_loss_value(loss)
            if not loss.requires_grad:
                raise ValueError(
                    "Invalid loss: it is not connected to the parameters (requires_grad=False); "
                    "was it computed under torch.no_grad() or from detached tensors?"
                )
            grads = torch.autograd.grad(loss, self._params, create_graph=True, allow_unused=True)
        if all(grad is None for grad in grads):
            raise ValueError(
                "Invalid loss: it does not depend on any of the selected parameters "
                f"({_summarize(self._names)})"
            )
        return value, list(grads)


def _usable_in_autograd(batch: Any) -> Any:
    """Clone the inference-mode tensors of ``batch``: autograd cannot save them for backward."""

    def usable(leaf: Any) -> Any:
        return leaf.clone() if isinstance(leaf, Tensor) and leaf.is_inference() else leaf

    return tree_map(usable, batch)


def select_parameters(model: nn.Module, params: ParamSelection) -> list[tuple[str, nn.Parameter]]:
    """Resolve a :data:`ParamSelection` to the trainable named parameters it denotes.

    The result follows the order of ``model.named_parameters()`` and has no duplicates.

    Raises:
        TypeError: ``model`` is not a module or ``params`` holds something else than modules,
            parameters and names.
        ValueError: a name, parameter or submodule is not part of ``model``, or nothing
            trainable is selected.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
    all_named = list(model.named_parameters())
    if params is None:
        chosen = all_named
    else:
        # Tied parameters appear once in named_parameters(); every alias is a valid name.
        aliases = list(model.named_parameters(remove_duplicate=False))
        wanted = _selected_ids(model, aliases, params)
        chosen = [(name, param) for name, param in all_named if id(param) in wanted]
    trainable = [(name, param) for name, param in chosen if param.requires_grad]
    if not trainable:
        what = "the model" if params is None else f"the selection {params!r}"
        raise ValueError(
            f"Invalid params: {what} has no trainable parameters (requires_grad=True); "
            "the Hessian needs at least one"
        )
    return trainable


def _selected_ids(
    model: nn.Module, all_named: list[tuple[str, nn.Parameter]], params: ParamSelection
) -> set[int]:
    items: Sequence[Any]
    if isinstance(params, Tensor) and not isinstance(params, nn.Parameter):
        raise TypeError(
            "Invalid params: a plain tensor (expected None, a submodule, a parameter, a name, "
            "or an iterable of parameters and names)"
        )
    if isinstance(params, nn.Module | str | nn.Parameter):
        items = [params]
    elif isinstance(params, Iterable):
        items = list(params)
    else:
        raise TypeError(
            f"Invalid params: {params!r} (expected None, a submodule, a parameter, a name, "
            "or an iterable of parameters and names)"
        )
    owned = {id(param) for _, param in all_named}
    wanted: set[int] = set()
    for item in items:
        if isinstance(item, nn.Parameter):
            if id(item) not in owned:
                raise ValueError(
                    f"Invalid params: a parameter of shape {tuple(item.shape)} "
                    "is not part of the model"
                )
            wanted.add(id(item))
        elif isinstance(item, nn.Module):
            if not any(module is item for module in model.modules()):
                raise ValueError(
                    f"Invalid params: the module {type(item).__name__} "
                    "is not a submodule of the model"
                )
            wanted.update(id(param) for param in item.parameters())
        elif isinstance(item, str):
            matches = [
                param for name, param in all_named if name == item or name.startswith(item + ".")
            ]
            if not matches:
                names = _summarize([name for name, _ in all_named])
                raise ValueError(
                    f"Invalid params: {item!r} matches no parameter name (names: {names})"
                )
            wanted.update(id(param) for param in matches)
        else:
            raise TypeError(
                f"Invalid params: {item!r} (expected parameters, submodules or parameter names)"
            )
    return wanted


def _common_device(named: list[tuple[str, nn.Parameter]]) -> torch.device:
    devices = {param.device for _, param in named}
    if len(devices) > 1:
        listed = ", ".join(sorted(str(device) for device in devices))
        raise TypeError(
            f"Invalid params: the selected parameters live on several devices ({listed}); "
            "select parameters on one device"
        )
    return devices.pop()


def _working_dtype(params: list[nn.Parameter]) -> torch.dtype:
    if any(not param.is_floating_point() for param in params):
        raise TypeError("Invalid params: every selected parameter must be floating point")
    return torch.float64 if any(param.dtype == torch.float64 for param in params) else torch.float32


def _validated_loss_value(loss: Any) -> float:
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"Invalid loss: loss_fn must return a scalar tensor, got {type(loss).__name__}"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"Invalid loss: loss_fn must return a scalar tensor, got shape {tuple(loss.shape)} "
            "(reduce it, e.g. with .mean())"
        )
    if not loss.is_floating_point():
        raise TypeError(f"Invalid loss: expected a floating-point tensor, got {loss.dtype}")
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"Invalid loss: loss_fn returned {value}; curvature is undefined at a non-finite loss"
        )
    return value


def _summarize(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
