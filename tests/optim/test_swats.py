"""SWATS against torch's Adam and SGD and against the paper's equations written out in float64."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_optdiag.optim import DEFAULT_SWITCH_THRESHOLD, SWATS, SwitchStatus
from tests.optim.cases import grad_of

BETAS = (0.9, 0.999)
LR = 1e-2
EPS = 1e-8


def _quadratic_problem(dtype: torch.dtype = torch.float64) -> tuple[list[Tensor], list[Tensor]]:
    """Two parameter tensors and fixed targets; the gradient is w - target + a coupling term."""
    generator = torch.Generator().manual_seed(0)
    weights = [
        torch.randn(4, 3, generator=generator, dtype=torch.float64),
        torch.randn(5, generator=generator, dtype=torch.float64),
    ]
    targets = [torch.randn_like(w) for w in weights]
    return [w.to(dtype).requires_grad_() for w in weights], [t.to(dtype) for t in targets]


def _set_quadratic_grads(params: list[Tensor], targets: list[Tensor], step: int) -> None:
    # A curved, step-dependent gradient: the Adam steps and gamma change from step to step.
    scale = 1.0 + 0.1 * math.sin(step)
    for index, (p, target) in enumerate(zip(params, targets, strict=True)):
        p.grad = ((index + 1.0) * (p.detach() - target) + 0.05 * p.detach() ** 3) * scale


def _clone(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


class PaperAdamGamma:
    """Adam and the SWATS estimate from the paper's equations, in float64 (one unit)."""

    def __init__(self, sizes: list[int], weight_decay: float = 0.0) -> None:
        self.m = [torch.zeros(n, dtype=torch.float64) for n in sizes]
        self.v = [torch.zeros(n, dtype=torch.float64) for n in sizes]
        self.k = 0
        self.lam = 0.0
        self.weight_decay = weight_decay

    def step(self, weights: list[Tensor], grads: list[Tensor]) -> tuple[list[Tensor], float, float]:
        """Return the new weights, gamma_k and Lambda_k."""
        beta1, beta2 = BETAS
        self.k += 1
        new_weights, steps, used_grads = [], [], []
        for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
            g = g + self.weight_decay * w
            self.m[i] = beta1 * self.m[i] + (1 - beta1) * g
            self.v[i] = beta2 * self.v[i] + (1 - beta2) * g * g
            m_hat = self.m[i] / (1 - beta1**self.k)
            v_hat = self.v[i] / (1 - beta2**self.k)
            p = -LR * m_hat / (v_hat.sqrt() + EPS)
            new_weights.append(w + p)
            steps.append(p)
            used_grads.append(g)
        p_all, g_all = torch.cat(steps), torch.cat(used_grads)
        gamma = float(p_all @ p_all / -(p_all @ g_all))
        self.lam = beta2 * self.lam + (1 - beta2) * gamma
        return new_weights, gamma, self.lam / (1 - beta2**self.k)


def _lambda(status: SwitchStatus) -> float:
    assert status.lambda_estimate is not None
    return status.lambda_estimate


def _flat(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().reshape(-1).double() for p in params]


