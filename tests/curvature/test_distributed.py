"""``hvp_reduce=all_reduce_mean`` under data parallelism: two gloo processes on the CPU.

Each rank holds one half of a fixed batch. With equally sized halves and a mean loss, the
average of the two local Hessians is the Hessian of the full batch, so the reduced curvature
on each rank must equal the full-batch curvature computed in a single process.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian

from lightning_optdiag.curvature import all_reduce_mean, hessian_eigenvalues, hessian_trace

Batch = tuple[Tensor, Tensor]

WORLD_SIZE = 2
BATCH_SIZE = 8
EIGEN_TOL = 1e-8
TRACE_HVPS = 90  # a Hutch++ sketch of 30 columns spans the whole 26-dimensional space
TRACE_SEED = 7


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def full_batch() -> Batch:
    generator = torch.Generator().manual_seed(42)
    inputs = torch.randn(BATCH_SIZE, 3, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 2, (BATCH_SIZE,), generator=generator)
    return inputs, targets


def local_half(rank: int) -> Batch:
    inputs, targets = full_batch()
    half = slice(rank * BATCH_SIZE // WORLD_SIZE, (rank + 1) * BATCH_SIZE // WORLD_SIZE)
    return inputs[half], targets[half]


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def dense_hessian(model: nn.Module, batch: Batch) -> Tensor:
    """float64 Hessian of ``loss_fn`` over all parameters, flat, by ``torch.func.hessian``."""
    named = {name: param.detach() for name, param in model.named_parameters()}
    numels = [param.numel() for param in named.values()]

    def loss_of(flat: Tensor) -> Tensor:
        pieces = torch.split(flat, numels)
        values = {
            name: piece.view(param.shape)
            for (name, param), piece in zip(named.items(), pieces, strict=True)
        }
        return F.cross_entropy(functional_call(model, values, (batch[0],)), batch[1])

    return hessian(loss_of)(torch.cat([param.reshape(-1) for param in named.values()]))


def _trace_generator() -> torch.Generator:
    return torch.Generator().manual_seed(TRACE_SEED)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        model = make_model()
        batch = local_half(rank)
        local = torch.full((3,), float(rank + 1), dtype=torch.float64)
        averaged = all_reduce_mean(local)
        results: dict[str, Any] = {
            "averaged": averaged,
            "input_after": local,
            "same_object": averaged is local,
            "reduced": hessian_eigenvalues(
                model,
                loss_fn,
                batch,
                hvp_reduce=all_reduce_mean,
                which="both",
                k=2,
                tol=EIGEN_TOL,
            ),
            "local": hessian_eigenvalues(model, loss_fn, batch, which="both", k=2, tol=EIGEN_TOL),
            "trace_reduced": hessian_trace(
                model,
                loss_fn,
                batch,
                num_hvps=TRACE_HVPS,
                generator=_trace_generator(),
                hvp_reduce=all_reduce_mean,
            ),
            "trace_local": hessian_trace(
                model, loss_fn, batch, num_hvps=TRACE_HVPS, generator=_trace_generator()
            ),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown of torch (over a second per process); the results are on
    # disk and a zero exit code is all mp.spawn checks.
    os._exit(0)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("distributed")
    init_file = directory / "rendezvous"
    mp.spawn(_worker, args=(str(init_file), str(directory)), nprocs=WORLD_SIZE, join=True)
    return [
        torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)
    ]


def _assert_matches_dense(result: Any, hessian_matrix: Tensor) -> None:
    exact = torch.linalg.eigvalsh(hessian_matrix)
    assert result.converged
    bound = EIGEN_TOL * result.spectral_radius
    torch.testing.assert_close(result.largest, exact.flip(0)[:2], rtol=0.0, atol=bound)
    torch.testing.assert_close(result.smallest, exact[:2], rtol=0.0, atol=bound)


def test_all_reduce_mean_is_identity_without_process_group() -> None:
    assert not dist.is_initialized()
    tensor = torch.arange(4.0)
    result = all_reduce_mean(tensor)
    assert result is tensor
    assert torch.equal(result, torch.arange(4.0))


@pytest.mark.distributed
def test_all_reduce_mean_is_identity_for_one_process(tmp_path: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'single'}", rank=0, world_size=1
    )
    try:
        tensor = torch.arange(4.0)
        assert all_reduce_mean(tensor) is tensor
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()


@pytest.mark.distributed
def test_all_reduce_mean_averages_across_ranks(rank_results: list[dict[str, Any]]) -> None:
    for rank, results in enumerate(rank_results):
        assert not results["same_object"]
        assert torch.equal(results["averaged"], torch.full((3,), 1.5, dtype=torch.float64))
        # The local tensor was not overwritten by the collective.
        assert torch.equal(
            results["input_after"], torch.full((3,), rank + 1.0, dtype=torch.float64)
        )


@pytest.mark.distributed
def test_reduced_eigenvalues_are_identical_on_all_ranks(
    rank_results: list[dict[str, Any]],
) -> None:
    first, second = (results["reduced"] for results in rank_results)
    assert first.num_hvps == second.num_hvps
    assert first.converged == second.converged
    for field in ("largest", "smallest", "largest_vectors", "smallest_vectors", "ritz_values"):
        assert torch.equal(getattr(first, field), getattr(second, field)), field
    assert first.spectral_radius == second.spectral_radius


@pytest.mark.distributed
def test_reduced_eigenvalues_match_full_batch_hessian(
    rank_results: list[dict[str, Any]],
) -> None:
    full = dense_hessian(make_model(), full_batch())
    for results in rank_results:
        _assert_matches_dense(results["reduced"], full)


@pytest.mark.distributed
def test_without_reduce_each_rank_sees_its_own_half(rank_results: list[dict[str, Any]]) -> None:
    first, second = (results["local"] for results in rank_results)
    assert not torch.allclose(first.largest, second.largest, rtol=1e-3)
    for rank, results in enumerate(rank_results):
        _assert_matches_dense(results["local"], dense_hessian(make_model(), local_half(rank)))
    # The full-batch Hessian is the mean of the halves'; the local spectra are not the global one.
    halves = [dense_hessian(make_model(), local_half(rank)) for rank in range(WORLD_SIZE)]
    full = dense_hessian(make_model(), full_batch())
    torch.testing.assert_close(sum(halves) / WORLD_SIZE, full, rtol=1e-12, atol=1e-14)
    full_top = float(torch.linalg.eigvalsh(full)[-1])
    assert all(abs(float(r["local"].largest[0]) - full_top) > 1e-4 for r in rank_results)


@pytest.mark.distributed
def test_reduced_trace_equals_full_batch_trace(rank_results: list[dict[str, Any]]) -> None:
    model = make_model()
    expected = hessian_trace(
        model, loss_fn, full_batch(), num_hvps=TRACE_HVPS, generator=_trace_generator()
    )
    exact = float(torch.trace(dense_hessian(model, full_batch())))
    for results in rank_results:
        reduced = results["trace_reduced"]
        assert reduced.num_hvps == expected.num_hvps == TRACE_HVPS
        assert reduced.method == "hutch++"
        assert reduced.value == pytest.approx(expected.value, rel=1e-10, abs=1e-12)
        # With the sketch spanning the whole space, Hutch++ is exact.
        assert reduced.value == pytest.approx(exact, rel=1e-10, abs=1e-12)
    assert rank_results[0]["trace_reduced"].value == rank_results[1]["trace_reduced"].value
    # Without the hook each rank estimates its own half's trace.
    for rank, results in enumerate(rank_results):
        own = float(torch.trace(dense_hessian(model, local_half(rank))))
        assert results["trace_local"].value == pytest.approx(own, rel=1e-10, abs=1e-12)
        assert results["trace_local"].value != pytest.approx(exact, rel=1e-3)
