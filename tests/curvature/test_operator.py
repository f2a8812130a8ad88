"""HessianOperator and select_parameters against the dense float64 Hessian of torch.func.

The reference for every product is ``torch.func.hessian`` (forward-over-reverse) of the loss as a
function of one flat parameter vector, evaluated with ``torch.func.functional_call`` on a deep copy
of the model; the operator under test uses reverse-over-reverse products on a retained graph.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.sparse.linalg import eigsh
from torch import Tensor, nn
from torch.func import functional_call, hessian
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_optdiag.curvature import (
    HessianOperator,
    SymmetricOperator,
    lanczos_eigenvalues,
    select_parameters,
)

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[nn.Module, Any], Tensor]


# ------------------------------------------------------------------------------------ references
class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module so functional_call can swap the parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Any) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn
        self._batch = batch

    def forward(self) -> Tensor:
        return self._loss_fn(self.model, self._batch)


class _BatchStatsNorm(nn.Module):
    """BatchNorm in training mode written out: normalise with the biased batch statistics."""

    def __init__(self, source: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.weight = source.weight
        self.bias = source.bias
        self.eps = source.eps

    def forward(self, x: Tensor) -> Tensor:
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y


class _WrittenLayerNorm(nn.Module):
    """LayerNorm written out (same parameters, same names)."""

    def __init__(self, source: nn.LayerNorm) -> None:
        super().__init__()
        self.weight = source.weight
        self.bias = source.bias
        self.eps = source.eps
        self.normalized_shape = source.normalized_shape

    def forward(self, x: Tensor) -> Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


def _write_out_normalisation(model: nn.Module) -> None:
    """Replace LayerNorm and training-mode BatchNorm by written-out modules (same parameters, same
    names). In training mode BatchNorm's running statistics do not enter the loss, and torch.func
    cannot update them in place. Above all, on torch 2.13 vmap batches ``batch_norm`` and
    ``layer_norm`` wrongly when both the input and the affine weight carry tangents: the
    Hessians of ``torch.func.hessian`` come out asymmetric and wrong, while ``jvp(grad(f))``
    without vmap and the written-out formula agree with ``torch.autograd``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            replacement: nn.Module = _BatchStatsNorm(module)
        elif isinstance(module, nn.LayerNorm):
            replacement = _WrittenLayerNorm(module)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in the order of ``model.named_parameters()``."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def dense_hessian(
    model: nn.Module, loss_fn: LossFn, batch: Any, names: Sequence[str] | None = None
) -> Tensor:
    """Dense float64 Hessian of ``loss_fn(model, batch)`` over the flat vector of ``names``
    (default: every trainable parameter), by ``torch.func.hessian``. The model is not touched."""
    reference = copy.deepcopy(model)
    _write_out_normalisation(reference)
    named = dict(reference.named_parameters())
    names = trainable_names(reference) if names is None else list(names)
    for param in named.values():
        assert param.dtype == torch.float64, "the reference Hessian is computed in float64"
        param.requires_grad_(False)
    wrapper = _LossModule(reference, loss_fn, batch)
    shapes = [named[name].shape for name in names]
    numels = [named[name].numel() for name in names]

    def loss_of(flat: Tensor) -> Tensor:
        pieces = torch.split(flat, numels)
        values = {
            f"model.{name}": piece.view(shape)
            for name, piece, shape in zip(names, pieces, shapes, strict=True)
        }
        return functional_call(wrapper, values, ())

    flat = torch.cat([named[name].detach().reshape(-1) for name in names])
    return hessian(loss_of)(flat)


def sub_block(
    full: Tensor, model: nn.Module, names: Sequence[str], all_names: Sequence[str] | None = None
) -> Tensor:
    """The principal sub-block of ``full`` (over ``all_names``) for the parameters ``names``."""
    params = dict(model.named_parameters())
    all_names = trainable_names(model) if all_names is None else list(all_names)
    offsets: dict[str, range] = {}
    start = 0
    for name in all_names:
        offsets[name] = range(start, start + params[name].numel())
        start += params[name].numel()
    index = torch.tensor([i for name in names for i in offsets[name]], dtype=torch.long)
    return full[index][:, index]


def assert_close_to(actual: Tensor, expected: Tensor, rtol: float) -> None:
    """Entry-wise closeness with an absolute floor relative to the largest entry."""
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float(torch.linalg.vector_norm(actual.double() - expected.double())) / float(
        torch.linalg.vector_norm(expected.double())
    )


