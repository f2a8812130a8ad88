"""Zero observer effect: a curvature probe leaves no trace on the training run (bitwise).

Every entry point of the curvature engine is run on a model with dropout and BatchNorm in
training mode, a submodule in eval mode, pre-existing gradients and seeded global RNG streams;
afterwards parameters, buffers (values, tensor objects and autograd version counters), ``.grad``
(objects and values), every module's mode and the torch / Python / NumPy RNG streams must be
exactly as before, and the next random draws must equal those of a run that never probed.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_optdiag.curvature import (
    HessianOperator,
    hessian_eigenvalues,
    hessian_trace,
    isolated_forward,
    spectral_density,
)

Batch = tuple[Tensor, Tensor]


# ------------------------------------------------------------------------------------ the model
class ProbeNet(nn.Module):
    """Conv + BatchNorm2d + Dropout, Linear + BatchNorm1d + Dropout, a residual block that is put
    in eval mode (its BatchNorm reads the running statistics, its dropout is off), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3)
        self.bn2d = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(27, 8)
        self.bn1d = nn.BatchNorm1d(8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(F.relu(self.bn2d(self.conv(x)))).flatten(1)
        h = self.drop(torch.tanh(self.bn1d(self.fc(h))))
        return self.head(h + self.block(h))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the legacy global stream is what is being protected


def make_batch(num: int = 6) -> Batch:
    """Drawn from the global torch RNG, as a training loop would."""
    return torch.randn(num, 2, 5, 5), torch.randint(0, 3, (num,))


def make_probe_setup(seed: int = 0) -> tuple[ProbeNet, Batch]:
    """A seeded model in mixed modes with non-trivial running statistics and some ``.grad``."""
    seed_everything(seed)
    model = ProbeNet()
    model.train()
    model.block.eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn_like(module.running_mean))
                module.running_var.copy_(torch.rand_like(module.running_var) + 0.5)
                module.num_batches_tracked.fill_(7)
    for name, param in model.named_parameters():
        param.grad = None if name == "head.bias" else torch.randn_like(param)
    return model, make_batch()


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    """Cross-entropy; also draws from Python's and NumPy's global streams, as augmentation or
    a sampler inside a training step might."""
    random.random()
    np.random.rand()  # noqa: NPY002
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


# ------------------------------------------------------------------------------------ snapshots
@dataclass
class Snapshot:
    tensors: dict[str, Tensor]
    values: dict[str, Tensor]
    versions: dict[str, int]
    grads: list[tuple[nn.Parameter, Tensor | None, Tensor | None]]
    modes: list[tuple[nn.Module, bool]]
    torch_rng: Tensor
    python_rng: Any
    numpy_rng: Any


def _all_tensors(model: nn.Module) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = dict(model.state_dict(keep_vars=True))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    return tensors


def take_snapshot(model: nn.Module) -> Snapshot:
    tensors = _all_tensors(model)
    return Snapshot(
        tensors=tensors,
        values={name: tensor.detach().clone() for name, tensor in tensors.items()},
        versions={name: tensor._version for name, tensor in tensors.items()},
        grads=[
            (param, param.grad, None if param.grad is None else param.grad.clone())
            for param in model.parameters()
        ],
        modes=[(module, module.training) for module in model.modules()],
        torch_rng=torch.get_rng_state(),
        python_rng=random.getstate(),
        numpy_rng=np.random.get_state(),  # noqa: NPY002
    )


def assert_unchanged(model: nn.Module, snapshot: Snapshot) -> None:
    tensors = _all_tensors(model)
    assert list(tensors) == list(snapshot.tensors)
    for name, tensor in tensors.items():
        assert tensor is snapshot.tensors[name], f"{name} was re-bound"
        assert torch.equal(tensor, snapshot.values[name]), f"{name} changed"
        assert tensor._version == snapshot.versions[name], f"{name} was written in place"
    for param, grad, value in snapshot.grads:
        assert param.grad is grad
        if value is not None:
            assert torch.equal(param.grad, value)
    assert [(module, module.training) for module in model.modules()] == snapshot.modes
    assert torch.equal(torch.get_rng_state(), snapshot.torch_rng)
    assert random.getstate() == snapshot.python_rng
    numpy_state = np.random.get_state()  # noqa: NPY002
    assert numpy_state[0] == snapshot.numpy_rng[0]
    assert np.array_equal(numpy_state[1], snapshot.numpy_rng[1])
    assert numpy_state[2:] == snapshot.numpy_rng[2:]


