"""Read optdiag's TensorBoard event files back: scalars, the doctor's record, integrity checks.

Events are read with TensorBoard's own loader (``EventFileLoader``, which also upgrades legacy
``simple_value`` scalars). That loader stops quietly at a damaged record, so each file's framing
is walked as well (TFRecord: an 8-byte length, a 4-byte checksum, the data, a 4-byte checksum)
to tell a file that is merely still being written (its last record incomplete) from a corrupt
one. Nothing here imports torch or Lightning.

References:
    TFRecord format: https://www.tensorflow.org/tutorials/load_data/tfrecord
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from lightning_optdiag.report.record import RECORD_TAG, DoctorRecord, decode_record

__all__ = ["PREFIX", "LogdirError", "RunLog", "read_logdir", "read_run"]

PREFIX = "optdiag/"
EVENT_FILE_MARKER = "tfevents"
_HEADER = struct.Struct("<QI")  # the record length and its masked CRC-32C
_FRAMING_BYTES = 8 + 4 + 4  # length, length checksum, data checksum
# torch's SummaryWriter.add_text appends "/text_summary" to the tag.
_RECORD_TAGS = frozenset({RECORD_TAG, f"{RECORD_TAG}/text_summary"})


class LogdirError(ValueError):
    """The log directory cannot be reported on: missing, empty of optdiag data, or corrupt."""


@dataclass
class RunLog:
    """What one run (a directory of event files) recorded.

    Attributes:
        path: the run's directory.
        scalars: ``tag -> [(step, value), ...]`` sorted by step; when a step was logged twice
            (a resumed run writing into the same directory) the later write wins.
        record: the doctor's latest record (``None``: no TrainingDoctor wrote to this run).
        files: the event files read.
        warnings: problems that did not stop the reading (a file whose last record is still
            being written, a record that could not be parsed).
    """

    path: Path
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    record: DoctorRecord | None = None
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def has_optdiag_data(self) -> bool:
        """Whether any optdiag callback wrote to this run."""
        return self.record is not None or any(tag.startswith(PREFIX) for tag in self.scalars)

    @property
    def last_step(self) -> int:
        """The largest step anything was logged at (0 for an empty run)."""
        steps = [series[-1][0] for series in self.scalars.values() if series]
        if self.record is not None:
            steps.append(self.record.step)
        return max(steps, default=0)


def read_logdir(logdir: str | os.PathLike[str], include_empty: bool = False) -> list[RunLog]:
    """Every run under ``logdir`` with optdiag data, sorted by path.

    ``logdir`` may be a run directory itself, a parent of several runs (Lightning's
    ``lightning_logs/version_N``), or a single event file. With ``include_empty``, runs without
    optdiag data are returned too (the error for a directory with no optdiag data at all still
    applies).

    Raises:
        LogdirError: ``logdir`` does not exist, holds no event files or no optdiag data, or an
            event file is corrupt.
    """
    root = Path(logdir)
    if not root.exists():
        raise LogdirError(f"{logdir}: no such file or directory")
    if root.is_file():
        if EVENT_FILE_MARKER not in root.name:
            raise LogdirError(
                f"{logdir}: not a TensorBoard event file (expected a name containing "
                f"{EVENT_FILE_MARKER!r}, or a log directory)"
            )
        groups = {root.parent: [root]}
    else:
        groups = {}
        for path in sorted(root.rglob(f"*{EVENT_FILE_MARKER}*")):
            if path.is_file():
                groups.setdefault(path.parent, []).append(path)
    if not groups:
        raise LogdirError(f"{logdir}: no TensorBoard event files found (events.out.tfevents.*)")
    everything = [read_run(directory, files) for directory, files in sorted(groups.items())]
    runs = [run for run in everything if run.has_optdiag_data]
    if not runs:
        count = sum(len(files) for files in groups.values())
        raise LogdirError(
            f"{logdir}: no optdiag data in {count} event file{'s' if count != 1 else ''} "
            "(attach optdiag's callbacks to the Trainer, with a TensorBoardLogger)"
        )
    return everything if include_empty else runs


def read_run(directory: str | os.PathLike[str], files: list[Path] | None = None) -> RunLog:
    """Read one run's event files (``files``; default: every event file in ``directory``).

    Raises:
        LogdirError: an event file is corrupt.
    """
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    run = RunLog(Path(directory))
    if files is None:
        files = sorted(p for p in run.path.iterdir() if EVENT_FILE_MARKER in p.name)
    run.files = list(files)
    latest: dict[str, dict[int, tuple[float, float]]] = {}  # tag -> step -> (wall time, value)
    records: list[tuple[int, float, str]] = []
    plugins: dict[str, str] = {}  # the plugin is named in a tag's first event only
    for path in run.files:
        count = 0
        for event in EventFileLoader(str(path)).Load():
            count += 1
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name:
                    plugins[value.tag] = value.metadata.plugin_data.plugin_name
                plugin = plugins.get(value.tag)
                if plugin == "scalars":
                    number = float(tensor_util.make_ndarray(value.tensor).item())
                    series = latest.setdefault(value.tag, {})
                    previous = series.get(event.step)
                    if previous is None or event.wall_time >= previous[0]:
                        series[event.step] = (event.wall_time, number)
                elif plugin == "text" and value.tag in _RECORD_TAGS:
                    text = value.tensor.string_val[0].decode("utf-8", errors="replace")
                    records.append((event.step, event.wall_time, text))
        problem = _framing_problem(path, count)
        if problem is not None:
            fatal, message = problem
            if fatal:
                raise LogdirError(f"{path}: {message}")
            run.warnings.append(f"{path.name}: {message}")
    run.scalars = {
        tag: [(step, value) for step, (_, value) in sorted(series.items())]
        for tag, series in sorted(latest.items())
    }
    for step, _, text in sorted(records, key=lambda item: (item[0], item[1]), reverse=True):
        try:
            run.record = decode_record(text)
            break
        except ValueError as error:
            run.warnings.append(f"doctor record at step {step} skipped: {error}")
    return run


def _framing_problem(path: Path, records_read: int) -> tuple[bool, str] | None:
    """Compare the loader's record count with the file's framing.

    Returns ``None`` for an intact file, ``(False, message)`` when only the last record is
    incomplete (a run still writing), ``(True, message)`` when the file is corrupt. Each
    record's length is checked against its own checksum, so a damaged length is told from a
    record that is still being written; the data checksums are the loader's.
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    size = path.stat().st_size
    frames = 0
    offset = 0
    complete = True
    with path.open("rb") as stream:
        while offset < size:
            stream.seek(offset)
            header = stream.read(_HEADER.size)
            if len(header) < _HEADER.size:
                complete = False
                break
            length, checksum = _HEADER.unpack(header)
            if masked_crc32c(header[:8]) != checksum:
                return True, (
                    f"corrupt event file: the length of record {frames + 1} fails its checksum "
                    f"(byte {offset}); {records_read} records before it were read"
                )
            end = offset + _FRAMING_BYTES + length
            if end > size:
                complete = False
                break
            frames += 1
            offset = end
    if records_read < frames:
        return True, (
            f"corrupt event file: record {records_read + 1} of {frames} fails its checksum; "
            f"{records_read} records before it were read"
        )
    if not complete:
        return False, (
            f"the last {size - offset} bytes are an incomplete record (the file is still being "
            f"written, or was cut short); the {records_read} records before it were read"
        )
    return None