# ---------------------------------------------------------------------------------------- models
def cross_entropy_loss(model: nn.Module, batch: Batch) -> Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def make_mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def make_batch(
    num: int = 8, features: int = 5, classes: int = 3, dtype: torch.dtype = torch.float64
) -> Batch:
    generator = torch.Generator().manual_seed(1234)
    inputs = torch.randn(num, features, generator=generator, dtype=dtype)
    targets = torch.randint(0, classes, (num,), generator=generator)
    return inputs, targets


class SmallCNN(nn.Module):
    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3)
        self.bn = nn.BatchNorm2d(3)
        self.act = activation
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.bn(self.conv(x))).flatten(1))


class Stack(nn.Module):
    """``layers.0`` to ``layers.10``, then ``head``: ``"layers.1"`` must not take ``layers.10``."""

    def __init__(self, depth: int = 11, width: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model=16, nhead=2, dim_feedforward=8, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def random_vectors(size: int, count: int, dtype: torch.dtype = torch.float64) -> list[Tensor]:
    generator = torch.Generator().manual_seed(99)
    return [torch.randn(size, generator=generator, dtype=dtype) for _ in range(count)]


@pytest.fixture(scope="module")
def mlp_case() -> tuple[nn.Module, Batch, Tensor]:
    model = make_mlp()
    batch = make_batch()
    return model, batch, dense_hessian(model, cross_entropy_loss, batch)


# ------------------------------------------------------------------------------ products: values
def test_mlp_products_match_dense_hessian(mlp_case: tuple[nn.Module, Batch, Tensor]) -> None:
    model, batch, full = mlp_case
    op = HessianOperator(model, cross_entropy_loss, batch)
    assert op.size == sum(p.numel() for p in model.parameters()) == full.shape[0]
    assert op.dtype == torch.float64
    assert op.device == torch.device("cpu")
    assert isinstance(op, SymmetricOperator)
    assert op.loss == pytest.approx(float(cross_entropy_loss(model, batch).detach()), rel=1e-14)
    for vector in random_vectors(op.size, 4):
        assert_close_to(op.matvec(vector), full @ vector, rtol=1e-10)
    # Basis vectors recover whole columns of the Hessian.
    for index in (0, op.size // 2, op.size - 1):
        unit = torch.zeros(op.size, dtype=torch.float64)
        unit[index] = 1.0
        assert_close_to(op @ unit, full[:, index], rtol=1e-10)


@pytest.mark.parametrize("activation", [nn.ReLU, nn.GELU], ids=["relu", "gelu"])
def test_cnn_with_train_mode_batchnorm_matches_dense_hessian(
    activation: type[nn.Module],
) -> None:
    torch.manual_seed(3)
    model = SmallCNN(activation()).double().train()
    generator = torch.Generator().manual_seed(5)
    batch = (
        torch.randn(4, 2, 6, 6, generator=generator, dtype=torch.float64),
        torch.tensor([0, 1, 2, 1]),
    )
    full = dense_hessian(model, cross_entropy_loss, batch)
    running_mean = model.bn.running_mean.clone()
    with HessianOperator(model, cross_entropy_loss, batch) as op:
        assert op.size == full.shape[0]
        for vector in random_vectors(op.size, 3):
            assert_close_to(op.matvec(vector), full @ vector, rtol=1e-10)
    # The forward pass in training mode did not move the real running statistics.
    assert torch.equal(model.bn.running_mean, running_mean)


def test_num_hvps_counts_every_product(mlp_case: tuple[nn.Module, Batch, Tensor]) -> None:
    model, batch, _ = mlp_case
    op = HessianOperator(model, cross_entropy_loss, batch)
    assert op.num_hvps == 0
    vector = torch.ones(op.size, dtype=torch.float64)
    op.matvec(vector)
    op @ vector
    assert op.num_hvps == 2
    linear = op.as_linear_operator()
    linear.matvec(np.ones(op.size))
    assert op.num_hvps == 3
    result = lanczos_eigenvalues(op, k=1, tol=0.0, max_hvps=7)
    assert result.num_hvps == 7
    assert op.num_hvps == 10
    op.gradient()
    op.split(vector)
    assert op.num_hvps == 10  # neither the gradient nor split is a product
    assert "num_hvps=10" in repr(op)


def test_hvp_reduce_is_applied_once_to_every_product(
    mlp_case: tuple[nn.Module, Batch, Tensor],
) -> None:
    model, batch, full = mlp_case
    seen: list[Tensor] = []

    def reduce(product: Tensor) -> Tensor:
        seen.append(product.clone())
        return product * 0.5

    op = HessianOperator(model, cross_entropy_loss, batch, hvp_reduce=reduce)
    assert seen == []  # construction computes no product
    vectors = random_vectors(op.size, 3)
    for count, vector in enumerate(vectors, start=1):
        assert_close_to(op.matvec(vector), 0.5 * (full @ vector), rtol=1e-10)
        assert len(seen) == count
        assert_close_to(seen[-1], full @ vector, rtol=1e-10)
    # The gradient is local: never reduced.
    local = HessianOperator(model, cross_entropy_loss, batch)
    assert torch.equal(op.gradient(), local.gradient())
    assert len(seen) == 3
    assert isinstance(op.loss, float)


def test_gradient_equals_autograd_gradient() -> None:
    torch.manual_seed(3)
    model = SmallCNN(nn.GELU()).double().train()
    batch = (torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.tensor([2, 1, 0, 1]))
    reference = copy.deepcopy(model)
    expected = torch.autograd.grad(
        cross_entropy_loss(reference, batch), list(reference.parameters())
    )
    op = HessianOperator(model, cross_entropy_loss, batch)
    gradient = op.gradient()
    assert gradient.dtype == torch.float64
    assert not gradient.requires_grad
    assert_close_to(gradient, torch.cat([g.reshape(-1) for g in expected]), rtol=1e-12)
    # split() inverts the flattening: pieces are shaped like the parameters, in order.
    for piece, grad in zip(op.split(gradient), expected, strict=True):
        assert piece.shape == grad.shape
        assert_close_to(piece, grad, rtol=1e-12)


def test_gradient_of_unused_parameter_is_zero() -> None:
    torch.manual_seed(0)
    model = WithUnused().double()
    batch = make_batch(features=4)
    op = HessianOperator(model, cross_entropy_loss, batch)
    body, unused = op.split(op.gradient())[:2], op.split(op.gradient())[2:]
    assert all(bool(piece.abs().sum() > 0) for piece in body)
    assert all(torch.equal(piece, torch.zeros_like(piece)) for piece in unused)


# ---------------------------------------------------------------------------------- transformer
@pytest.fixture(scope="module")
def transformer_case() -> tuple[nn.Module, Batch, Tensor]:
    torch.manual_seed(7)
    model = TinyTransformer().double().train()
    generator = torch.Generator().manual_seed(8)
    batch = (torch.randn(2, 4, 16, generator=generator, dtype=torch.float64), torch.tensor([0, 2]))
    # Plain reverse-over-reverse through the default SDPA kernel fails on CPU with torch 2.13
    # ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    # implemented"); the reference is taken on the math kernel, as the operator does.
    with sdpa_kernel(SDPBackend.MATH):
        full = dense_hessian(model, cross_entropy_loss, batch)
    return model, batch, full


def _sdp_flags() -> tuple[bool, bool, bool, bool]:
    return (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
        torch.backends.cuda.cudnn_sdp_enabled(),
    )


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_products_match_dense_hessian(
    transformer_case: tuple[nn.Module, Batch, Tensor], mode: str
) -> None:
    model, batch, full = transformer_case
    model.train(mode == "train")
    flags = _sdp_flags()
    try:
        op = HessianOperator(model, cross_entropy_loss, batch)
    finally:
        model.train()
    # The math kernel was forced only for the construction.
    assert _sdp_flags() == flags
    assert op.size == full.shape[0]
    for vector in random_vectors(op.size, 2):
        assert_close_to(op.matvec(vector), full @ vector, rtol=1e-9)


# -------------------------------------------------------------------------------------- dropout
class DropoutNet(nn.Module):
    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


class FixedMaskNet(nn.Module):
    """DropoutNet with a given dropout mask (already scaled by 1 / (1 - p))."""

    def __init__(self, source: DropoutNet, mask: Tensor) -> None:
        super().__init__()
        self.fc1 = copy.deepcopy(source.fc1)
        self.fc2 = copy.deepcopy(source.fc2)
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)) * self.mask)


