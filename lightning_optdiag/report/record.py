"""The doctor's record in the event files: what ``optdiag report`` reads back.

TrainingDoctor writes the Markdown table ``optdiag/diagnoses`` for people and, next to it, this
record for programs: the diagnoses, the actions and the step, as JSON in a fenced code block
(so TensorBoard's text tab still shows it readably). Standard library only, so that reading logs
back never imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_optdiag.diagnosis.records import Diagnosis, _json_value

__all__ = ["RECORD_TAG", "DoctorRecord", "decode_record", "encode_record"]

RECORD_TAG = "optdiag/doctor/record"
"""The TensorBoard text tag of the record."""

FORMAT = 1
_FENCE_OPEN = "```json\n"
_FENCE_CLOSE = "\n```"


@dataclass
class DoctorRecord:
    """The doctor's state at one step, as written to and read from the event files.

    Attributes:
        step: the optimizer step it was written at.
        final: written at the end of ``fit`` (the doctor's last word on the run).
        diagnoses: every diagnosis so far, active and cleared.
        actions: what was done about the run (optimizer switches, schedules installed), each a
            dict with ``kind``, ``step``, ``message`` and ``details``.
        stopped: the exception that ended ``fit``, as ``"Type: message"`` (``None``: none).
    """

    step: int
    final: bool = False
    diagnoses: list[Diagnosis] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None


def encode_record(
    diagnoses: Sequence[Diagnosis],
    actions: Sequence[Mapping[str, Any]],
    step: int,
    final: bool = False,
    stopped: str | None = None,
) -> str:
    """The record as the text written under :data:`RECORD_TAG`."""
    payload = {
        "format": FORMAT,
        "step": step,
        "final": final,
        "stopped": stopped,
        "diagnoses": [diagnosis.to_dict() for diagnosis in diagnoses],
        # Non-finite numbers become null, as in the diagnoses' evidence: strict JSON.
        "actions": [_json_value(dict(action)) for action in actions],
    }
    return _FENCE_OPEN + json.dumps(payload, allow_nan=False, default=str) + _FENCE_CLOSE


def decode_record(text: str) -> DoctorRecord:
    """Parse a record written by :func:`encode_record`.

    Raises:
        ValueError: ``text`` is not such a record (names what is wrong with it).
    """
    body = text.strip()
    if body.startswith(_FENCE_OPEN.strip()) and body.endswith(_FENCE_CLOSE.strip()):
        body = body[len(_FENCE_OPEN.strip()) : -len(_FENCE_CLOSE.strip())]
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as error:
        raise ValueError(f"not a doctor record: invalid JSON ({error})") from None
    if not isinstance(payload, dict) or "diagnoses" not in payload or "step" not in payload:
        raise ValueError("not a doctor record: expected a JSON object with 'step' and 'diagnoses'")
    version = payload.get("format")
    if version != FORMAT:
        raise ValueError(
            f"unsupported doctor record format {version!r} (this version reads format {FORMAT})"
        )
    step = payload["step"]
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"not a doctor record: 'step' must be a whole number, got {step!r}")
    items, actions = payload["diagnoses"], payload.get("actions", [])
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ValueError("not a doctor record: 'diagnoses' must be a list of objects")
    if not isinstance(actions, list) or not all(isinstance(action, dict) for action in actions):
        raise ValueError("not a doctor record: 'actions' must be a list of objects")
    try:
        diagnoses = [Diagnosis.from_dict(item) for item in items]
    except (TypeError, ValueError) as error:
        raise ValueError(f"not a doctor record: bad diagnosis ({error})") from None
    stopped = payload.get("stopped")
    return DoctorRecord(
        step=step,
        final=bool(payload.get("final", False)),
        diagnoses=diagnoses,
        actions=[dict(action) for action in actions],
        stopped=None if stopped is None else str(stopped),
    )
