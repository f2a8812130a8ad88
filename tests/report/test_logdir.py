"""Reading event files back: scalars, runs, the doctor's record and damaged files.

Every event file is written here with torch's ``SummaryWriter`` (scalars with explicit wall
times, the record as text, histogram and text noise), so the values ``read_logdir`` must return
are known exactly; they are float32-representable, as TensorBoard stores scalars in float32.
Damage is done by walking the TFRecord framing independently (8-byte length, 4-byte length
checksum, data, 4-byte data checksum) and flipping or cutting bytes.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_optdiag.diagnosis import Diagnosis
from lightning_optdiag.report.logdir import LogdirError, RunLog, read_logdir, read_run
from lightning_optdiag.report.record import RECORD_TAG, encode_record

Points = Sequence[tuple[int, float]]


@contextmanager
def event_file(path: Path) -> Iterator[SummaryWriter]:
    """A SummaryWriter whose one event file ends up exactly at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        writer = SummaryWriter(scratch)
        try:
            yield writer
        finally:
            writer.close()
        (written,) = Path(scratch).glob("*tfevents*")
        shutil.move(str(written), path)


def write_scalars(
    path: Path,
    scalars: Mapping[str, Points],
    walltime: float = 1000.0,
    noise: bool = True,
    new_style: bool = False,
) -> Path:
    """Each point at wall time ``walltime + step``; with ``noise``, histograms and unrelated
    text in between, which must not show up as scalars or records."""
    rng = np.random.default_rng(0)
    with event_file(path) as writer:
        for tag, points in scalars.items():
            for step, value in points:
                writer.add_scalar(tag, value, step, walltime=walltime + step, new_style=new_style)
                if noise:
                    writer.add_histogram(
                        "optdiag/weights/net.0", rng.normal(size=64), step, walltime=walltime
                    )
                    writer.add_text("optdiag/diagnoses", "| kind | steps |", step)
    return path


def record_text(step: int, kinds: Sequence[str] = (), final: bool = False) -> str:
    diagnoses = [
        Diagnosis(
            kind=kind,
            step=step,
            severity="warning",
            confidence=0.5,
            evidence={"x": 1.0},
            message=f"{kind} at {step}",
            recommendation="r",
        )
        for kind in kinds
    ]
    return encode_record(diagnoses, [], step, final=final)


def frames(data: bytes) -> list[tuple[int, int]]:
    """``(offset, data length)`` of each TFRecord in ``data``."""
    found = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        found.append((offset, length))
        offset += 8 + 4 + length + 4
    assert offset == len(data)
    return found


def only(runs: list[RunLog]) -> RunLog:
    assert len(runs) == 1
    return runs[0]


# ------------------------------------------------------------------------------------ scalars
@pytest.mark.parametrize("new_style", [False, True], ids=["simple_value", "tensor"])
def test_scalars_come_back_exactly_sorted_by_step_and_tag(tmp_path: Path, new_style: bool) -> None:
    path = write_scalars(
        tmp_path / "run" / "events.out.tfevents.1",
        {
            "optdiag/loss/train": [(30, 0.25), (10, 1.5), (20, -0.75), (0, 1024.0)],
            "optdiag/grad_norm/total": [(5, 2.0**-20), (15, 3.0e8)],
            "train_loss": [(1, 0.5)],
        },
        new_style=new_style,
    )

    run = only(read_logdir(tmp_path))

    assert run.path == tmp_path / "run"
    assert run.files == [path]
    assert run.warnings == []
    assert run.record is None
    assert run.scalars == {
        "optdiag/grad_norm/total": [(5, 2.0**-20), (15, 3.0e8)],
        "optdiag/loss/train": [(0, 1024.0), (10, 1.5), (20, -0.75), (30, 0.25)],
        "train_loss": [(1, 0.5)],
    }
    assert list(run.scalars) == sorted(run.scalars)  # tags sorted too
    assert all(isinstance(step, int) for points in run.scalars.values() for step, _ in points)
    assert run.has_optdiag_data
    assert run.last_step == 30


def test_run_directory_and_parent_give_the_same_run(tmp_path: Path) -> None:
    write_scalars(
        tmp_path / "lightning_logs" / "version_0" / "events.out.tfevents.1",
        {"optdiag/x": [(0, 1.0), (1, 2.0)]},
    )
    from_parent = only(read_logdir(tmp_path))
    from_run = only(read_logdir(tmp_path / "lightning_logs" / "version_0"))
    assert from_parent.path == from_run.path == tmp_path / "lightning_logs" / "version_0"
    assert from_parent.scalars == from_run.scalars == {"optdiag/x": [(0, 1.0), (1, 2.0)]}