def test_dropout_products_apply_one_fixed_matrix() -> None:
    torch.manual_seed(0)
    model = DropoutNet().double().train()
    batch = make_batch()
    torch.manual_seed(2024)
    op = HessianOperator(model, cross_entropy_loss, batch)
    u, v = random_vectors(op.size, 2)
    hv = op.matvec(v)
    hu = op.matvec(u)
    assert torch.equal(op.matvec(v), hv)
    assert torch.equal(op.matvec(u), hu)
    assert float(u @ hv) == pytest.approx(float(v @ hu), rel=1e-12, abs=1e-14)
    # The matrix is the Hessian with the mask of the operator's single forward pass: the draw the
    # model would have made from the current global RNG state (which the operator restored).
    torch.manual_seed(2024)
    mask = F.dropout(torch.ones(8, 6, dtype=torch.float64), p=0.5, training=True)
    assert 0 < int((mask == 0).sum()) < mask.numel()
    full = dense_hessian(FixedMaskNet(model, mask), cross_entropy_loss, batch)
    assert_close_to(hv, full @ v, rtol=1e-10)
    assert_close_to(hu, full @ u, rtol=1e-10)
    # A different mask gives a different matrix, so the comparison above is discriminating.
    other = dense_hessian(FixedMaskNet(model, torch.flip(mask, [0])), cross_entropy_loss, batch)
    assert relative_error(hv, other @ v) > 1e-3


