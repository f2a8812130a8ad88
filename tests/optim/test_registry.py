"""The optimizer registry over torch.optim and the bundled optimizers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_optdiag.optim import (
    LAMB,
    LARS,
    SGDW,
    SWATS,
    AdaBound,
    AMSBound,
    Lookahead,
    create_optimizer,
    list_optimizers,
)

EXPECTED = {
    "sgd": torch.optim.SGD,
    "sgdm": torch.optim.SGD,
    "nag": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
    "adadelta": torch.optim.Adadelta,
    "adam": torch.optim.Adam,
    "amsgrad": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
    "swats": SWATS,
    "lookahead": Lookahead,
    "adabound": AdaBound,
    "amsbound": AMSBound,
    "sgdw": SGDW,
    "lars": LARS,
    "lamb": LAMB,
}


def test_lists_every_name_sorted() -> None:
    names = list_optimizers()
    assert names == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_creates_the_right_class_and_it_steps(name: str) -> None:
    model = nn.Linear(3, 2)
    optimizer = create_optimizer(name, model.parameters())
    assert type(optimizer) is EXPECTED[name]
    before = model.weight.detach().clone()
    model(torch.randn(4, 3)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model.weight, before)


def test_natives_are_torch_classes_with_their_presets() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    assert create_optimizer("sgd", params).defaults["momentum"] == 0
    assert create_optimizer("sgdm", params).defaults["momentum"] == 0.9
    assert create_optimizer("sgdm", params, momentum=0.5).defaults["momentum"] == 0.5
    nag = create_optimizer("nag", params, lr=0.1)
    assert nag.defaults["nesterov"] is True
    assert nag.defaults["momentum"] == 0.9
    assert create_optimizer("amsgrad", params).defaults["amsgrad"] is True
    assert create_optimizer("adam", params).defaults["amsgrad"] is False


def test_names_are_case_insensitive_and_kwargs_pass_through() -> None:
    optimizer = create_optimizer(
        "  AdamW ", [nn.Parameter(torch.zeros(2))], lr=0.123, weight_decay=0.2
    )
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 0.123
    assert optimizer.param_groups[0]["weight_decay"] == 0.2


def test_lookahead_wraps_a_named_base() -> None:
    optimizer = create_optimizer(
        "lookahead", [nn.Parameter(torch.zeros(2))], base="SGDM", lr=0.1, k=3, alpha=0.7
    )
    assert isinstance(optimizer, Lookahead)
    assert (optimizer.k, optimizer.alpha) == (3, 0.7)
    assert isinstance(optimizer.base_optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.9
    assert optimizer.param_groups[0]["lr"] == 0.1
    default = create_optimizer("lookahead", [nn.Parameter(torch.zeros(2))])
    assert isinstance(default, Lookahead)
    assert isinstance(default.base_optimizer, torch.optim.Adam)


def test_lookahead_cannot_wrap_itself() -> None:
    with pytest.raises(ValueError, match="Invalid base for optimizer 'lookahead': 'lookahead'"):
        create_optimizer("lookahead", [nn.Parameter(torch.zeros(2))], base="lookahead")


@settings(max_examples=40, deadline=None)
@given(name=st.text(min_size=1, max_size=12).filter(lambda s: s.strip().lower() not in EXPECTED))
def test_an_unknown_name_lists_the_valid_ones(name: str) -> None:
    with pytest.raises(ValueError, match="Unknown optimizer") as error:
        create_optimizer(name, [nn.Parameter(torch.zeros(2))])
    message = str(error.value)
    assert repr(name) in message
    assert all(valid in message for valid in EXPECTED)


def test_a_non_string_name_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="Invalid optimizer name: 3"):
        create_optimizer(3, [nn.Parameter(torch.zeros(2))])  # type: ignore[arg-type]


def test_bad_kwargs_raise_the_optimizers_own_errors() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=r"Invalid learning rate: -1\.0"):
        create_optimizer("adam", params, lr=-1.0)
    with pytest.raises(ValueError, match=r"Invalid learning rate: -1\.0"):
        create_optimizer("swats", params, lr=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'lrr'"):
        create_optimizer("lamb", params, lrr=0.1)
    with pytest.raises(ValueError, match=r"Invalid alpha: 2\.0"):
        create_optimizer("lookahead", params, alpha=2.0)


@pytest.mark.parametrize(("name", "argument"), [("nag", "nesterov"), ("amsgrad", "amsgrad")])
def test_contradicting_a_preset_is_an_error(name: str, argument: str) -> None:
    with pytest.raises(ValueError, match=f"Invalid {argument} for optimizer '{name}': False"):
        create_optimizer(name, [nn.Parameter(torch.zeros(2))], **{argument: False})
    # Repeating the preset is fine.
    create_optimizer(name, [nn.Parameter(torch.zeros(2))], **{argument: True})