def test_a_step_logged_twice_in_one_file_keeps_the_later_wall_time(tmp_path: Path) -> None:
    path = tmp_path / "run" / "events.out.tfevents.1"
    with event_file(path) as writer:
        writer.add_scalar("optdiag/a", 1.0, 5, walltime=100.0)
        writer.add_scalar("optdiag/a", 2.0, 5, walltime=100.0)  # same time: the later event
        writer.add_scalar("optdiag/b", 3.0, 5, walltime=200.0)
        writer.add_scalar("optdiag/b", 4.0, 5, walltime=150.0)  # written later, but older
    run = only(read_logdir(path.parent))
    assert run.scalars == {"optdiag/a": [(5, 2.0)], "optdiag/b": [(5, 3.0)]}


def test_several_runs_under_one_parent_sorted_by_path(tmp_path: Path) -> None:
    write_scalars(tmp_path / "b" / "version_0" / "events.out.tfevents.1", {"optdiag/x": [(0, 1.0)]})
    write_scalars(tmp_path / "a" / "events.out.tfevents.1", {"optdiag/y": [(0, 2.0), (4, 3.0)]})
    write_scalars(tmp_path / "a" / "sub" / "events.out.tfevents.1", {"optdiag/z": [(7, 4.0)]})
    # No optdiag data: left out, not an error while other runs have some.
    write_scalars(tmp_path / "c" / "events.out.tfevents.1", {"train_loss": [(0, 5.0)]})
    (tmp_path / "a" / "notes.txt").write_text("not an event file")

    runs = read_logdir(tmp_path)

    assert [run.path for run in runs] == [
        tmp_path / "a",
        tmp_path / "a" / "sub",
        tmp_path / "b" / "version_0",
    ]
    assert [run.scalars for run in runs] == [
        {"optdiag/y": [(0, 2.0), (4, 3.0)]},
        {"optdiag/z": [(7, 4.0)]},
        {"optdiag/x": [(0, 1.0)]},
    ]
    assert [run.files for run in runs] == [
        [tmp_path / "a" / "events.out.tfevents.1"],
        [tmp_path / "a" / "sub" / "events.out.tfevents.1"],
        [tmp_path / "b" / "version_0" / "events.out.tfevents.1"],
    ]


def test_a_single_file_path_reads_only_that_file(tmp_path: Path) -> None:
    first = write_scalars(tmp_path / "run" / "events.out.tfevents.1", {"optdiag/x": [(0, 1.0)]})
    write_scalars(tmp_path / "run" / "events.out.tfevents.2", {"optdiag/x": [(1, 9.0)]})

    run = only(read_logdir(first))

    assert run.path == tmp_path / "run"
    assert run.files == [first]
    assert run.scalars == {"optdiag/x": [(0, 1.0)]}
    # The whole directory reads both.
    assert only(read_logdir(tmp_path / "run")).scalars == {"optdiag/x": [(0, 1.0), (1, 9.0)]}


@pytest.mark.parametrize(
    ("original", "resumed"),
    [
        ("events.out.tfevents.1000.host.1.0", "events.out.tfevents.5000.host.2.0"),
        # The wall times decide, not the order of the file names.
        ("events.out.tfevents.9", "events.out.tfevents.0"),
    ],
)
def test_a_resumed_run_keeps_the_later_write_of_each_step(
    tmp_path: Path, original: str, resumed: str
) -> None:
    run_dir = tmp_path / "version_0"
    first = write_scalars(
        run_dir / original,
        {"optdiag/loss/train": [(0, 4.0), (10, 3.0), (20, 2.0)], "optdiag/only_first": [(0, 1.0)]},
        walltime=1000.0,
    )
    second = write_scalars(
        run_dir / resumed,
        {"optdiag/loss/train": [(10, 3.5), (20, 2.5), (30, 1.5)]},
        walltime=5000.0,
    )

    run = only(read_logdir(tmp_path))

    assert run.scalars == {
        "optdiag/loss/train": [(0, 4.0), (10, 3.5), (20, 2.5), (30, 1.5)],
        "optdiag/only_first": [(0, 1.0)],
    }
    assert sorted(run.files) == sorted([first, second])
    assert run.last_step == 30
    assert run.warnings == []


# ------------------------------------------------------------------------------------- record
def test_the_record_with_the_latest_step_wins(tmp_path: Path) -> None:
    path = tmp_path / "run" / "events.out.tfevents.1"
    with event_file(path) as writer:
        writer.add_scalar("optdiag/loss/train", 1.0, 0, walltime=1000.0)
        writer.add_text(RECORD_TAG, record_text(20, ["plateau"]), 20, walltime=1020.0)
        writer.add_text(
            RECORD_TAG, record_text(60, ["plateau", "overfitting"]), 60, walltime=1060.0
        )
        # Written last, but for an earlier step.
        writer.add_text(RECORD_TAG, record_text(40, ["nonfinite"]), 40, walltime=1070.0)

    run = only(read_logdir(path))

    assert run.record is not None
    assert run.record.step == 60
    assert [d.kind for d in run.record.diagnoses] == ["plateau", "overfitting"]
    assert run.warnings == []
    assert run.last_step == 60  # the record's step counts, beyond the last scalar