# ---------------------------------------------------------------------------- parameter selection
def _stack_case() -> tuple[Stack, Batch]:
    torch.manual_seed(11)
    model = Stack().double()
    return model, make_batch(features=2)


@pytest.fixture(scope="module")
def stack_case() -> tuple[Stack, Batch, Tensor]:
    model, batch = _stack_case()
    return model, batch, dense_hessian(model, cross_entropy_loss, batch)


SELECTIONS: dict[str, tuple[Callable[[Stack], Any], list[str]]] = {
    "submodule": (lambda m: m.layers[1], ["layers.1.weight", "layers.1.bias"]),
    "prefix": (lambda m: "layers.1", ["layers.1.weight", "layers.1.bias"]),
    "prefix-10": (lambda m: "layers.10", ["layers.10.weight", "layers.10.bias"]),
    "top-prefix": (lambda m: "head", ["head.weight", "head.bias"]),
    "exact-name": (lambda m: "layers.0.bias", ["layers.0.bias"]),
    "parameter": (lambda m: m.head.weight, ["head.weight"]),
    "mixed-list": (
        lambda m: ["head.bias", m.layers[3].weight, "layers.0"],
        ["layers.0.weight", "layers.0.bias", "layers.3.weight", "head.bias"],
    ),
    "duplicates": (
        lambda m: [m.head.bias, "head.bias", m.head, m.layers[2].bias],
        ["layers.2.bias", "head.weight", "head.bias"],
    ),
    "generator": (lambda m: m.layers[4].parameters(), ["layers.4.weight", "layers.4.bias"]),
    "everything": (lambda m: None, [n for n, _ in Stack().named_parameters()]),
}


@pytest.mark.parametrize("case", list(SELECTIONS))
def test_selection_gives_principal_sub_block(
    stack_case: tuple[Stack, Batch, Tensor], case: str
) -> None:
    model, batch, full = stack_case
    selector, expected_names = SELECTIONS[case]
    params = dict(model.named_parameters())
    assert [n for n, _ in select_parameters(model, selector(model))] == expected_names
    assert all(p is params[n] for n, p in select_parameters(model, selector(model)))
    op = HessianOperator(model, cross_entropy_loss, batch, params=selector(model))
    assert op.parameter_names == expected_names
    assert op.size == sum(params[n].numel() for n in expected_names)
    block = sub_block(full, model, expected_names)
    for vector in random_vectors(op.size, 2):
        assert_close_to(op.matvec(vector), block @ vector, rtol=1e-10)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_selection_gives_principal_sub_block(
    stack_case: tuple[Stack, Batch, Tensor], data: st.DataObject
) -> None:
    model, batch, full = stack_case
    all_names = [n for n, _ in model.named_parameters()]
    chosen = data.draw(st.lists(st.sampled_from(all_names), min_size=1, max_size=6), "names")
    as_objects = data.draw(st.lists(st.booleans(), min_size=len(chosen), max_size=len(chosen)))
    params = dict(model.named_parameters())
    selection = [
        params[name] if obj else name for name, obj in zip(chosen, as_objects, strict=True)
    ]
    expected = [name for name in all_names if name in set(chosen)]
    op = HessianOperator(model, cross_entropy_loss, batch, params=selection)
    assert op.parameter_names == expected
    (vector,) = random_vectors(op.size, 1)
    assert_close_to(op.matvec(vector), sub_block(full, model, expected) @ vector, rtol=1e-10)


