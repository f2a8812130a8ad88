"""Lookahead against its base optimizer and the paper's update written out in float64."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_optdiag.optim import SGDW, Lookahead
from tests.optim.cases import round_trip, tiny_model


def _params(seed: int = 0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(3, 4, generator=generator, dtype=torch.float64).requires_grad_(),
        torch.randn(4, generator=generator, dtype=torch.float64).requires_grad_(),
    ]


def _set_grads(params: list[Tensor], step: int) -> None:
    # Depends on the weights and the step, so a wrong trajectory shows up in the gradients too.
    for index, p in enumerate(params):
        p.grad = (index + 1.0) * p.detach() + torch.cos(torch.arange(p.numel()) + step).view_as(p)


def _clone(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize(
    "make_base",
    [
        lambda p: torch.optim.Adam(p, lr=0.05),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
        lambda p: SGDW(p, lr=0.05, momentum=0.9),
    ],
    ids=["adam", "nag", "sgdw"],
)
def test_k1_alpha1_is_the_base_optimizer_bit_for_bit(
    make_base: Callable[[list[Tensor]], Optimizer], foreach: bool
) -> None:
    wrapped_params, base_params = _params(), _params()
    lookahead = Lookahead(make_base(wrapped_params), k=1, alpha=1.0, foreach=foreach)
    base = make_base(base_params)
    for step in range(15):
        _set_grads(wrapped_params, step)
        _set_grads(base_params, step)
        lookahead.step()
        base.step()
        for a, b in zip(wrapped_params, base_params, strict=True):
            assert torch.equal(a, b), step


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize(("k", "alpha"), [(3, 0.5), (5, 0.8), (2, 0.3)])
def test_matches_the_paper_update_over_momentum_sgd(k: int, alpha: float, foreach: bool) -> None:
    lr, momentum = 0.05, 0.9
    params = _params()
    lookahead = Lookahead(
        torch.optim.SGD(params, lr=lr, momentum=momentum), k=k, alpha=alpha, foreach=foreach
    )
    fast = [p.detach().clone() for p in params]
    slow = [p.detach().clone() for p in params]  # phi_0 = theta_0
    velocity = [torch.zeros_like(p) for p in fast]
    for step in range(17):
        grads = [
            (i + 1.0) * w + torch.cos(torch.arange(w.numel()) + step).view_as(w)
            for i, w in enumerate(fast)
        ]
        velocity = [momentum * v + g for v, g in zip(velocity, grads, strict=True)]
        fast = [w - lr * v for w, v in zip(fast, velocity, strict=True)]
        if (step + 1) % k == 0:
            slow = [phi + alpha * (theta - phi) for phi, theta in zip(slow, fast, strict=True)]
            fast = [phi.clone() for phi in slow]
        _set_grads(params, step)
        lookahead.step()
        for actual, expected in zip(params, fast, strict=True):
            torch.testing.assert_close(actual.detach(), expected, rtol=1e-12, atol=1e-13)
        for actual, expected in zip(lookahead.slow_weights(), slow, strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-13)
    assert lookahead.lookahead_step == 17


def test_slow_weights_start_at_the_initial_parameters_as_copies() -> None:
    params = _params()
    lookahead = Lookahead(torch.optim.SGD(params, lr=0.1), k=2)
    for slow, p in zip(lookahead.slow_weights(), params, strict=True):
        assert torch.equal(slow, p)
        assert slow.data_ptr() != p.data_ptr()
    _set_grads(params, 0)
    lookahead.step()  # a fast step: the slow weights stay where they were
    for slow, p in zip(lookahead.slow_weights(), _params(), strict=True):
        assert torch.equal(slow, p)


def test_param_groups_state_and_defaults_are_the_base_objects() -> None:
    base = torch.optim.Adam(_params(), lr=1e-3)
    lookahead = Lookahead(base)
    assert lookahead.param_groups is base.param_groups
    assert lookahead.state is base.state
    assert lookahead.defaults is base.defaults
    lookahead.param_groups[0]["lr"] = 0.5
    assert base.param_groups[0]["lr"] == 0.5


def test_state_dict_holds_base_state_slow_weights_and_counter() -> None:
    params = _params()
    lookahead = Lookahead(torch.optim.Adam(params, lr=0.05), k=3, alpha=0.4)
    for step in range(4):
        _set_grads(params, step)
        lookahead.step()
    state_dict = round_trip(lookahead.state_dict())
    assert set(state_dict["state"]) == {0, 1}
    assert "exp_avg" in state_dict["state"][0]
    saved = state_dict["lookahead"]
    assert saved["step"] == 4
    assert saved["k"] == 3
    assert saved["alpha"] == 0.4
    for index, slow in enumerate(lookahead.slow_weights()):
        assert torch.equal(saved["slow_weights"][index], slow)

    other_params = _clone(params)
    restored = Lookahead(torch.optim.Adam(other_params, lr=1.0), k=7, alpha=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(restored, step_size=1, gamma=0.5)
    restored.load_state_dict(state_dict)
    assert (restored.lookahead_step, restored.k, restored.alpha) == (4, 3, 0.4)
    for a, b in zip(restored.slow_weights(), lookahead.slow_weights(), strict=True):
        assert torch.equal(a, b)
    # torch's loader replaced the base's group list: the wrapper must share the new one.
    assert restored.param_groups is restored.base_optimizer.param_groups
    assert restored.state is restored.base_optimizer.state
    assert restored.param_groups[0]["lr"] == 0.05
    # ... so a scheduler built before the load still drives the base.
    _set_grads(other_params, 4)
    restored.step()
    scheduler.step()
    assert restored.base_optimizer.param_groups[0]["lr"] == 0.025
    # Loaded slow weights are copies: stepping does not write into the checkpoint.
    assert all(
        t.data_ptr() != s.data_ptr()
        for t, s in zip(
            restored.slow_weights(), state_dict["lookahead"]["slow_weights"].values(), strict=True
        )
    )


def test_a_plain_base_state_dict_loads_and_restarts_the_slow_weights() -> None:
    params = _params()
    base = torch.optim.Adam(params, lr=0.05)
    for step in range(3):
        _set_grads(params, step)
        base.step()
    lookahead = Lookahead(torch.optim.Adam(_clone(params), lr=0.05))
    lookahead.load_state_dict(base.state_dict())
    assert lookahead.lookahead_step == 0
    for slow, p in zip(lookahead.slow_weights(), params, strict=True):
        assert torch.equal(slow, p)
    assert torch.equal(
        lookahead.state[lookahead.param_groups[0]["params"][0]]["exp_avg"],
        base.state[params[0]]["exp_avg"],
    )


def test_mismatched_slow_weights_are_rejected() -> None:
    lookahead = Lookahead(torch.optim.SGD(_params(), lr=0.1))
    state_dict = lookahead.state_dict()
    state_dict["lookahead"]["slow_weights"][0] = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"slow weight 0 has shape \(2, 2\)"):
        Lookahead(torch.optim.SGD(_params(), lr=0.1)).load_state_dict(state_dict)


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=12),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=4),
    ],
    ids=["StepLR", "OneCycleLR", "CosineAnnealingWarmRestarts"],
)
def test_lr_schedulers_act_on_the_base(make_scheduler: Callable[[Optimizer], Any]) -> None:
    # With k=1, alpha=1 the wrapper is its base, so a scheduled wrapper must match a scheduled
    # base exactly: lr and (OneCycleLR) betas included.
    wrapped_params, base_params = _params(), _params()
    lookahead = Lookahead(torch.optim.Adam(wrapped_params, lr=0.01), k=1, alpha=1.0)
    base = torch.optim.Adam(base_params, lr=0.01)
    wrapped_scheduler, base_scheduler = make_scheduler(lookahead), make_scheduler(base)
    seen_lrs = set()
    for step in range(12):
        _set_grads(wrapped_params, step)
        _set_grads(base_params, step)
        lookahead.step()
        base.step()
        wrapped_scheduler.step()
        base_scheduler.step()
        group, base_group = lookahead.base_optimizer.param_groups[0], base.param_groups[0]
        assert group["lr"] == base_group["lr"]
        assert group["betas"] == base_group["betas"]
        seen_lrs.add(group["lr"])
        for a, b in zip(wrapped_params, base_params, strict=True):
            assert torch.equal(a, b)
    assert len(seen_lrs) > 2  # the schedule really moved the lr


def test_add_param_group_reaches_the_base_and_snapshots_slow_weights() -> None:
    params = _params()
    lookahead = Lookahead(torch.optim.SGD(params[:1], lr=0.1), k=2, alpha=0.5)
    lookahead.add_param_group({"params": [params[1]], "lr": 0.01})
    assert len(lookahead.base_optimizer.param_groups) == 2
    assert lookahead.param_groups is lookahead.base_optimizer.param_groups
    before = params[1].detach().clone()
    for step in range(2):
        _set_grads(params, step)
        lookahead.step()
    # After one cycle: phi = phi_0 + 0.5 (theta - phi_0), from the new group's initial value.
    expected = before
    for step in range(2):
        grad = 2.0 * expected + torch.cos(torch.arange(4) + step)
        expected = expected - 0.01 * grad
    expected = before + 0.5 * (expected - before)
    torch.testing.assert_close(params[1].detach(), expected, rtol=1e-12, atol=1e-14)


def test_deepcopy_keeps_the_base_and_the_sharing() -> None:
    params = _params()
    lookahead = Lookahead(torch.optim.Adam(params, lr=0.05), k=2)
    _set_grads(params, 0)
    lookahead.step()
    clone = copy.deepcopy(lookahead)
    assert clone.param_groups is clone.base_optimizer.param_groups
    assert clone.lookahead_step == 1
    assert clone.k == 2
    assert clone.base_optimizer is not lookahead.base_optimizer


def test_zero_grad_and_closure_delegate_to_the_base() -> None:
    params = _params()
    lookahead = Lookahead(torch.optim.SGD(params, lr=0.1))

    def closure() -> Tensor:
        lookahead.zero_grad()
        loss = torch.stack([(p**2).sum() for p in params]).sum()
        loss.backward()
        return loss

    assert lookahead.step(closure).item() == pytest.approx(
        torch.stack([(p**2).sum() for p in _params()]).sum().item()
    )
    lookahead.zero_grad()
    assert all(p.grad is None for p in params)


# --- validation -------------------------------------------------------------------------------


def test_the_base_must_be_a_torch_optimizer() -> None:
    with pytest.raises(
        TypeError, match=r"Invalid base_optimizer: expected a torch\.optim\.Optimizer, got list"
    ):
        Lookahead([])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("k", "error"), [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_invalid_k_is_rejected_with_the_value(k: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=f"Invalid k: {k!r}"):
        Lookahead(torch.optim.SGD(_params(), lr=0.1), k=k)  # type: ignore[arg-type]


@settings(max_examples=30, deadline=None)
@given(
    alpha=st.one_of(
        st.floats(max_value=0.0, allow_nan=False),
        st.floats(min_value=1.0, exclude_min=True, allow_nan=False),
    )
)
def test_alpha_outside_zero_one_is_rejected_with_the_value(alpha: float) -> None:
    with pytest.raises(ValueError, match="Invalid alpha") as error:
        Lookahead(torch.optim.SGD(_params(), lr=0.1), alpha=alpha)
    assert str(alpha) in str(error.value)


# --- a Lightning checkpoint -------------------------------------------------------------------


class _Module(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_model(torch.float32)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)

    def configure_optimizers(self) -> Optimizer:
        return Lookahead(torch.optim.Adam(self.parameters(), lr=0.02), k=3, alpha=0.5)


def _fit(max_epochs: int, ckpt_path: Path | None = None, save_to: Path | None = None) -> _Module:
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(40, 6, generator=generator), torch.randn(40, 3, generator=generator)
    )
    module = _Module()
    trainer = Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return module


@pytest.mark.slow
def test_a_lightning_checkpoint_resumes_lookahead_exactly(tmp_path: Path) -> None:
    # 5 batches an epoch and k=3: the checkpoint after epoch 2 (step 10) is mid-cycle.
    checkpoint = tmp_path / "lookahead.ckpt"
    _fit(max_epochs=2, save_to=checkpoint)
    saved = torch.load(checkpoint, weights_only=True)["optimizer_states"][0]["lookahead"]
    assert saved["step"] == 10
    resumed = _fit(max_epochs=4, ckpt_path=checkpoint)
    uninterrupted = _fit(max_epochs=4)
    for a, b in zip(resumed.parameters(), uninterrupted.parameters(), strict=True):
        assert torch.equal(a, b)