# --- Adam phase -------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_before_the_switch_it_is_torch_adam_bit_for_bit(dtype: torch.dtype, foreach: bool) -> None:
    params, targets = _quadratic_problem(dtype)
    adam_params = _clone(params)
    swats = SWATS(params, lr=LR, weight_decay=0.01, switch_threshold=0.0, foreach=foreach)
    adam = torch.optim.Adam(adam_params, lr=LR, weight_decay=0.01, foreach=foreach)
    for step in range(25):
        _set_quadratic_grads(params, targets, step)
        _set_quadratic_grads(adam_params, targets, step)
        swats.step()
        adam.step()
        for mine, torchs in zip(params, adam_params, strict=True):
            assert torch.equal(mine, torchs), step
    assert not swats.switched


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_gamma_and_lambda_follow_the_paper_equations(weight_decay: float) -> None:
    params, targets = _quadratic_problem()
    swats = SWATS(params, lr=LR, weight_decay=weight_decay, switch_threshold=0.0)
    reference = PaperAdamGamma([p.numel() for p in params], weight_decay)
    weights = _flat(params)
    for step in range(30):
        _set_quadratic_grads(params, targets, step)
        grads = [grad_of(p).reshape(-1) for p in params]
        weights, _, expected_lambda = reference.step(weights, grads)
        swats.step()
        [status] = swats.switch_status()
        assert status.lambda_estimate == pytest.approx(expected_lambda, rel=1e-9)
        for actual, expected in zip(_flat(params), weights, strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


# --- switch and SGD phase ---------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
def test_after_a_forced_switch_it_is_torch_sgd_with_lr_one_minus_beta1_times_lambda(
    foreach: bool,
) -> None:
    params, targets = _quadratic_problem()
    swats = SWATS(
        params,
        lr=LR,
        weight_decay=0.01,
        switch_threshold=math.inf,  # any agreement counts: the switch is forced at step 4
        switch_min_steps=4,
        foreach=foreach,
    )
    reference = PaperAdamGamma([p.numel() for p in params], weight_decay=0.01)
    weights = _flat(params)
    for step in range(4):
        _set_quadratic_grads(params, targets, step)
        weights, _, expected_lambda = reference.step(
            weights, [grad_of(p).reshape(-1) for p in params]
        )
        swats.step()
    [status] = swats.switch_status()
    assert status.switched
    assert status.switch_step == 4
    assert swats.switched
    assert status.lambda_estimate == pytest.approx(expected_lambda, rel=1e-9)
    sgd_lr = (1 - BETAS[0]) * _lambda(status)
    assert status.sgd_lr == sgd_lr
    # Adam's moments are gone; no momentum buffer exists yet: the SGD phase starts fresh.
    assert all(set(swats.state[p]) == {"step"} for p in params)

    sgd_params = _clone(params)
    sgd = torch.optim.SGD(
        sgd_params, lr=sgd_lr, momentum=BETAS[0], weight_decay=0.01, foreach=foreach
    )
    velocity = [torch.zeros_like(w) for w in weights]  # the paper's v, from zero
    for step in range(4, 14):
        _set_quadratic_grads(params, targets, step)
        _set_quadratic_grads(sgd_params, targets, step)
        grads = [grad_of(p).reshape(-1) + 0.01 * w for p, w in zip(params, weights, strict=True)]
        velocity = [BETAS[0] * v + g for v, g in zip(velocity, grads, strict=True)]
        weights = [
            w - (1 - BETAS[0]) * _lambda(status) * v for w, v in zip(weights, velocity, strict=True)
        ]
        swats.step()
        sgd.step()
        for mine, torchs in zip(params, sgd_params, strict=True):
            assert torch.equal(mine, torchs), step
        for actual, expected in zip(_flat(params), weights, strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def test_the_sgd_buffer_is_not_adams_scaled_in_place() -> None:
    # The bug this guards against reuses Adam's exp_avg as the buffer, scaled by (1 - beta1):
    # the effective momentum is then beta1 * (1 - beta1). Compare the SGD phase's first step
    # after the switch with what that bug would give.
    params, targets = _quadratic_problem()
    swats = SWATS(params, lr=LR, switch_threshold=math.inf, switch_min_steps=3)
    for step in range(3):
        _set_quadratic_grads(params, targets, step)
        swats.step()
    [status] = swats.switch_status()
    before = [p.detach().clone() for p in params]
    _set_quadratic_grads(params, targets, 3)
    grads = [grad_of(p).clone() for p in params]
    swats.step()
    for p, w, g in zip(params, before, grads, strict=True):
        # Fresh buffer: v = g, so w <- w - sgd_lr * g exactly as torch's first SGD step.
        assert status.sgd_lr is not None
        torch.testing.assert_close(p.detach(), w - status.sgd_lr * g, rtol=0, atol=1e-15)


def test_global_mode_uses_the_whole_group_and_switches_it_at_once() -> None:
    params, targets = _quadratic_problem()
    swats = SWATS(params, lr=LR, switch_threshold=math.inf, switch_min_steps=5)
    reference = PaperAdamGamma([p.numel() for p in params])  # concatenated p and g
    per_tensor = [PaperAdamGamma([p.numel()]) for p in params]
    weights = _flat(params)
    for step in range(5):
        _set_quadratic_grads(params, targets, step)
        grads = [grad_of(p).reshape(-1) for p in params]
        weights, _, expected = reference.step(weights, grads)
        per_tensor_lambdas = [
            ref.step([w], [g])[2]
            for ref, w, g in zip(per_tensor, _flat(params), grads, strict=True)
        ]
        swats.step()
    [status] = swats.switch_status()
    assert status.param is None
    assert status.switch_step == 5
    assert status.lambda_estimate == pytest.approx(expected, rel=1e-9)
    # ... which is not any single tensor's Lambda.
    assert all(abs(lam / expected - 1) > 1e-3 for lam in per_tensor_lambdas)


def _drifting_and_steady_grads(params: list[Tensor], step: int) -> None:
    """Tensor 0: a constant gradient (gamma constant). Tensor 1: growing 10 % a step (drifts)."""
    params[0].grad = torch.linspace(-1.0, 1.0, params[0].numel(), dtype=torch.float64).view_as(
        params[0]
    )
    params[1].grad = 1.1**step * torch.linspace(0.5, 2.0, params[1].numel(), dtype=torch.float64)


def test_per_layer_mode_switches_each_tensor_with_its_own_lambda() -> None:
    params, _ = _quadratic_problem()
    adam_twin = _clone(params[1:])
    swats = SWATS(params, lr=LR, mode="per_layer")
    adam = torch.optim.Adam(adam_twin, lr=LR)
    references = [PaperAdamGamma([p.numel()]) for p in params]
    weights = _flat(params)
    for step in range(60):
        _drifting_and_steady_grads(params, step)
        adam_twin[0].grad = grad_of(params[1]).clone()
        swats.step()
        adam.step()
        if step < 10:
            weights = [
                ref.step([w], [grad_of(p).reshape(-1)])[0][0]
                for ref, w, p in zip(references, weights, params, strict=True)
            ]
            lambdas = [ref.lam / (1 - BETAS[1] ** ref.k) for ref in references]
    steady, drifting = swats.switch_status()
    assert (steady.param, drifting.param) == (0, 1)
    # The steady tensor switched at the first test (step 10) with its own Lambda ...
    assert steady.switched
    assert steady.switch_step == 10
    assert steady.lambda_estimate == pytest.approx(lambdas[0], rel=1e-9)
    # ... and the drifting one stayed exactly torch's Adam: no group-wide switch.
    assert not drifting.switched
    assert not swats.switched
    assert torch.equal(params[1], adam_twin[0])


def test_the_default_criterion_does_not_fire_while_gamma_drifts_from_lambda() -> None:
    (param,) = _quadratic_problem()[0][1:]
    swats = SWATS([param], lr=LR)
    reference = PaperAdamGamma([param.numel()])
    smallest_relative_gap = math.inf
    for step in range(400):
        param.grad = 1.05**step * torch.linspace(0.5, 2.0, param.numel(), dtype=torch.float64)
        _, gamma, lam = reference.step([param.detach().clone()], [grad_of(param).clone()])
        if step >= 9:
            smallest_relative_gap = min(smallest_relative_gap, abs(lam - gamma) / lam)
        swats.step()
    assert smallest_relative_gap > DEFAULT_SWITCH_THRESHOLD  # they disagree all along ...
    assert not swats.switched  # ... so no switch


def test_the_default_criterion_fires_as_soon_as_allowed_when_gamma_is_steady() -> None:
    (param,) = _quadratic_problem()[0][:1]
    swats = SWATS([param], lr=LR)
    for _ in range(12):
        param.grad = torch.linspace(-1.0, 1.0, param.numel(), dtype=torch.float64).view_as(param)
        swats.step()
    [status] = swats.switch_status()
    assert status.switch_step == 10


def test_the_paper_absolute_rule_is_available() -> None:
    (param,) = _quadratic_problem()[0][:1]
    swats = SWATS([param], lr=LR, switch_rule="absolute", switch_threshold=1e-9, switch_min_steps=2)
    for _ in range(3):
        param.grad = torch.linspace(-1.0, 1.0, param.numel(), dtype=torch.float64).view_as(param)
        swats.step()
    assert swats.switch_status()[0].switch_step == 2  # steady gamma agrees to 1e-9 at once


# --- a realistic problem ----------------------------------------------------------------------


def _mlp_problem(seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(2048, 20, generator=generator)
    teacher = torch.randn(20, 3, generator=generator)
    labels = (inputs @ teacher + 0.5 * torch.randn(2048, 3, generator=generator)).argmax(dim=1)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
    )
    return model, inputs, labels


def _train_until_switch(
    optimizer: SWATS, model: nn.Module, inputs: Tensor, labels: Tensor, seed: int, max_steps: int
) -> int | None:
    generator = torch.Generator().manual_seed(seed + 1)
    for step in range(1, max_steps + 1):
        index = torch.randint(0, len(inputs), (32,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs[index]), labels[index]).backward()
        optimizer.step()
        if optimizer.switched:
            return step
    return None


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_default_threshold_switches_on_a_small_mlp(seed: int) -> None:
    model, inputs, labels = _mlp_problem(seed)
    initial_loss = nn.functional.cross_entropy(model(inputs), labels).item()
    swats = SWATS(model.parameters(), lr=1e-3)
    switch_step = _train_until_switch(swats, model, inputs, labels, seed, max_steps=1000)
    assert switch_step is not None, "the default relative threshold never fired in 1000 steps"
    [status] = swats.switch_status()
    assert status.switch_step == switch_step
    assert _lambda(status) > 0
    # Training goes on in the SGD phase.
    _train_until_switch(swats, model, inputs, labels, seed + 10, max_steps=200)
    final_loss = nn.functional.cross_entropy(model(inputs), labels).item()
    assert math.isfinite(final_loss)
    assert final_loss < initial_loss


@pytest.mark.slow
def test_the_paper_absolute_threshold_never_switches_on_the_same_mlp() -> None:
    model, inputs, labels = _mlp_problem(0)
    paper = SWATS(
        model.parameters(),
        lr=1e-3,
        switch_rule="absolute",
        switch_threshold=1e-9,
        switch_min_steps=2,
    )
    assert _train_until_switch(paper, model, inputs, labels, 0, max_steps=1000) is None
    assert paper.switch_status()[0].lambda_estimate is not None  # it was estimating all along


# --- schedulers, state, validation ------------------------------------------------------------


def test_an_lr_change_after_the_switch_scales_the_sgd_rate() -> None:
    params, targets = _quadratic_problem()
    swats = SWATS(params, lr=LR, switch_threshold=math.inf, switch_min_steps=2)
    scheduler = torch.optim.lr_scheduler.StepLR(swats, step_size=3, gamma=0.5)
    for step in range(3):
        _set_quadratic_grads(params, targets, step)
        swats.step()
        scheduler.step()
    [status] = swats.switch_status()
    assert swats.param_groups[0]["lr"] == LR / 2
    assert status.sgd_lr == pytest.approx((1 - BETAS[0]) * _lambda(status) / 2, rel=1e-15)


def test_state_dict_carries_the_phase_and_lambda() -> None:
    params, targets = _quadratic_problem()
    swats = SWATS(params, lr=LR, switch_threshold=math.inf, switch_min_steps=3)
    for step in range(4):
        _set_quadratic_grads(params, targets, step)
        swats.step()
    saved = swats.state_dict()["param_groups"][0]
    [status] = swats.switch_status()
    assert saved["switch_step"] == 3
    assert saved["switch_lambda"] == status.lambda_estimate
    restored = SWATS(_clone(params), lr=LR)
    assert not restored.switch_status()[0].switched
    restored.load_state_dict(swats.state_dict())
    assert restored.switch_status() == swats.switch_status()


def test_status_before_any_step() -> None:
    swats = SWATS(_quadratic_problem()[0], mode="per_layer")
    assert [s.lambda_estimate for s in swats.switch_status()] == [None, None]
    assert not swats.switched


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "layerwise"}, "Invalid mode: 'layerwise'"),
        ({"switch_rule": "rel"}, "Invalid switch_rule: 'rel'"),
        ({"switch_threshold": -1e-3}, "Invalid switch_threshold: -0.001"),
        ({"switch_threshold": math.nan}, "Invalid switch_threshold: nan"),
        ({"switch_min_steps": 1}, "Invalid switch_min_steps: 1"),
    ],
)
def test_invalid_switch_settings_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SWATS(_quadratic_problem()[0], **kwargs)


def test_non_integer_min_steps_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"Invalid switch_min_steps: 2\.5"):
        SWATS(_quadratic_problem()[0], switch_min_steps=2.5)  # type: ignore[arg-type]