def next_draws() -> tuple[Tensor, float, np.ndarray]:
    return torch.rand(4), random.random(), np.random.rand(3)  # noqa: NPY002


def assert_same_draws(
    actual: tuple[Tensor, float, np.ndarray], expected: tuple[Tensor, float, np.ndarray]
) -> None:
    assert torch.equal(actual[0], expected[0])
    assert actual[1] == expected[1]
    assert np.array_equal(actual[2], expected[2])


# ---------------------------------------------------------------------------------- entry points
def _operator(model: nn.Module, batch: Batch) -> None:
    generator = torch.Generator().manual_seed(3)
    with HessianOperator(model, loss_fn, batch) as op:
        for _ in range(3):
            product = op.matvec(torch.randn(op.size, generator=generator))
            assert bool(torch.isfinite(product).all())
            assert bool(product.abs().max() > 0)


def _eigenvalues(model: nn.Module, batch: Batch) -> None:
    result = hessian_eigenvalues(model, loss_fn, batch, k=2, max_hvps=15)
    assert result.num_hvps > 2


def _trace(model: nn.Module, batch: Batch) -> None:
    result = hessian_trace(model, loss_fn, batch, num_hvps=9)
    assert result.num_hvps == 9


def _density(model: nn.Module, batch: Batch) -> None:
    result = spectral_density(model, loss_fn, batch, num_probes=2, num_steps=6)
    assert result.num_hvps == 12


def _bare_isolated_forward(model: nn.Module, batch: Batch) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    with isolated_forward(model):
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, params)
        torch.rand(5)
    assert all(bool(torch.isfinite(g).all()) for g in grads)


ENTRY_POINTS: dict[str, Callable[[nn.Module, Batch], None]] = {
    "operator": _operator,
    "eigenvalues": _eigenvalues,
    "trace": _trace,
    "density": _density,
    "isolated_forward": _bare_isolated_forward,
}


def test_probe_would_leave_traces_without_isolation() -> None:
    """The model and loss of these tests do disturb training state when run plainly, so the
    isolation tests below are able to fail."""
    model, batch = make_probe_setup()
    snapshot = take_snapshot(model)
    loss_fn(model, batch)
    assert not torch.equal(model.bn2d.running_mean, snapshot.values["bn2d.running_mean"])
    assert int(model.bn1d.num_batches_tracked) == 8
    assert not torch.equal(torch.get_rng_state(), snapshot.torch_rng)
    assert random.getstate() != snapshot.python_rng
    assert not np.array_equal(np.random.get_state()[1], snapshot.numpy_rng[1])  # noqa: NPY002
    # The eval-mode block did not move its statistics: the modes really are mixed.
    assert torch.equal(model.block[1].running_mean, snapshot.values["block.1.running_mean"])


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_entry_point_leaves_no_trace(entry: str) -> None:
    model, batch = make_probe_setup()
    assert model.head.bias.grad is None
    assert model.head.weight.grad is not None
    assert {module.training for module in model.modules()} == {True, False}
    snapshot = take_snapshot(model)
    ENTRY_POINTS[entry](model, batch)
    assert_unchanged(model, snapshot)
    probed = next_draws()

    make_probe_setup()  # the control: the same set-up, no probe
    assert_same_draws(probed, next_draws())


# ------------------------------------------------------------------------------------ trajectory
def _train(probe: bool, steps: int = 8) -> tuple[dict[str, Tensor], list[Tensor]]:
    model, _ = make_probe_setup(seed=5)
    for param in model.parameters():
        param.grad = None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        inputs, targets = make_batch()
        noise = float(np.random.randn())  # noqa: NPY002
        inputs = inputs * (1.0 + 0.1 * random.random()) + 0.01 * noise
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        if probe:
            hessian_eigenvalues(model, loss_fn, (inputs, targets), max_hvps=5)
            hessian_trace(model, loss_fn, (inputs, targets), num_hvps=6, method="hutchinson")
            if step % 3 == 0:
                spectral_density(model, loss_fn, (inputs, targets), num_probes=1, num_steps=3)
        optimizer.step()
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    momenta = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    return state, momenta


