"""A symmetric rescaling ``S H S`` of an operator, for preconditioned sharpness."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_optdiag.curvature.operator import SymmetricOperator

__all__ = ["ScaledOperator"]


class ScaledOperator:
    """The operator ``v -> s * H(s * v)`` for an elementwise scale ``s``.

    With ``s = D^1/2`` it has the eigenvalues of ``D H`` (the two are similar), which is how the
    sharpness an adaptive optimizer sees, ``lambda_max(P^-1 H)``, is computed with symmetric
    Lanczos: ``D = P^-1``.

    Args:
        operator: the symmetric operator ``H``.
        scale: 1-D tensor of length ``operator.size``, finite and non-negative.

    Raises:
        TypeError: ``scale`` is not a tensor.
        ValueError: ``scale`` has the wrong shape, or entries that are negative or not finite.
    """

    def __init__(self, operator: SymmetricOperator, scale: Tensor) -> None:
        if not isinstance(scale, Tensor):
            raise TypeError(f"Invalid scale: expected a tensor, got {type(scale).__name__}")
        if scale.dim() != 1 or scale.numel() != operator.size:
            raise ValueError(
                f"Invalid scale: shape {tuple(scale.shape)} (expected ({operator.size},))"
            )
        scale = scale.detach().to(device=operator.device, dtype=operator.dtype)
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise ValueError("Invalid scale: entries must be finite and non-negative")
        self._operator = operator
        self._scale = scale

    @property
    def size(self) -> int:
        return self._operator.size

    @property
    def dtype(self) -> torch.dtype:
        return self._operator.dtype

    @property
    def device(self) -> torch.device:
        return self._operator.device

    def matvec(self, vector: Tensor) -> Tensor:
        return self._scale * self._operator.matvec(self._scale * vector)