class Tied(nn.Module):
    """``head.weight`` is ``emb.weight``; ``named_parameters()`` lists it once (``emb.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 3, bias=False)
        self.head = nn.Linear(3, 3)
        self.head.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(x)))


@pytest.mark.parametrize(
    ("name", "expected"),
    [("head", ["emb.weight", "head.bias"]), ("head.weight", ["emb.weight"])],
)
def test_name_selection_of_a_tied_parameter(name: str, expected: list[str]) -> None:
    """The docstring: a name selects "the parameter of that name or, as a prefix, all parameters
    of the submodule of that name". So the name ``head`` must select what the submodule
    ``model.head`` selects (its weight is the shared ``emb.weight``), and ``head.weight`` (a name
    ``model.get_parameter`` resolves) the shared weight."""
    model = Tied()
    assert model.get_parameter("head.weight") is model.emb.weight
    by_module = [n for n, _ in select_parameters(model, model.get_submodule("head"))]
    assert by_module == ["emb.weight", "head.bias"]
    assert [n for n, _ in select_parameters(model, name)] == expected


def test_frozen_parameters_are_excluded(stack_case: tuple[Stack, Batch, Tensor]) -> None:
    _, batch, full = stack_case
    model, _ = _stack_case()  # a fresh copy with the same weights, so the fixture stays intact
    model.layers[0].weight.requires_grad_(False)
    model.layers[5].requires_grad_(False)
    trainable = trainable_names(model)
    assert "layers.0.weight" not in trainable
    assert "layers.0.bias" in trainable
    assert "layers.5.bias" not in trainable
    all_names = [n for n, _ in model.named_parameters()]
    op = HessianOperator(model, cross_entropy_loss, batch)
    assert op.parameter_names == trainable
    block = sub_block(full, model, trainable, all_names)
    for vector in random_vectors(op.size, 2):
        assert_close_to(op.matvec(vector), block @ vector, rtol=1e-10)
    # Selecting a submodule keeps only its trainable parameters.
    op = HessianOperator(model, cross_entropy_loss, batch, params=model.layers[0])
    assert op.parameter_names == ["layers.0.bias"]
    (vector,) = random_vectors(op.size, 1)
    assert_close_to(
        op.matvec(vector), sub_block(full, model, ["layers.0.bias"], all_names) @ vector, 1e-10
    )


def test_unused_parameter_gives_zero_rows() -> None:
    torch.manual_seed(0)
    model = WithUnused().double()
    batch = make_batch(features=4)
    full = dense_hessian(model, cross_entropy_loss, batch)
    op = HessianOperator(model, cross_entropy_loss, batch)
    assert op.parameter_names == ["body.weight", "body.bias", "unused.weight", "unused.bias"]
    used = model.body.weight.numel() + model.body.bias.numel()
    assert torch.equal(full[used:], torch.zeros_like(full[used:]))  # the reference agrees
    for vector in random_vectors(op.size, 2):
        product = op.matvec(vector)
        assert torch.equal(product[used:], torch.zeros(op.size - used, dtype=torch.float64))
        assert bool(product[:used].abs().max() > 0)
        assert_close_to(product, full @ vector, rtol=1e-10)
    # Only unused parameters selected: the loss does not depend on them.
    with pytest.raises(ValueError, match=r"does not depend on any.*unused\.weight, unused\.bias"):
        HessianOperator(model, cross_entropy_loss, batch, params=model.unused)


# ------------------------------------------------------------------------- linear loss blocks
class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(4)
        self.w = nn.Parameter(torch.randn(4, generator=generator, dtype=torch.float64))
        self.u = nn.Parameter(torch.randn(3, generator=generator, dtype=torch.float64))


def linear_plus_square(model: nn.Module, x: Tensor) -> Tensor:
    return (model.w * x).sum() + (model.u**2).sum()


def bilinear(model: nn.Module, x: Tensor) -> Tensor:
    return (model.w[:3] * model.u).sum() * 2.0 + (model.w * x).sum()


def linear_only(model: nn.Module, x: Tensor) -> Tensor:
    return (model.w * x).sum() + 3.0 * model.u.sum()


@pytest.mark.parametrize("loss_fn", [linear_plus_square, bilinear, linear_only])
def test_loss_linear_in_a_block(loss_fn: LossFn) -> None:
    model = TwoBlocks()
    x = torch.arange(1.0, 5.0, dtype=torch.float64)
    full = dense_hessian(model, loss_fn, x)
    if loss_fn is linear_plus_square:  # an explicit check of the reference itself
        expected = torch.zeros(7, 7, dtype=torch.float64)
        expected[4:, 4:] = 2.0 * torch.eye(3, dtype=torch.float64)
        assert torch.equal(full, expected)
    op = HessianOperator(model, loss_fn, x)
    for vector in random_vectors(7, 3):
        assert_close_to(op.matvec(vector), full @ vector, rtol=1e-12)
    # The block selected alone.
    op_w = HessianOperator(model, loss_fn, x, params="w")
    (vector,) = random_vectors(4, 1)
    assert_close_to(op_w.matvec(vector), full[:4, :4] @ vector, rtol=1e-12)
    (expected_gradient,) = torch.autograd.grad(loss_fn(model, x), [model.w])
    assert_close_to(op_w.gradient(), expected_gradient, rtol=1e-12)


# ---------------------------------------------------------------------------------- precision
def test_float32_model_matches_float64_reference() -> None:
    model = make_mlp(torch.float32)
    batch32 = make_batch(dtype=torch.float32)
    batch64 = (batch32[0].double(), batch32[1])
    full = dense_hessian(copy.deepcopy(model).double(), cross_entropy_loss, batch64)
    op = HessianOperator(model, cross_entropy_loss, batch32)
    assert op.dtype == torch.float32
    for vector in random_vectors(op.size, 3):
        product = op.matvec(vector.float())
        assert product.dtype == torch.float32
        assert relative_error(product, full @ vector) < 1e-4
        # A float64 vector is accepted and evaluated in the working precision.
        assert op.matvec(vector).dtype == torch.float32
    assert op.gradient().dtype == torch.float32


def test_bfloat16_model_returns_float32_products() -> None:
    model = make_mlp(torch.bfloat16)
    batch = make_batch(dtype=torch.bfloat16)
    reference = copy.deepcopy(model).double()
    full = dense_hessian(reference, cross_entropy_loss, (batch[0].double(), batch[1]))
    op = HessianOperator(model, cross_entropy_loss, batch)
    assert op.dtype == torch.float32
    for vector in random_vectors(op.size, 3):
        product = op.matvec(vector.float())
        assert product.dtype == torch.float32
        assert bool(torch.isfinite(product).all())
        assert relative_error(product, full @ vector) < 0.05


class MixedPrecision(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(21)
        self.first = nn.Linear(5, 6).double()
        self.second = nn.Linear(6, 3).float()

    def forward(self, x: Tensor) -> Tensor:
        return self.second(torch.tanh(self.first(x)).to(self.second.weight.dtype))


def test_mixed_float64_float32_parameters_work_in_float64() -> None:
    model = MixedPrecision()
    batch = make_batch()
    full = dense_hessian(copy.deepcopy(model).double(), cross_entropy_loss, batch)
    op = HessianOperator(model, cross_entropy_loss, batch)
    assert op.dtype == torch.float64
    for vector in random_vectors(op.size, 2):
        product = op.matvec(vector)
        assert product.dtype == torch.float64
        assert relative_error(product, full @ vector) < 1e-4
    # The float32 half alone works in float32.
    assert HessianOperator(model, cross_entropy_loss, batch, params="second").dtype == (
        torch.float32
    )


# ------------------------------------------------------------------------------------- scipy
def test_linear_operator_matches_matvec(mlp_case: tuple[nn.Module, Batch, Tensor]) -> None:
    model, batch, full = mlp_case
    op = HessianOperator(model, cross_entropy_loss, batch)
    linear = op.as_linear_operator()
    assert linear.shape == (op.size, op.size)
    assert linear.dtype == np.float64
    for vector in random_vectors(op.size, 2):
        result = linear.matvec(vector.numpy())
        assert isinstance(result, np.ndarray)
        assert result.dtype == np.float64
        np.testing.assert_allclose(result, op.matvec(vector).numpy(), rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(linear.rmatvec(vector.numpy()), result, rtol=1e-14, atol=0)
    block = torch.stack(random_vectors(op.size, 3), dim=1)
    assert_close_to(torch.from_numpy(linear @ block.numpy()), full @ block, rtol=1e-10)
    top = eigsh(linear, k=2, which="LA", return_eigenvectors=False, tol=1e-12)
    np.testing.assert_allclose(
        np.sort(top), torch.linalg.eigvalsh(full)[-2:].numpy(), rtol=1e-8, atol=1e-10
    )


def test_products_work_under_no_grad(mlp_case: tuple[nn.Module, Batch, Tensor]) -> None:
    model, batch, full = mlp_case
    with torch.no_grad():
        op = HessianOperator(model, cross_entropy_loss, batch)
        (vector,) = random_vectors(op.size, 1)
        product = op.matvec(vector)
    assert_close_to(product, full @ vector, rtol=1e-10)


# --------------------------------------------------------------------------------------- errors
def _mlp_and_batch() -> tuple[nn.Module, Batch]:
    return make_mlp(), make_batch()


def test_loss_fn_not_callable() -> None:
    model, batch = _mlp_and_batch()
    with pytest.raises(TypeError, match=r"Invalid loss_fn: 3\.5 \(expected a callable"):
        HessianOperator(model, 3.5, batch)  # type: ignore[arg-type]


def test_hvp_reduce_not_callable() -> None:
    model, batch = _mlp_and_batch()
    with pytest.raises(TypeError, match=r"Invalid hvp_reduce: 'mean' \(expected a callable"):
        HessianOperator(model, cross_entropy_loss, batch, hvp_reduce="mean")  # type: ignore[arg-type]


def test_loss_fn_returning_float() -> None:
    model, batch = _mlp_and_batch()
    with pytest.raises(TypeError, match=r"Invalid loss: .*scalar tensor, got float"):
        HessianOperator(model, lambda m, b: cross_entropy_loss(m, b).detach().item(), batch)


def test_integer_loss() -> None:
    model, batch = _mlp_and_batch()
    with pytest.raises(TypeError, match=r"Invalid loss: expected a floating-point.*torch\.int64"):
        HessianOperator(model, lambda m, b: b[1].sum(), batch)


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_one_element_loss_of_any_shape_is_a_scalar(shape: tuple[int, ...]) -> None:
    model, batch = _mlp_and_batch()

    def loss_fn(m: nn.Module, b: Batch) -> Tensor:
        return cross_entropy_loss(m, b) * torch.ones(shape, dtype=torch.float64)

    vector = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with (
        HessianOperator(model, loss_fn, batch) as shaped,
        HessianOperator(model, cross_entropy_loss, batch) as scalar,
    ):
        torch.testing.assert_close(shaped.matvec(vector), scalar.matvec(vector), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(4,), (2, 3), (0,)])
def test_non_scalar_loss(shape: tuple[int, ...]) -> None:
    model, batch = _mlp_and_batch()

    def loss_fn(m: nn.Module, b: Batch) -> Tensor:
        return cross_entropy_loss(m, b) * torch.ones(shape, dtype=torch.float64)

    with pytest.raises(ValueError, match=rf"Invalid loss: .*shape {re.escape(str(shape))}"):
        HessianOperator(model, loss_fn, batch)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_loss(bad: float) -> None:
    model, batch = _mlp_and_batch()

    def loss_fn(m: nn.Module, b: Batch) -> Tensor:
        return cross_entropy_loss(m, b) * bad

    with pytest.raises(ValueError, match=rf"Invalid loss: loss_fn returned {bad}; .*non-finite"):
        HessianOperator(model, loss_fn, batch)


@pytest.mark.parametrize("how", ["no_grad", "detach"])
def test_loss_not_connected(how: str) -> None:
    model, batch = _mlp_and_batch()

    def loss_fn(m: nn.Module, b: Batch) -> Tensor:
        if how == "detach":
            return cross_entropy_loss(m, b).detach()
        with torch.no_grad():
            return cross_entropy_loss(m, b)

    with pytest.raises(ValueError, match=r"Invalid loss: it is not connected to the parameters"):
        HessianOperator(model, loss_fn, batch)


def test_loss_independent_of_selected_params(stack_case: tuple[Stack, Batch, Tensor]) -> None:
    model, batch, _ = stack_case

    def head_only(m: nn.Module, b: Batch) -> Tensor:
        return F.cross_entropy(m.head(b[0]), b[1])

    with pytest.raises(ValueError, match=r"does not depend on any.*layers\.1\.weight"):
        HessianOperator(model, head_only, batch, params="layers.1")


def test_all_parameters_frozen() -> None:
    model, batch = _mlp_and_batch()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"Invalid params: the model has no trainable parameters"):
        HessianOperator(model, cross_entropy_loss, batch)


def test_selection_of_only_frozen_parameters() -> None:
    model, batch = _mlp_and_batch()
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match=r"the selection '0' has no trainable parameters"):
        HessianOperator(model, cross_entropy_loss, batch, params="0")


def test_model_without_parameters() -> None:
    with pytest.raises(ValueError, match=r"no trainable parameters"):
        HessianOperator(nn.Tanh(), lambda m, b: m(b).sum(), torch.ones(3, requires_grad=True))


def test_empty_selection() -> None:
    model, batch = _mlp_and_batch()
    with pytest.raises(ValueError, match=r"the selection \[\] has no trainable"):
        HessianOperator(model, cross_entropy_loss, batch, params=[])


@pytest.mark.parametrize("name", ["missing", "0.weigh", "layers", "", "0.weight.extra"])
def test_unknown_parameter_name(name: str) -> None:
    model, batch = _mlp_and_batch()
    pattern = rf"Invalid params: '{re.escape(name)}' matches no parameter name "
    pattern += r"\(names: 0\.weight, 0\.bias, 2\.weight, 2\.bias\)"
    with pytest.raises(ValueError, match=pattern):
        HessianOperator(model, cross_entropy_loss, batch, params=name)
    with pytest.raises(ValueError, match=pattern):
        select_parameters(model, ["0.bias", name])


def test_parameter_of_another_model() -> None:
    model, batch = _mlp_and_batch()
    other = make_mlp()
    with pytest.raises(ValueError, match=r"a parameter of shape \(6, 5\) is not part of the model"):
        HessianOperator(model, cross_entropy_loss, batch, params=other[0].weight)
    with pytest.raises(ValueError, match=r"not part of the model"):
        select_parameters(model, [model[0].bias, other[2].bias])


def test_module_not_in_model() -> None:
    model, batch = _mlp_and_batch()
    with pytest.raises(ValueError, match=r"the module Linear is not a submodule of the model"):
        HessianOperator(model, cross_entropy_loss, batch, params=nn.Linear(5, 6))


@pytest.mark.parametrize("bad", [3.5, 7, object()], ids=["float", "int", "object"])
def test_params_of_wrong_type(bad: Any) -> None:
    model, batch = _mlp_and_batch()
    with pytest.raises(TypeError, match=rf"Invalid params: {re.escape(repr(bad))} \(expected"):
        HessianOperator(model, cross_entropy_loss, batch, params=bad)
    with pytest.raises(TypeError, match=rf"Invalid params: {re.escape(repr(bad))} \(expected"):
        select_parameters(model, ["0.weight", bad])


@pytest.mark.parametrize(
    "bad", [None, "model", nn.Parameter(torch.ones(2))], ids=["none", "str", "parameter"]
)
def test_model_not_a_module(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"Invalid model: expected a torch\.nn\.Module, got"):
        HessianOperator(bad, cross_entropy_loss, make_batch())
    with pytest.raises(TypeError, match=r"Invalid model"):
        select_parameters(bad, None)


@pytest.fixture(scope="module")
def mlp_operator(mlp_case: tuple[nn.Module, Batch, Tensor]) -> HessianOperator:
    model, batch, _ = mlp_case
    return HessianOperator(model, cross_entropy_loss, batch)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(min_value=0, max_value=50), min_size=0, max_size=3))
def test_matvec_rejects_wrong_shapes(mlp_operator: HessianOperator, shape: list[int]) -> None:
    op = mlp_operator
    if tuple(shape) == (op.size,):
        shape = [op.size, 1]
    before = op.num_hvps
    with pytest.raises(
        ValueError,
        match=rf"Invalid vector: shape {re.escape(str(tuple(shape)))} \(expected \({op.size},\)",
    ):
        op.matvec(torch.zeros(shape, dtype=torch.float64))
    assert op.num_hvps == before  # a refused vector is not counted as a product


def test_matvec_after_close(mlp_case: tuple[nn.Module, Batch, Tensor]) -> None:
    model, batch, full = mlp_case
    with HessianOperator(model, cross_entropy_loss, batch) as op:
        (vector,) = random_vectors(op.size, 1)
        assert_close_to(op.matvec(vector), full @ vector, rtol=1e-10)
    assert "closed" in repr(op)
    with pytest.raises(RuntimeError, match=r"HessianOperator is closed"):
        op.matvec(vector)
    op.close()  # idempotent
    with pytest.raises(RuntimeError, match=r"closed"):
        op @ vector
    assert op.num_hvps == 1


def test_operator_works_under_inference_mode_with_an_inference_batch() -> None:
    # Lightning validates under torch.inference_mode(); curvature must still be computable there.
    model, batch = _mlp_and_batch()
    vector = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with HessianOperator(model, cross_entropy_loss, batch) as reference:
        expected = reference.matvec(vector)
    with torch.inference_mode():
        inference_batch = (batch[0].clone(), batch[1].clone())
        with HessianOperator(model, cross_entropy_loss, inference_batch) as operator:
            product = operator.matvec(vector)
    torch.testing.assert_close(product, expected, rtol=0, atol=0)


def test_gradient_after_close_is_refused() -> None:
    model, batch = _mlp_and_batch()
    operator = HessianOperator(model, cross_entropy_loss, batch)
    operator.close()
    with pytest.raises(RuntimeError, match="closed"):
        operator.gradient()


@pytest.mark.parametrize("bad", [[0.0, 1.0], np.zeros(3)], ids=["list", "ndarray"])
def test_matvec_refuses_non_tensors(bad: Any) -> None:
    model, batch = _mlp_and_batch()
    with (
        HessianOperator(model, cross_entropy_loss, batch) as operator,
        pytest.raises(TypeError, match="Invalid vector: expected a tensor"),
    ):
        operator.matvec(bad)


def test_plain_tensor_as_params_is_refused() -> None:
    model, batch = _mlp_and_batch()
    with pytest.raises(TypeError, match="Invalid params: a plain tensor"):
        HessianOperator(model, cross_entropy_loss, batch, params=torch.zeros(3))


def test_a_product_whose_reduction_failed_is_not_counted() -> None:
    model, batch = _mlp_and_batch()

    def failing_reduce(tensor: Tensor) -> Tensor:
        raise RuntimeError("collective timed out")

    vector = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with HessianOperator(model, cross_entropy_loss, batch, hvp_reduce=failing_reduce) as operator:
        with pytest.raises(RuntimeError, match="collective timed out"):
            operator.matvec(vector)
        assert operator.num_hvps == 0
