"""Finding validation, the vocabulary, and Diagnosis round trips through JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest

from lightning_optdiag.diagnosis import KINDS, SEVERITIES, Diagnosis, Finding


def make_finding(**overrides: Any) -> Finding:
    fields: dict[str, Any] = {
        "kind": "plateau",
        "severity": "info",
        "confidence": 0.9,
        "evidence": {"window_steps": 200, "relative_change": -0.001},
        "message": "The training loss stopped improving.",
        "recommendation": "Decay the learning rate.",
    }
    fields.update(overrides)
    return Finding(**fields)


# ------------------------------------------------------------------------------ vocabulary
def test_vocabulary_is_fixed_and_described() -> None:
    assert set(KINDS) == {
        "plateau",
        "saddle_point",
        "local_minimum",
        "lr_too_high",
        "lr_too_small",
        "gradient_noise",
        "nonfinite",
        "exploding_gradients",
        "vanishing_gradients",
        "overfitting",
        "model_bias",
        "needs_warmup",
    }
    for kind, meaning in KINDS.items():
        assert kind == kind.lower()
        assert " " not in kind
        assert isinstance(meaning, str)
        assert len(meaning) > 20
    assert SEVERITIES == ("info", "warning", "error")


# --------------------------------------------------------------------------------- Finding
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("severity", SEVERITIES)
def test_every_kind_and_severity_is_accepted(kind: str, severity: str) -> None:
    finding = make_finding(kind=kind, severity=severity)
    assert (finding.kind, finding.severity) == (kind, severity)


@pytest.mark.parametrize("confidence", [0.0, 0.5, 1.0])
def test_confidence_bounds_are_inclusive(confidence: float) -> None:
    assert make_finding(confidence=confidence).confidence == confidence


@pytest.mark.parametrize("kind", ["bogus", "Plateau", "", "saddle point"])
def test_unknown_kind_is_rejected(kind: str) -> None:
    with pytest.raises(ValueError, match=rf"Invalid kind: {kind!r}") as info:
        make_finding(kind=kind)
    assert "plateau" in str(info.value)  # lists what is accepted


@pytest.mark.parametrize("severity", ["fatal", "INFO", "", "critical"])
def test_unknown_severity_is_rejected(severity: str) -> None:
    with pytest.raises(ValueError, match=rf"Invalid severity: {severity!r}") as info:
        make_finding(severity=severity)
    assert "warning" in str(info.value)


@pytest.mark.parametrize("confidence", [-0.01, 1.01, -1.0, 2.0, math.nan, math.inf, -math.inf])
def test_confidence_out_of_range_is_rejected(confidence: float) -> None:
    with pytest.raises(ValueError, match=r"Invalid confidence: ") as info:
        make_finding(confidence=confidence)
    assert str(confidence) in str(info.value)
    assert "[0, 1]" in str(info.value)


def test_finding_is_frozen() -> None:
    finding = make_finding()
    with pytest.raises(dataclasses.FrozenInstanceError):
        finding.kind = "saddle_point"  # type: ignore[misc]


# ------------------------------------------------------------------------------- Diagnosis
def test_from_finding_copies_every_field() -> None:
    finding = make_finding(kind="lr_too_high", severity="warning", confidence=0.75)
    diagnosis = Diagnosis.from_finding(finding, step=123, epoch=4)
    assert diagnosis.kind == "lr_too_high"
    assert diagnosis.severity == "warning"
    assert diagnosis.confidence == 0.75
    assert diagnosis.evidence == finding.evidence
    assert diagnosis.message == finding.message
    assert diagnosis.recommendation == finding.recommendation
    assert (diagnosis.step, diagnosis.epoch, diagnosis.cleared_step) == (123, 4, None)
    assert diagnosis.active


def test_from_finding_defaults_to_epoch_zero() -> None:
    assert Diagnosis.from_finding(make_finding(), step=5).epoch == 0


def test_from_finding_does_not_share_the_evidence_dict() -> None:
    finding = make_finding()
    diagnosis = Diagnosis.from_finding(finding, step=1)
    diagnosis.evidence["extra"] = 1.0
    assert "extra" not in finding.evidence


def test_active_until_cleared() -> None:
    diagnosis = Diagnosis.from_finding(make_finding(), step=10)
    assert diagnosis.active
    diagnosis.cleared_step = 20
    assert not diagnosis.active
    diagnosis.cleared_step = 0  # step 0 is a real step, not "unset"
    assert not diagnosis.active


NONFINITE_EVIDENCE: dict[str, Any] = {
    "ratio": math.inf,
    "negative": -math.inf,
    "missing": math.nan,
    "finite": 1.5,
    "count": 3,
    "name": "layer.0",
    "flag": True,
    "nothing": None,
    "steps": [1, 2, 3],
    "values": [1.0, math.nan, math.inf],
    "pair": (math.nan, 2.0),
}


def test_to_dict_is_strict_json_with_nonfinite_evidence() -> None:
    diagnosis = Diagnosis(
        kind="lr_too_high",
        step=7,
        severity="warning",
        confidence=0.5,
        evidence=dict(NONFINITE_EVIDENCE),
        message="m",
        recommendation="r",
        epoch=1,
        cleared_step=9,
    )
    record = diagnosis.to_dict()
    text = json.dumps(record, allow_nan=False)
    assert json.loads(text) == record
    assert record["evidence"] == {
        "ratio": None,
        "negative": None,
        "missing": None,
        "finite": 1.5,
        "count": 3,
        "name": "layer.0",
        "flag": True,
        "nothing": None,
        "steps": [1, 2, 3],
        "values": [1.0, None, None],
        "pair": [None, 2.0],
    }
    assert {key: value for key, value in record.items() if key != "evidence"} == {
        "kind": "lr_too_high",
        "step": 7,
        "severity": "warning",
        "confidence": 0.5,
        "message": "m",
        "recommendation": "r",
        "epoch": 1,
        "cleared_step": 9,
    }


def test_to_dict_leaves_the_diagnosis_untouched() -> None:
    diagnosis = Diagnosis.from_finding(make_finding(evidence=dict(NONFINITE_EVIDENCE)), step=1)
    diagnosis.to_dict()
    assert diagnosis.evidence["ratio"] == math.inf
    assert math.isnan(diagnosis.evidence["missing"])
    assert diagnosis.evidence["pair"][1] == 2.0


@pytest.mark.parametrize("cleared_step", [None, 0, 250])
def test_from_dict_round_trips(cleared_step: int | None) -> None:
    diagnosis = Diagnosis(
        kind="overfitting",
        step=100,
        severity="warning",
        confidence=0.8,
        evidence={"best_val_loss": 0.7, "epochs_since_best": 3, "steps": [1, 2]},
        message="Validation loss rose.",
        recommendation="Stop early.",
        epoch=5,
        cleared_step=cleared_step,
    )
    restored = Diagnosis.from_dict(json.loads(json.dumps(diagnosis.to_dict(), allow_nan=False)))
    assert restored == diagnosis
    assert restored.active is (cleared_step is None)


def test_from_dict_round_trip_turns_nonfinite_evidence_into_none() -> None:
    diagnosis = Diagnosis.from_finding(make_finding(evidence={"ratio": math.inf, "x": 2.0}), 3)
    restored = Diagnosis.from_dict(diagnosis.to_dict())
    assert restored.evidence == {"ratio": None, "x": 2.0}
    assert dataclasses.replace(restored, evidence=diagnosis.evidence) == diagnosis


def test_from_dict_rejects_unknown_fields() -> None:
    record = Diagnosis.from_finding(make_finding(), step=1).to_dict()
    record["surprise"] = 1
    with pytest.raises(TypeError):
        Diagnosis.from_dict(record)


def test_to_dict_cleans_nested_dict_evidence() -> None:
    diagnosis = Diagnosis.from_finding(
        make_finding(evidence={"per_layer": {"fc1": math.inf, "fc2": 1.0}}), step=1
    )
    record = diagnosis.to_dict()
    json.dumps(record, allow_nan=False)
    assert record["evidence"]["per_layer"] == {"fc1": None, "fc2": 1.0}


def test_span_says_since_when_active_and_from_to_when_cleared() -> None:
    finding = Finding("plateau", "info", 0.5, {}, "m", "r")
    diagnosis = Diagnosis.from_finding(finding, step=10)
    assert diagnosis.span == "since step 10"
    diagnosis.cleared_step = 20
    assert diagnosis.span == "steps 10–20"