def test_on_the_same_step_the_later_record_wins(tmp_path: Path) -> None:
    path = tmp_path / "run" / "events.out.tfevents.1"
    with event_file(path) as writer:
        writer.add_text(RECORD_TAG, record_text(50, ["plateau"], final=True), 50, walltime=2000.0)
        writer.add_text(RECORD_TAG, record_text(50, ["saddle_point"]), 50, walltime=1000.0)
    run = only(read_logdir(path))
    assert run.record is not None
    assert [d.kind for d in run.record.diagnoses] == ["plateau"]
    assert run.record.final is True


def test_the_resumed_files_record_wins(tmp_path: Path) -> None:
    with event_file(tmp_path / "run" / "events.out.tfevents.1") as writer:
        writer.add_text(RECORD_TAG, record_text(100, ["plateau"], final=True), 100, walltime=1.0)
    with event_file(tmp_path / "run" / "events.out.tfevents.2") as writer:
        writer.add_text(
            RECORD_TAG, record_text(150, ["overfitting"], final=True), 150, walltime=9.0
        )
    run = only(read_logdir(tmp_path))
    assert run.record is not None
    assert run.record.step == 150
    assert [d.kind for d in run.record.diagnoses] == ["overfitting"]


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("```json\n{broken\n```", "invalid JSON"),
        ('{"format": 2, "step": 80, "diagnoses": []}', "unsupported doctor record format 2"),
    ],
)
def test_a_malformed_record_is_a_warning_and_the_previous_one_is_used(
    tmp_path: Path, bad: str, problem: str
) -> None:
    path = tmp_path / "run" / "events.out.tfevents.1"
    with event_file(path) as writer:
        writer.add_scalar("optdiag/loss/train", 1.0, 0, walltime=1000.0)
        writer.add_text(RECORD_TAG, record_text(60, ["plateau"]), 60, walltime=1060.0)
        writer.add_text(RECORD_TAG, bad, 80, walltime=1080.0)

    run = only(read_logdir(path))

    assert run.record is not None
    assert run.record.step == 60
    assert [d.kind for d in run.record.diagnoses] == ["plateau"]
    (warning,) = run.warnings
    assert warning.startswith("doctor record at step 80 skipped: ")
    assert problem in warning


def test_only_malformed_records_leave_no_record(tmp_path: Path) -> None:
    path = tmp_path / "run" / "events.out.tfevents.1"
    with event_file(path) as writer:
        writer.add_scalar("optdiag/loss/train", 1.0, 0, walltime=1000.0)
        writer.add_text(RECORD_TAG, "not json", 10, walltime=1010.0)
        writer.add_text(RECORD_TAG, "[]", 20, walltime=1020.0)
    run = only(read_logdir(path))
    assert run.record is None
    assert [w.split(":")[0] for w in run.warnings] == [
        "doctor record at step 20 skipped",
        "doctor record at step 10 skipped",
    ]


def test_record_json_under_another_text_tag_is_not_the_record(tmp_path: Path) -> None:
    path = tmp_path / "run" / "events.out.tfevents.1"
    with event_file(path) as writer:
        writer.add_scalar("optdiag/loss/train", 1.0, 0, walltime=1000.0)
        writer.add_text("optdiag/diagnoses", record_text(10, ["plateau"]), 10, walltime=1010.0)
    run = only(read_logdir(path))
    assert run.record is None
    assert run.warnings == []


def test_a_record_alone_is_optdiag_data(tmp_path: Path) -> None:
    path = tmp_path / "run" / "events.out.tfevents.1"
    with event_file(path) as writer:
        writer.add_scalar("train_loss", 1.0, 0, walltime=1000.0)
        writer.add_text(RECORD_TAG, record_text(10, final=True), 10, walltime=1010.0)
    run = only(read_logdir(path))
    assert run.has_optdiag_data
    assert run.record is not None
    assert run.record.diagnoses == []


def test_read_run_defaults_to_every_event_file_of_the_directory(tmp_path: Path) -> None:
    write_scalars(tmp_path / "events.out.tfevents.1", {"optdiag/x": [(0, 1.0)]})
    write_scalars(tmp_path / "events.out.tfevents.2", {"optdiag/x": [(1, 2.0)]})
    (tmp_path / "other.txt").write_text("x")
    run = read_run(tmp_path)
    assert run.files == [tmp_path / "events.out.tfevents.1", tmp_path / "events.out.tfevents.2"]
    assert run.scalars == {"optdiag/x": [(0, 1.0), (1, 2.0)]}


