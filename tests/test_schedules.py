"""The diagnosis -> learning-rate schedule mapping of ``lightning_optdiag.schedules``.

``recommend_schedules`` is checked against the table of ``docs/switching.md`` and the module
docstring (formulas recomputed here from the diagnosis evidence), ``build_schedule`` against the
``torch.optim.lr_scheduler`` class constructed directly with the documented arguments on an
identical optimizer: both are stepped side by side and their learning rates compared exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    CyclicLR,
    LambdaLR,
    LinearLR,
    OneCycleLR,
)

from lightning_optdiag.diagnosis import Diagnosis
from lightning_optdiag.schedules import (
    ScheduleRecommendation,
    build_schedule,
    recommend_schedules,
)
from lightning_optdiag.signals import warmup_horizon

ALL_SCHEDULES = ("warmup", "decay", "one_cycle", "cyclical", "cosine", "warm_restarts")


def diagnosis(kind: str, cleared: int | None = None, **evidence: Any) -> Diagnosis:
    return Diagnosis(
        kind=kind,
        step=100,
        severity="warning",
        confidence=0.9,
        evidence=evidence,
        message=f"{kind} (hand-made)",
        recommendation="-",
        cleared_step=cleared,
    )


def only(found: list[ScheduleRecommendation]) -> ScheduleRecommendation:
    assert len(found) == 1, found
    return found[0]


# ----------------------------------------------------------------------- recommend_schedules
@pytest.mark.parametrize(
    ("beta2", "remaining", "expected"),
    [(0.999, 5000, 2000), (0.999, 700, 700), (0.98, 10_000, 100), (0.9, 20, 20)],
)
def test_warmup_spans_two_over_one_minus_beta2_capped_by_the_remaining_steps(
    beta2: float, remaining: int, expected: int
) -> None:
    adam = torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=1e-3, betas=(0.9, beta2))
    horizon = warmup_horizon(adam)
    assert horizon == round(2.0 / (1.0 - beta2))
    found = only(
        recommend_schedules(
            [diagnosis("needs_warmup")], remaining_steps=remaining, warmup_steps=horizon
        )
    )
    assert (found.schedule, found.diagnosis) == ("warmup", "needs_warmup")
    assert found.settings == {"steps": expected}
    assert str(expected) in found.reason


def test_no_warmup_advice_without_a_warmup_length() -> None:
    # SGD has no second moments: warmup_horizon is None and there is nothing to warm up.
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    assert warmup_horizon(sgd) is None
    assert recommend_schedules([diagnosis("needs_warmup")], remaining_steps=100) == []
    assert (
        recommend_schedules([diagnosis("needs_warmup")], remaining_steps=100, warmup_steps=None)
        == []
    )


@pytest.mark.parametrize("ratio", [1.0, 1.2, 4.0 / 3.0, 1.5, 2.0, 4.0, 10.0])
def test_decay_factor_is_one_over_max_two_and_one_and_a_half_times_the_ratio(
    ratio: float,
) -> None:
    found = only(
        recommend_schedules([diagnosis("lr_too_high", sharpness_ratio=ratio)], remaining_steps=50)
    )
    assert (found.schedule, found.diagnosis) == ("decay", "lr_too_high")
    expected = 1.0 / max(2.0, 1.5 * ratio)
    assert found.settings["factor"] == pytest.approx(expected, rel=1e-12)
    assert found.settings["factor"] <= 0.5  # the table: "at most 1/2"
    # After the decay the sharpness sits below the stability threshold.
    assert ratio * found.settings["factor"] < 1.0
    assert f"{expected:.3g}" in found.reason
    assert f"{ratio:.2f}x" in found.reason


def test_decay_without_a_measured_ratio_still_at_least_halves() -> None:
    found = only(recommend_schedules([diagnosis("lr_too_high")], remaining_steps=50))
    assert found.schedule == "decay"
    assert 0.0 < found.settings["factor"] <= 0.5


@pytest.mark.parametrize(
    ("ratio", "expected_peak"),
    [(0.001, 10.0), (0.01, 10.0), (0.04, 10.0), (0.05, 10.0), (0.1, 5.0), (0.2, 2.5)],
)
def test_one_cycle_peaks_at_min_ten_and_half_the_headroom(
    ratio: float, expected_peak: float
) -> None:
    found = only(
        recommend_schedules([diagnosis("lr_too_small", sharpness_ratio=ratio)], remaining_steps=321)
    )
    headroom = 1.0 / ratio
    assert expected_peak == pytest.approx(min(10.0, headroom / 2.0))
    assert (found.schedule, found.diagnosis) == ("one_cycle", "lr_too_small")
    assert found.settings == {"peak_factor": pytest.approx(expected_peak), "steps": 321}
    assert f"{expected_peak:.3g}x" in found.reason
    assert f"{headroom:.3g}x" in found.reason


@pytest.mark.parametrize(
    ("ratio", "expected_peak"), [(0.0, 10.0), (-0.5, 10.0), (0.5, 1.0), (0.8, 0.625)]
)
def test_one_cycle_peak_follows_the_documented_headroom_at_the_edges(
    ratio: float, expected_peak: float
) -> None:
    # The rule (diagnosis/rules.py::_lr_too_small) takes a ratio <= 0 as unbounded headroom.
    found = only(
        recommend_schedules([diagnosis("lr_too_small", sharpness_ratio=ratio)], remaining_steps=50)
    )
    assert found.settings["peak_factor"] == pytest.approx(expected_peak)


def test_cyclical_between_one_and_three_times_for_a_saddle() -> None:
    found = only(recommend_schedules([diagnosis("saddle_point")], remaining_steps=400))
    assert (found.schedule, found.diagnosis) == ("cyclical", "saddle_point")
    assert found.settings["max_factor"] == 3.0
    half = found.settings["half_cycle"]
    assert 2 <= half <= 400
    assert "between 1x and 3x" in found.reason
    assert f"every {2 * half} steps" in found.reason


@pytest.mark.parametrize("remaining", [2, 37, 1000])
def test_cosine_over_the_remaining_steps_for_gradient_noise(remaining: int) -> None:
    found = only(recommend_schedules([diagnosis("gradient_noise")], remaining_steps=remaining))
    assert (found.schedule, found.diagnosis) == ("cosine", "gradient_noise")
    assert found.settings == {"steps": remaining}
    assert f"remaining {remaining} steps" in found.reason


@pytest.mark.parametrize(
    "others", [(), ("local_minimum",), ("overfitting",), ("exploding_gradients",)]
)
def test_warm_restarts_for_a_converged_plateau(others: tuple[str, ...]) -> None:
    found = only(
        recommend_schedules(
            [diagnosis("plateau"), *(diagnosis(kind) for kind in others)], remaining_steps=900
        )
    )
    assert (found.schedule, found.diagnosis) == ("warm_restarts", "plateau")
    period = found.settings["period"]
    assert 2 <= period <= 900
    assert f"every {period} steps" in found.reason


@pytest.mark.parametrize(
    ("blocker", "schedule"),
    [
        ("lr_too_high", "decay"),
        ("lr_too_small", "one_cycle"),
        ("saddle_point", "cyclical"),
        ("gradient_noise", "cosine"),
        ("model_bias", None),
    ],
)
def test_no_warm_restarts_for_a_plateau_with_a_cause(blocker: str, schedule: str | None) -> None:
    for order in ((blocker, "plateau"), ("plateau", blocker)):
        found = recommend_schedules([diagnosis(kind) for kind in order], remaining_steps=300)
        assert [r.schedule for r in found] == ([schedule] if schedule else []), order


@pytest.mark.parametrize(
    "kind",
    ["local_minimum", "nonfinite", "exploding_gradients", "vanishing_gradients", "overfitting"],
)
def test_diagnoses_no_schedule_answers_recommend_nothing(kind: str) -> None:
    assert recommend_schedules([diagnosis(kind)], remaining_steps=100, warmup_steps=20) == []


def test_cleared_diagnoses_are_ignored() -> None:
    kinds = ["needs_warmup", "lr_too_high", "lr_too_small", "saddle_point", "gradient_noise"]
    cleared = [diagnosis(kind, cleared=150, sharpness_ratio=0.5) for kind in kinds]
    assert recommend_schedules(cleared, remaining_steps=100, warmup_steps=20) == []
    # A cleared plateau gives no warm restarts, and a cleared cause no longer blocks them.
    assert recommend_schedules([diagnosis("plateau", cleared=150)], remaining_steps=100) == []
    found = recommend_schedules(
        [diagnosis("plateau"), diagnosis("lr_too_high", cleared=120)], remaining_steps=100
    )
    assert [r.schedule for r in found] == ["warm_restarts"]


def test_recommendations_come_in_the_documented_order() -> None:
    shuffled = [
        diagnosis("gradient_noise"),
        diagnosis("saddle_point"),
        diagnosis("lr_too_small", sharpness_ratio=0.01),
        diagnosis("plateau"),
        diagnosis("lr_too_high", sharpness_ratio=1.5),
        diagnosis("needs_warmup"),
    ]
    found = recommend_schedules(shuffled, remaining_steps=500, warmup_steps=100)
    assert [(r.schedule, r.diagnosis) for r in found] == [
        ("warmup", "needs_warmup"),
        ("decay", "lr_too_high"),
        ("one_cycle", "lr_too_small"),
        ("cyclical", "saddle_point"),
        ("cosine", "gradient_noise"),
    ]
    found = recommend_schedules(
        [diagnosis("plateau"), diagnosis("needs_warmup")], remaining_steps=500, warmup_steps=100
    )
    assert [r.schedule for r in found] == ["warmup", "warm_restarts"]
    assert recommend_schedules([], remaining_steps=500, warmup_steps=100) == []


def test_recommendation_is_a_frozen_record() -> None:
    found = only(recommend_schedules([diagnosis("gradient_noise")], remaining_steps=10))
    with pytest.raises(dataclasses.FrozenInstanceError):
        found.schedule = "decay"  # type: ignore[misc]
    assert dataclasses.asdict(found) == {
        "schedule": "cosine",
        "diagnosis": "gradient_noise",
        "reason": found.reason,
        "settings": {"steps": 10},
    }


# ---------------------------------------------------------------------------- build_schedule
GROUP_LRS = (0.1, 0.03)


def make_optimizer(lrs: tuple[float, ...] = GROUP_LRS, momentum: float = 0.9) -> Optimizer:
    torch.manual_seed(0)
    groups = [{"params": [nn.Parameter(torch.randn(3))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=momentum)


def lr_sequence(optimizer: Optimizer, scheduler: Any, count: int) -> list[list[float]]:
    """The learning rates of ``count`` optimizer steps, the scheduler stepped after each one."""
    lrs = []
    for index in range(count):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        if index < count - 1:
            scheduler.step()
    return lrs


Reference = Callable[[Optimizer], Any]

# name, settings, the torch scheduler with the documented arguments, steps to compare
CASES: list[tuple[str, dict[str, Any], Reference, int, tuple[float, ...]]] = [
    (
        "warmup",
        {"steps": 7},
        lambda o: LinearLR(o, start_factor=0.01, end_factor=1.0, total_iters=7),
        12,
        GROUP_LRS,
    ),
    ("decay", {"factor": 0.37}, lambda o: LambdaLR(o, lambda _: 0.37), 6, GROUP_LRS),
    (
        "one_cycle",
        {"peak_factor": 4.0, "steps": 20},
        lambda o: OneCycleLR(
            o, max_lr=[4.0 * lr for lr in GROUP_LRS], total_steps=20, cycle_momentum=False
        ),
        20,
        GROUP_LRS,
    ),
    (
        "cyclical",
        {"max_factor": 3.0, "half_cycle": 4},
        lambda o: CyclicLR(
            o,
            base_lr=list(GROUP_LRS),
            max_lr=[3.0 * lr for lr in GROUP_LRS],
            step_size_up=4,
            cycle_momentum=False,
        ),
        20,
        GROUP_LRS,
    ),
    (
        "cosine",
        {"steps": 9},
        lambda o: CosineAnnealingLR(o, T_max=9, eta_min=0.01 * 0.2),
        14,
        (0.2,),
    ),
    (
        "warm_restarts",
        {"period": 5},
        lambda o: CosineAnnealingWarmRestarts(o, T_0=5),
        17,
        GROUP_LRS,
    ),
]


@pytest.mark.parametrize(
    ("name", "settings", "reference", "count", "lrs"), CASES, ids=[c[0] for c in CASES]
)
def test_build_gives_the_lrs_of_the_torch_scheduler_with_the_documented_arguments(
    name: str, settings: dict[str, Any], reference: Reference, count: int, lrs: tuple[float, ...]
) -> None:
    built_on, reference_on = make_optimizer(lrs), make_optimizer(lrs)
    built = build_schedule(name, built_on, **settings)
    expected = reference(reference_on)
    assert type(built) is type(expected)
    assert built.optimizer is built_on
    actual = lr_sequence(built_on, built, count)
    assert actual == lr_sequence(reference_on, expected, count)
    # The optimizers stay in step too (one_cycle cycles the momentum).
    for mine, theirs in zip(built_on.param_groups, reference_on.param_groups, strict=True):
        assert mine["momentum"] == theirs["momentum"]
        assert torch.equal(mine["params"][0], theirs["params"][0])


def test_built_schedules_start_from_the_current_rates_with_the_documented_shape() -> None:
    """Hand-computed checks, independent of the torch classes: start, bounds, end."""
    lr = 0.2
    seq = lr_sequence(o := make_optimizer((lr,)), build_schedule("warmup", o, steps=4), 6)
    assert seq[0] == [pytest.approx(0.01 * lr)]
    assert seq[4:] == [[pytest.approx(lr)]] * 2
    seq = lr_sequence(o := make_optimizer((lr,)), build_schedule("decay", o, factor=0.25), 5)
    assert seq == [[lr * 0.25]] * 5
    seq = lr_sequence(
        o := make_optimizer((lr,)), build_schedule("cyclical", o, max_factor=3.0, half_cycle=5), 21
    )
    assert seq[0] == [lr]
    assert seq[5] == [pytest.approx(3 * lr)]
    assert seq[10] == [pytest.approx(lr)]
    assert min(s[0] for s in seq) == pytest.approx(lr)
    assert max(s[0] for s in seq) == pytest.approx(3 * lr)
    seq = lr_sequence(o := make_optimizer((lr,)), build_schedule("cosine", o, steps=8), 10)
    assert seq[0] == [lr]
    assert seq[4] == [pytest.approx(0.01 * lr + 0.99 * lr * 0.5 * (1 + math.cos(math.pi / 2)))]
    assert seq[8] == [pytest.approx(0.01 * lr)]
    seq = lr_sequence(o := make_optimizer((lr,)), build_schedule("warm_restarts", o, period=4), 9)
    assert [s[0] for s in seq[::4]] == [lr, lr, lr]
    seq = lr_sequence(
        o := make_optimizer((lr,)), build_schedule("one_cycle", o, peak_factor=5.0, steps=40), 40
    )
    assert max(s[0] for s in seq) == pytest.approx(5 * lr)
    assert seq[-1][0] < lr / 1000


def test_recommendations_build_what_they_describe() -> None:
    """From the diagnosis to the learning rate: lr_too_high at 1.6x the threshold."""
    found = only(
        recommend_schedules([diagnosis("lr_too_high", sharpness_ratio=1.6)], remaining_steps=10)
    )
    optimizer = make_optimizer()
    scheduler = found.build(optimizer)
    assert isinstance(scheduler, LambdaLR)
    factor = 1.0 / max(2.0, 1.5 * 1.6)  # 1 / 2.4
    assert lr_sequence(optimizer, scheduler, 3) == [[lr * factor for lr in GROUP_LRS]] * 3


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("decay", {"factor": 0.5}),
        ("warm_restarts", {"period": 4}),
        ("cyclical", {"max_factor": 3.0, "half_cycle": 2}),
    ],
)
def test_build_starts_from_the_current_rate_after_an_earlier_scheduler(
    name: str, settings: dict[str, Any]
) -> None:
    # An earlier StepLR took the rate from 0.1 to 0.01 (and left initial_lr = 0.1 behind).
    decayed = make_optimizer((0.1,))
    previous = torch.optim.lr_scheduler.StepLR(decayed, step_size=1, gamma=0.1)
    decayed.step()
    previous.step()
    assert decayed.param_groups[0]["lr"] == pytest.approx(0.01)
    fresh = make_optimizer((decayed.param_groups[0]["lr"],))  # same rate, no history
    expected = lr_sequence(fresh, build_schedule(name, fresh, **settings), 8)
    assert lr_sequence(decayed, build_schedule(name, decayed, **settings), 8) == expected


def test_cosine_anneals_every_parameter_group_to_one_percent_of_the_smallest_rate() -> None:
    # CosineAnnealingLR has one eta_min for all groups (documented): 1% of the smallest rate.
    optimizer = make_optimizer((0.1, 0.01))
    seq = lr_sequence(optimizer, build_schedule("cosine", optimizer, steps=6), 7)
    assert seq[-1] == [pytest.approx(0.0001), pytest.approx(0.0001)]


def test_one_cycle_leaves_plain_sgd_without_momentum() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    scheduler = build_schedule("one_cycle", optimizer, peak_factor=10.0, steps=20)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["momentum"] == 0.0


def test_unknown_schedule_is_a_value_error_listing_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"Invalid schedule: 'exponential'") as error:
        build_schedule("exponential", make_optimizer(), gamma=0.9)
    for name in ALL_SCHEDULES:
        assert name in str(error.value)
    optimizer = make_optimizer()
    with pytest.raises(ValueError, match="Invalid schedule"):
        ScheduleRecommendation("step", "plateau", "-", {}).build(optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == list(GROUP_LRS)  # left untouched
