"""Fused norms against ``torch.linalg.vector_norm`` computed here, tensor by tensor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_optdiag.signals import tensor_norms

NORM_TYPES = [2.0, 1.0, math.inf, 3.0]
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def reference_norm(tensor: Tensor, norm_type: float) -> float:
    """The exact norm of ``tensor`` (float64 arithmetic on its stored values)."""
    return torch.linalg.vector_norm(tensor.detach().double().reshape(-1), norm_type).item()


def reference_concat_norm(tensors: list[Tensor], norm_type: float) -> float:
    return reference_norm(torch.cat([t.detach().double().reshape(-1) for t in tensors]), norm_type)


def random_tensors(seed: int, shapes: list[tuple[int, ...]]) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * 3 for shape in shapes]


SHAPES = [(3,), (4, 5), (2, 3, 4), (), (1,), (7, 1, 2)]


# ------------------------------------------------------------------------------ tensor_norms
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_tensor_norms_match_vector_norm_per_tensor(norm_type: float) -> None:
    tensors = random_tensors(0, SHAPES)
    norms = tensor_norms(tensors, norm_type)
    assert norms.dtype == torch.float32
    assert norms.shape == (len(tensors),)
    expected = torch.tensor([reference_norm(t, norm_type) for t in tensors], dtype=torch.float64)
    torch.testing.assert_close(norms.double(), expected, rtol=1e-6, atol=0)
    # Also against torch's own float32 vector_norm of each tensor.
    torch.testing.assert_close(
        norms, torch.stack([torch.linalg.vector_norm(t, norm_type) for t in tensors])
    )


def test_tensor_norms_default_is_euclidean() -> None:
    tensors = random_tensors(1, SHAPES)
    torch.testing.assert_close(tensor_norms(tensors), tensor_norms(tensors, 2.0), rtol=0, atol=0)
    expected = torch.tensor([reference_norm(t, 2.0) for t in tensors], dtype=torch.float64)
    torch.testing.assert_close(tensor_norms(tensors).double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_tensor_norms_accept_every_floating_dtype(dtype: torch.dtype, norm_type: float) -> None:
    tensors = [t.to(dtype) for t in random_tensors(2, [(10,), (3, 4)])]
    norms = tensor_norms(tensors, norm_type)
    # float64 tensors keep float64 norms; every other dtype is measured in float32.
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = torch.tensor([reference_norm(t, norm_type) for t in tensors], dtype=torch.float64)
    # At least float32 accumulation of the stored values, whatever the input dtype.
    torch.testing.assert_close(norms.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_tensor_norms_mixed_dtypes_in_one_call(norm_type: float) -> None:
    tensors = [
        t.to(dtype)
        for t, dtype in zip(
            random_tensors(3, [(5,)] * 4 + [(2, 2)] * 4), FLOAT_DTYPES * 2, strict=True
        )
    ]
    norms = tensor_norms(tensors, norm_type)
    expected = torch.tensor([reference_norm(t, norm_type) for t in tensors], dtype=torch.float64)
    torch.testing.assert_close(norms.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_tensor_norms_mixed_half_and_single_precision(norm_type: float) -> None:
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    tensors = [
        t.to(d) for t, d in zip(random_tensors(4, [(6,), (2, 3), (4,)]), dtypes, strict=True)
    ]
    norms = tensor_norms(tensors, norm_type)
    expected = torch.tensor([reference_norm(t, norm_type) for t in tensors], dtype=torch.float64)
    torch.testing.assert_close(norms.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_half_precision_norm_beyond_float16_range_stays_finite(
    dtype: torch.dtype, norm_type: float
) -> None:
    # Every element is representable, but the norm (and the sum of squares) is not in float16.
    big = torch.full((1000,), 60000.0, dtype=dtype)
    # Many small values whose squares sum past 65504 although the norm itself is small.
    many = torch.full((4096,), 300.0, dtype=dtype)
    norms = tensor_norms([big, many], norm_type)
    expected = [reference_norm(big, norm_type), reference_norm(many, norm_type)]
    assert expected[0] > torch.finfo(torch.float16).max
    assert torch.isfinite(norms).all()
    torch.testing.assert_close(
        norms.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_tensors_give_nonfinite_norms(norm_type: float, bad: float) -> None:
    tensors = random_tensors(5, [(4,), (3, 3), (5,)])
    tensors[1][1, 2] = bad
    norms = tensor_norms(tensors, norm_type)
    assert not math.isfinite(norms[1].item())
    assert math.isnan(norms[1].item()) == math.isnan(bad)
    # The other tensors are unaffected.
    for i in (0, 2):
        assert norms[i].item() == pytest.approx(reference_norm(tensors[i], norm_type), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_nonfinite_half_precision_tensor(dtype: torch.dtype) -> None:
    tensor = torch.ones(8, dtype=dtype)
    tensor[3] = math.nan
    assert torch.isnan(tensor_norms([tensor, torch.ones(2, dtype=dtype)])[0])


def test_tensor_norms_of_empty_list() -> None:
    norms = tensor_norms([])
    assert norms.numel() == 0
    assert norms.shape == (0,)


def test_tensor_norms_do_not_modify_inputs() -> None:
    tensors = [
        t.to(d) for t, d in zip(random_tensors(6, [(5,)] * 3), FLOAT_DTYPES[:3], strict=True)
    ]
    copies = [t.clone() for t in tensors]
    tensor_norms(tensors)
    assert all(
        torch.equal(t, c) and t.dtype == c.dtype for t, c in zip(tensors, copies, strict=True)
    )


def test_tensor_norms_ignore_autograd() -> None:
    param = torch.nn.Parameter(torch.randn(4, 3))
    norms = tensor_norms([param])
    assert norms[0].item() == pytest.approx(reference_norm(param, 2.0), rel=1e-6)