# --------------------------------------------------------------------------------- corruption
@pytest.fixture
def intact(tmp_path: Path) -> Path:
    """One tag, steps 0..9, no noise: the file's last record is step 9."""
    return write_scalars(
        tmp_path / "run" / "events.out.tfevents.1",
        {"optdiag/x": [(step, float(step)) for step in range(10)]},
        noise=False,
    )


def test_a_file_of_garbage_bytes_is_an_error_naming_it(tmp_path: Path) -> None:
    write_scalars(tmp_path / "good" / "events.out.tfevents.1", {"optdiag/x": [(0, 1.0)]})
    garbage = tmp_path / "bad" / "events.out.tfevents.1"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not an event file, just bytes \x00\xff" * 8)

    with pytest.raises(LogdirError, match="corrupt") as raised:
        read_logdir(tmp_path)
    assert str(garbage) in str(raised.value)


def test_a_flipped_byte_in_a_middle_record_is_a_checksum_error(intact: Path) -> None:
    data = bytearray(intact.read_bytes())
    found = frames(bytes(data))
    assert len(found) == 11  # the file-version event and ten scalars
    offset, length = found[5]
    data[offset + 12 + length // 2] ^= 0xFF
    intact.write_bytes(bytes(data))

    with pytest.raises(LogdirError) as raised:
        read_logdir(intact.parent)
    message = str(raised.value)
    assert str(intact) in message
    assert "corrupt" in message
    assert "checksum" in message


def test_a_corrupted_length_in_a_middle_record_is_an_error(intact: Path) -> None:
    data = bytearray(intact.read_bytes())
    offset, _ = frames(bytes(data))[5]
    data[offset + 7] ^= 0x01  # the length's most significant byte: now far beyond the file
    intact.write_bytes(bytes(data))

    with pytest.raises(LogdirError, match="corrupt"):
        read_logdir(intact.parent)


@pytest.mark.parametrize("cut", [1, 3, 10, 30])
def test_a_cut_off_last_record_is_a_warning_and_the_rest_is_read(intact: Path, cut: int) -> None:
    data = intact.read_bytes()
    assert frames(data)[-1][1] + 16 > cut  # the cut stays inside the last record
    intact.write_bytes(data[:-cut])

    run = only(read_logdir(intact.parent))

    assert run.scalars == {"optdiag/x": [(step, float(step)) for step in range(9)]}
    (warning,) = run.warnings
    assert warning.startswith(f"{intact.name}: ")
    assert "incomplete" in warning
    assert f"last {frames(data)[-1][1] + 16 - cut} bytes" in warning


def test_a_file_cut_at_a_record_boundary_is_simply_shorter(intact: Path) -> None:
    data = intact.read_bytes()
    offset, _ = frames(data)[-1]
    intact.write_bytes(data[:offset])
    run = only(read_logdir(intact.parent))
    assert run.scalars == {"optdiag/x": [(step, float(step)) for step in range(9)]}
    assert run.warnings == []


def test_a_missing_path_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(LogdirError, match="no such file or directory") as raised:
        read_logdir(missing)
    assert str(missing) in str(raised.value)


def test_an_empty_directory_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(LogdirError, match="no TensorBoard event files") as raised:
        read_logdir(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(raised.value)


def test_only_non_optdiag_scalars_is_an_error_naming_the_path(tmp_path: Path) -> None:
    write_scalars(tmp_path / "v0" / "events.out.tfevents.1", {"train_loss": [(0, 1.0)]})
    write_scalars(tmp_path / "v1" / "events.out.tfevents.1", {"val_loss": [(0, 1.0)]})
    with pytest.raises(LogdirError, match="no optdiag data in 2 event files") as raised:
        read_logdir(tmp_path)
    assert str(tmp_path) in str(raised.value)


def test_a_file_that_is_not_an_event_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss\n0,1.0\n")
    with pytest.raises(LogdirError, match="not a TensorBoard event file") as raised:
        read_logdir(path)
    assert str(path) in str(raised.value)


def test_a_record_with_a_null_step_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "run" / "events.out.tfevents.1"
    with event_file(path) as writer:
        writer.add_scalar("optdiag/loss/train", 1.0, 0, walltime=1000.0)
        writer.add_text(RECORD_TAG, record_text(60, ["plateau"]), 60, walltime=1060.0)
        bad = '{"format": 1, "step": null, "diagnoses": []}'
        writer.add_text(RECORD_TAG, bad, 80, walltime=1080.0)

    run = only(read_logdir(path))

    assert run.record is not None
    assert run.record.step == 60
    assert len(run.warnings) == 1