def test_training_trajectory_is_bitwise_unchanged_by_probes() -> None:
    plain_state, plain_momenta = _train(probe=False)
    plain_draws = next_draws()
    probed_state, probed_momenta = _train(probe=True)
    assert list(plain_state) == list(probed_state)
    for name, tensor in plain_state.items():
        assert torch.equal(tensor, probed_state[name]), name
    for plain, probed in zip(plain_momenta, probed_momenta, strict=True):
        assert torch.equal(plain, probed)
    assert_same_draws(next_draws(), plain_draws)
    # The run did train (so equality is not vacuous): weights and statistics moved.
    initial, _ = make_probe_setup(seed=5)
    assert not torch.equal(initial.fc.weight, plain_state["fc.weight"])
    assert int(plain_state["bn1d.num_batches_tracked"]) == 7 + 8


# --------------------------------------------------------------------------- misbehaving loss_fn
def _flip_modes(model: nn.Module, batch: Batch) -> Tensor:
    model.eval()
    logits = model(batch[0])
    model.train()  # the eval-mode block is now in training mode
    return F.cross_entropy(logits, batch[1])


def _eval_inside(model: nn.Module, batch: Batch) -> Tensor:
    model.eval()
    return loss_fn(model, batch)


def _clear_grads(model: nn.Module, batch: Batch) -> Tensor:
    for param in model.parameters():
        param.grad = None
    return loss_fn(model, batch)


def _replace_grads(model: nn.Module, batch: Batch) -> Tensor:
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    return loss_fn(model, batch)


MISBEHAVING = {
    "flip-modes": _flip_modes,
    "eval-inside": _eval_inside,
    "clear-grads": _clear_grads,
    "replace-grads": _replace_grads,
}


@pytest.mark.parametrize("name", list(MISBEHAVING))
def test_misbehaving_loss_fn_is_undone(name: str) -> None:
    model, batch = make_probe_setup()
    snapshot = take_snapshot(model)
    with HessianOperator(model, MISBEHAVING[name], batch) as op:
        op.matvec(torch.ones(op.size))
    assert_unchanged(model, snapshot)


def test_buffer_reassigned_inside_loss_fn_is_restored() -> None:
    model, batch = make_probe_setup()
    snapshot = take_snapshot(model)

    def reassigning(m: nn.Module, b: Batch) -> Tensor:
        m.bn1d.running_mean = torch.full_like(m.bn1d.running_mean, 9.0)
        return loss_fn(m, b)

    HessianOperator(model, reassigning, batch).close()
    assert_unchanged(model, snapshot)


# ------------------------------------------------------------------------------- retained graphs
class NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3)
        self.bn2d = nn.BatchNorm2d(3)
        self.fc = nn.Linear(27, 8)
        self.bn1d = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.bn2d(self.conv(x))).flatten(1)
        return self.head(torch.tanh(self.bn1d(self.fc(h))))


