"""The doctor's record: JSON in a Markdown code fence, written as TensorBoard text and read back.

Round trips use real :class:`Diagnosis` objects (non-finite evidence must come back as ``None``,
everything else unchanged); decoding must reject anything that is not such a record with a
``ValueError`` naming the problem, since ``read_run`` turns exactly that into a warning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from lightning_optdiag.diagnosis import Diagnosis
from lightning_optdiag.report.record import RECORD_TAG, DoctorRecord, decode_record, encode_record


def make_diagnosis(kind: str = "plateau", step: int = 40, **changes: Any) -> Diagnosis:
    fields: dict[str, Any] = {
        "kind": kind,
        "step": step,
        "severity": "warning",
        "confidence": 0.875,
        "evidence": {"slope": -1.5e-4, "p_value": 0.03125, "window": 100},
        "message": f"{kind} found",
        "recommendation": "do something",
        "epoch": 2,
        "cleared_step": None,
    }
    fields.update(changes)
    return Diagnosis(**fields)


def fenced(payload: Any) -> str:
    return "```json\n" + json.dumps(payload) + "\n```"


def valid_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "format": 1,
        "step": 10,
        "final": False,
        "stopped": None,
        "diagnoses": [],
        "actions": [],
    }
    payload.update(changes)
    return payload


def test_tag_is_under_the_optdiag_prefix() -> None:
    assert RECORD_TAG == "optdiag/doctor/record"


def test_round_trip_keeps_diagnoses_actions_and_step() -> None:
    plateau = make_diagnosis("plateau", 40, cleared_step=80)
    nonfinite = make_diagnosis(
        "nonfinite",
        95,
        severity="error",
        confidence=0.99,
        evidence={"steps": [93, 94], "count": 2, "detail": "loss is nan at step 93"},
    )
    actions = [
        {
            "kind": "optimizer_switch",
            "step": 100,
            "message": "step 100: Adam -> sgd (lr 0.05): settled",
            "details": {"lr": 0.05, "from_optimizer": "Adam", "epoch": 3},
        }
    ]
    text = encode_record([plateau, nonfinite], actions, step=120, final=True)

    record = decode_record(text)

    assert record == DoctorRecord(
        step=120, final=True, diagnoses=[plateau, nonfinite], actions=actions, stopped=None
    )
    # Decoding builds new objects: nothing is shared with what was encoded.
    assert record.diagnoses[0] is not plateau
    assert record.diagnoses[0].active is False
    assert record.diagnoses[1].active is True


def test_round_trip_of_an_empty_record() -> None:
    record = decode_record(encode_record([], [], step=0))
    assert record == DoctorRecord(step=0, final=False, diagnoses=[], actions=[], stopped=None)


def test_stopped_round_trips() -> None:
    text = encode_record(
        [make_diagnosis()], [], step=24, stopped="NonFiniteError: 10 consecutive steps skipped"
    )
    record = decode_record(text)
    assert record.stopped == "NonFiniteError: 10 consecutive steps skipped"
    assert record.final is False
    assert record.step == 24


def test_non_finite_evidence_becomes_null_and_the_rest_is_unchanged() -> None:
    diagnosis = make_diagnosis(
        evidence={
            "ratio": math.nan,
            "peak": math.inf,
            "floor": -math.inf,
            "history": [1.5, math.nan, 2.5],
            "nested": {"lambda_min": -math.inf, "lambda_max": 12.25},
            "tiny": 1.25e-300,
            "label": "Adam",
        }
    )
    text = encode_record([diagnosis], [], step=50)

    assert "NaN" not in text
    assert "Infinity" not in text
    (decoded,) = decode_record(text).diagnoses
    assert decoded.evidence == {
        "ratio": None,
        "peak": None,
        "floor": None,
        "history": [1.5, None, 2.5],
        "nested": {"lambda_min": None, "lambda_max": 12.25},
        "tiny": 1.25e-300,
        "label": "Adam",
    }
    # Only the evidence is touched.
    assert decoded.kind == diagnosis.kind
    assert decoded.step == diagnosis.step
    assert decoded.confidence == diagnosis.confidence
    assert decoded.message == diagnosis.message
    assert decoded.epoch == diagnosis.epoch
    # The original is left as it was.
    assert math.isnan(diagnosis.evidence["ratio"])


def test_non_json_action_details_are_written_as_strings() -> None:
    text = encode_record([], [{"kind": "schedule_installed", "details": {"path": Path("a/b")}}], 7)
    (action,) = decode_record(text).actions
    assert action == {"kind": "schedule_installed", "details": {"path": str(Path("a/b"))}}


def test_non_finite_numbers_in_actions_do_not_break_encoding() -> None:
    action = {"kind": "optimizer_switch", "step": 5, "message": "m", "details": {"lr": math.nan}}
    text = encode_record([], [action], step=5)
    assert decode_record(text).actions[0]["details"] == {"lr": None}


def test_the_fence_makes_it_a_readable_markdown_code_block() -> None:
    text = encode_record([make_diagnosis()], [], step=40)

    lines = text.split("\n")
    assert lines[0] == "```json"
    assert lines[-1] == "```"
    # The body between the fences is plain JSON a person (or jq) can read.
    body = json.loads("\n".join(lines[1:-1]))
    assert body["format"] == 1
    assert body["step"] == 40
    assert body["diagnoses"][0]["kind"] == "plateau"
    assert body["diagnoses"][0]["message"] == "plateau found"


def test_decode_accepts_unfenced_json_and_surrounding_whitespace() -> None:
    payload = valid_payload(step=33, final=True)
    assert decode_record(json.dumps(payload)).step == 33
    assert decode_record("\n\n  " + fenced(payload) + "\n  \n").final is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid JSON"),
        ("```json\n{not json\n```", "invalid JSON"),
        ("| kind | steps |\n|---|---|", "invalid JSON"),
        (fenced([1, 2, 3]), "expected a JSON object with 'step' and 'diagnoses'"),
        (fenced("a string"), "expected a JSON object"),
        (fenced({"format": 1, "diagnoses": []}), "expected a JSON object"),
        (fenced({"format": 1, "step": 3}), "expected a JSON object"),
        (fenced(valid_payload(format=2)), "unsupported doctor record format 2"),
        (fenced(valid_payload(format="1")), "unsupported doctor record format '1'"),
        (fenced({"step": 3, "diagnoses": []}), "unsupported doctor record format None"),
        (fenced(valid_payload(diagnoses=[{"kind": "bogus"}])), "bad diagnosis"),
        (
            fenced(valid_payload(diagnoses=[{**make_diagnosis().to_dict(), "kind": "bogus"}])),
            "bad diagnosis (Invalid kind: 'bogus'",
        ),
        (
            fenced(valid_payload(diagnoses=[{**make_diagnosis().to_dict(), "confidence": 2.0}])),
            "bad diagnosis",
        ),
        (fenced(valid_payload(diagnoses=[5])), "'diagnoses' must be a list of objects"),
        (fenced(valid_payload(diagnoses=7)), "'diagnoses' must be a list of objects"),
    ],
)
def test_decode_rejects_what_is_not_a_record(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="doctor record") as raised:
        decode_record(text)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "payload",
    [valid_payload(step=None), valid_payload(step=[3]), valid_payload(actions=[5])],
    ids=["step-null", "step-list", "action-int"],
)
def test_decode_raises_value_error_for_malformed_fields(payload: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="doctor record"):
        decode_record(fenced(payload))
