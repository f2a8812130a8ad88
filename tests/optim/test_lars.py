"""LARS against its update equations in float64, and the layer-adaptation param groups."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_optdiag.optim import LARS, param_groups_for_layer_adaptation
from tests.optim.cases import grad_of

LR, MOMENTUM, ETA, EPS = 0.5, 0.9, 0.02, 1e-8


def _weights() -> list[Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(5, 4, generator=generator, dtype=torch.float64).requires_grad_(),
        (3.0 * torch.randn(2, 5, generator=generator, dtype=torch.float64)).requires_grad_(),
        torch.randn(5, generator=generator, dtype=torch.float64).requires_grad_(),  # "bias"
    ]


def _grad(weight: Tensor, index: int, step: int) -> Tensor:
    return (index + 1.0) * weight + torch.cos(torch.arange(weight.numel()) * 1.3 + step).view_as(
        weight
    )


def _set_grads(params: list[Tensor], step: int) -> None:
    for index, p in enumerate(params):
        p.grad = _grad(p.detach(), index, step)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
def test_matches_the_paper_update_with_an_excluded_group(nesterov: bool, foreach: bool) -> None:
    weight_decay = 0.01
    params = _weights()
    optimizer = LARS(
        [
            {"params": params[:2], "weight_decay": weight_decay},
            {"params": params[2:], "weight_decay": 0.0, "layer_adaptation": False},
        ],
        lr=LR,
        momentum=MOMENTUM,
        trust_coefficient=ETA,
        eps=EPS,
        nesterov=nesterov,
        foreach=foreach,
    )
    weights = [p.detach().clone() for p in params]
    buffers: list[Tensor | None] = [None, None, None]
    for step in range(12):
        for i, w in enumerate(weights):
            g = _grad(w, i, step)
            if i < 2:  # local lr = eta ||w|| / (||g|| + beta ||w||), times (g + beta w)
                trust = ETA * w.norm() / (g.norm() + weight_decay * w.norm() + EPS)
                d = trust * (g + weight_decay * w)
            else:
                d = g
            previous = buffers[i]
            buffer = d if previous is None else MOMENTUM * previous + d
            buffers[i] = buffer
            direction = d + MOMENTUM * buffer if nesterov else buffer
            weights[i] = w - LR * direction
        _set_grads(params, step)
        optimizer.step()
        for actual, expected in zip(params, weights, strict=True):
            torch.testing.assert_close(actual.detach(), expected, rtol=1e-12, atol=1e-14)


def test_an_excluded_group_is_torch_momentum_sgd_bit_for_bit() -> None:
    params, torch_params = _weights(), _weights()
    lars = LARS([{"params": params, "layer_adaptation": False}], lr=0.05, momentum=MOMENTUM)
    sgd = torch.optim.SGD(torch_params, lr=0.05, momentum=MOMENTUM)
    for step in range(8):
        _set_grads(params, step)
        _set_grads(torch_params, step)
        lars.step()
        sgd.step()
    assert all(torch.equal(a, b) for a, b in zip(params, torch_params, strict=True))


def test_the_step_does_not_depend_on_the_gradient_scale() -> None:
    # The point of the trust ratio: ||step|| = lr * eta * ||w|| whatever ||g|| is (eps aside).
    steps = []
    for scale in (1e-4, 1.0, 1e4):
        params = _weights()[:1]
        before = params[0].detach().clone()
        optimizer = LARS(params, lr=LR, momentum=0.0, trust_coefficient=ETA, eps=0.0)
        params[0].grad = scale * _grad(before, 0, 0)
        optimizer.step()
        steps.append(params[0].detach() - before)
        torch.testing.assert_close(steps[-1].norm(), LR * ETA * before.norm(), rtol=1e-12, atol=0)
    torch.testing.assert_close(steps[0], steps[2], rtol=1e-10, atol=0)


def test_zero_weight_or_zero_gradient_gets_a_trust_ratio_of_one() -> None:
    zero_weight = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    zero_grad = torch.ones(3, 2, dtype=torch.float64, requires_grad=True)
    optimizer = LARS([zero_weight, zero_grad], lr=0.1, momentum=0.0, weight_decay=0.5)
    zero_weight.grad = torch.full((3, 2), 2.0, dtype=torch.float64)
    zero_grad.grad = torch.zeros(3, 2, dtype=torch.float64)
    optimizer.step()
    # q = 1: w <- w - lr (g + wd w)
    torch.testing.assert_close(zero_weight.detach(), torch.full((3, 2), -0.2, dtype=torch.float64))
    torch.testing.assert_close(
        zero_grad.detach(), torch.full((3, 2), 1 - 0.1 * 0.5, dtype=torch.float64)
    )


def test_gradients_are_left_untouched() -> None:
    params = _weights()
    _set_grads(params, 0)
    grads = [grad_of(p).clone() for p in params]
    LARS(params, weight_decay=0.1).step()
    assert all(torch.equal(grad_of(p), g) for p, g in zip(params, grads, strict=True))


# --- param groups for layer adaptation ------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(1, 2, 3)
        self.batch_norm = nn.BatchNorm2d(2)
        self.linear = nn.Linear(4, 4)
        self.layer_norm = nn.LayerNorm(4)
        self.group_norm = nn.GroupNorm(2, 4)
        self.scale = nn.Parameter(torch.ones(4))  # 1-D: excluded although not a norm layer
        self.tied = nn.Linear(4, 4, bias=False)


def test_biases_and_normalisation_parameters_are_excluded() -> None:
    net = _Net()
    adapted, excluded = param_groups_for_layer_adaptation(net, weight_decay=1e-4)
    assert adapted["weight_decay"] == 1e-4
    assert "layer_adaptation" not in adapted
    assert excluded["weight_decay"] == 0.0
    assert excluded["layer_adaptation"] is False
    names = {id(p): name for name, p in net.named_parameters()}
    assert [names[id(p)] for p in adapted["params"]] == [
        "embed.weight",
        "conv.weight",
        "linear.weight",
        "tied.weight",
    ]
    assert [names[id(p)] for p in excluded["params"]] == [
        "scale",  # model.parameters() yields a module's own parameters first
        "conv.bias",
        "batch_norm.weight",
        "batch_norm.bias",
        "linear.bias",
        "layer_norm.weight",
        "layer_norm.bias",
        "group_norm.weight",
        "group_norm.bias",
    ]
    LARS([adapted, excluded]).step()  # the groups are valid LARS groups


def test_a_parameter_shared_with_a_norm_layer_is_excluded() -> None:
    net = nn.Module()
    net.norm = nn.LayerNorm(3)
    net.other = nn.Module()
    net.other.register_parameter("shared", net.norm.weight)
    net.matrix = nn.Parameter(torch.ones(3, 3))
    groups = param_groups_for_layer_adaptation(net)
    assert [len(g["params"]) for g in groups] == [1, 2]


def test_empty_groups_are_left_out() -> None:
    groups = param_groups_for_layer_adaptation(nn.LayerNorm(3))
    assert len(groups) == 1
    assert groups[0]["layer_adaptation"] is False


def test_layer_adaptation_helper_validates_its_arguments() -> None:
    with pytest.raises(TypeError, match=r"Invalid model: expected an nn\.Module, got list"):
        param_groups_for_layer_adaptation([])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Invalid weight_decay value: -1\.0"):
        param_groups_for_layer_adaptation(nn.Linear(2, 2), weight_decay=-1.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"trust_coefficient": 0.0}, ValueError, "Invalid trust_coefficient value: 0.0"),
        ({"trust_coefficient": -1.0}, ValueError, "Invalid trust_coefficient value: -1.0"),
        (
            {"momentum": 0.0, "nesterov": True},
            ValueError,
            "Nesterov momentum requires a momentum, got momentum=0.0",
        ),
        ({"momentum": -0.1}, ValueError, "Invalid momentum value: -0.1"),
    ],
)
def test_invalid_settings_are_rejected(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        LARS(_weights(), **kwargs)


def test_layer_adaptation_flag_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="Invalid layer_adaptation: 'no'"):
        LARS([{"params": _weights(), "layer_adaptation": "no"}])