def _plain_hvp(model: nn.Module, batch: Batch, vector: list[Tensor]) -> tuple[Tensor, ...]:
    """Reference: plain double backward on a deep copy, with no isolation at all."""
    reference = copy.deepcopy(model)
    params = list(reference.parameters())
    loss = F.cross_entropy(reference(batch[0]), batch[1])
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(grads, params, vector)


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_graph_built_inside_stays_usable_for_double_backward(bn_mode: str) -> None:
    seed_everything(1)
    model = NormNet().double()
    with torch.no_grad():
        model.bn1d.running_var.fill_(2.0)
        model.bn2d.running_mean.fill_(0.3)
    model.train()
    if bn_mode == "eval":  # eval-mode BatchNorm saves the running statistics for backward
        model.bn1d.eval()
        model.bn2d.eval()
    batch = (torch.randn(5, 2, 5, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1]))
    vector = [torch.randn_like(p) for p in model.parameters()]
    expected = _plain_hvp(model, batch, vector)
    snapshot = take_snapshot(model)
    params = list(model.parameters())
    with isolated_forward(model):
        loss = F.cross_entropy(model(batch[0]), batch[1])
        grads = torch.autograd.grad(loss, params, create_graph=True)
    assert_unchanged(model, snapshot)
    # The model's own buffers are written in place after the block, as the next training step
    # would; the retained graph holds private copies and must not notice.
    with torch.no_grad():
        for buffer in model.buffers():
            buffer.add_(1)
    products = torch.autograd.grad(grads, params, vector)
    for product, reference in zip(products, expected, strict=True):
        torch.testing.assert_close(product, reference, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------- tied buffers
class TiedStats(nn.Module):
    """Two BatchNorm1d layers sharing one running-mean tensor (and a plain tied buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.first = nn.BatchNorm1d(4)
        self.second = nn.BatchNorm1d(4)
        self.second.running_mean = self.first.running_mean
        shared = torch.zeros(4)
        self.a = nn.Module()
        self.b = nn.Module()
        self.a.register_buffer("offset", shared)
        self.b.register_buffer("offset", shared)

    def forward(self, x: Tensor) -> Tensor:
        self.a.offset.add_(1.0)  # seen through both modules when the tensor is shared
        return self.second(torch.tanh(self.first(self.fc(x)))) + self.b.offset


def test_tied_buffers_share_one_copy_and_stay_tied() -> None:
    seed_everything(2)
    model = TiedStats()
    shared_mean = model.first.running_mean
    shared_offset = model.a.offset
    assert model.second.running_mean is shared_mean
    x = torch.randn(6, 4)
    snapshot = take_snapshot(model)
    seen: dict[str, Any] = {}

    def recording(m: nn.Module, x: Tensor) -> Tensor:
        out = m(x).pow(2).mean()
        seen["mean_tied"] = m.first.running_mean is m.second.running_mean
        seen["mean_copied"] = m.first.running_mean is not shared_mean
        seen["offset_tied"] = m.a.offset is m.b.offset
        seen["offset_value"] = m.b.offset.clone()
        seen["mean_value"] = m.second.running_mean.clone()
        return out

    with HessianOperator(model, recording, x) as op:
        op.matvec(torch.ones(op.size))
    assert seen["mean_tied"]
    assert seen["mean_copied"]
    assert seen["offset_tied"]
    # One copy was incremented once (through ``a``) and read through ``b``.
    assert torch.equal(seen["offset_value"], torch.ones(4))
    # Both BatchNorm layers updated the one shared copy: two momentum steps from zero.
    plain = copy.deepcopy(model)
    plain(x)
    assert plain.first.running_mean is plain.second.running_mean
    assert torch.equal(seen["mean_value"], plain.first.running_mean)
    assert_unchanged(model, snapshot)
    assert model.first.running_mean is shared_mean
    assert model.second.running_mean is shared_mean
    assert model.a.offset is shared_offset
    assert model.b.offset is shared_offset
    assert torch.equal(shared_offset, torch.zeros(4))


# --------------------------------------------------------------------------------------- errors
class Boom(RuntimeError):
    pass


def _raising(model: nn.Module, batch: Batch) -> Tensor:
    loss_fn(model, batch)  # moves the running statistics, consumes every RNG stream
    model.eval()
    for param in model.parameters():
        param.grad = None
    torch.rand(3)
    raise Boom("loss_fn failed on purpose")


def _nan_loss(model: nn.Module, batch: Batch) -> Tensor:
    model.eval()
    return loss_fn(model, batch) * float("nan")


def _detached_loss(model: nn.Module, batch: Batch) -> Tensor:
    model.eval()
    return loss_fn(model, batch).detach()


@pytest.mark.parametrize(
    ("bad_loss", "error", "message"),
    [
        (_raising, Boom, r"failed on purpose"),
        (_nan_loss, ValueError, r"loss_fn returned nan"),
        (_detached_loss, ValueError, r"not connected"),
    ],
    ids=["raises", "nan", "detached"],
)
@pytest.mark.parametrize("entry", ["operator", "eigenvalues", "trace"])
def test_failure_inside_leaves_state_restored(
    bad_loss: Callable[[nn.Module, Batch], Tensor], error: type[Exception], message: str, entry: str
) -> None:
    model, batch = make_probe_setup()
    snapshot = take_snapshot(model)
    run = {
        "operator": HessianOperator,
        "eigenvalues": hessian_eigenvalues,
        "trace": hessian_trace,
    }[entry]
    with pytest.raises(error, match=message):
        run(model, bad_loss, batch)
    assert_unchanged(model, snapshot)
    probed = next_draws()
    make_probe_setup()
    assert_same_draws(probed, next_draws())


def test_bare_isolated_forward_restores_on_exception() -> None:
    model, batch = make_probe_setup()
    snapshot = take_snapshot(model)
    with pytest.raises(Boom), isolated_forward(model):
        _raising(model, batch)
    assert_unchanged(model, snapshot)


def test_isolated_forward_rejects_non_module() -> None:
    pattern = r"Invalid model: expected a torch\.nn\.Module, got dict"
    with pytest.raises(TypeError, match=pattern), isolated_forward({}):  # type: ignore[arg-type]
        pass
