"""Training metrics: ``metrics.jsonl`` plus TensorBoard event files, written without TensorFlow.

Each ``MetricWriter.write(step, scalars)`` appends one JSON line ``{"step", "time", **scalars}`` to
``DIR/metrics.jsonl`` (non-finite values become ``null``) and one ``Event`` with scalar summaries to
``DIR/events.out.tfevents.<time>.<host>.<pid>``, so ``tensorboard --logdir DIR`` shows the curves.

An event file is a TFRecord file of ``tensorflow.Event`` protobufs. ``protobuf`` encodes the
messages from the few fields declared in ``_EVENT_FIELDS`` (numbers as in TensorFlow's
``event.proto`` / ``summary.proto``); only the TFRecord framing and its CRC-32C are written here.
Not tensorboardX, which does the same: importing it imports torch whenever torch is installed (the
``convert`` extra: 1.3 s, and torch's libraries inside the JAX process), its writer queues events
in a thread (a flushed row may not be on disk yet), and it names files to the second (a second
writer opened in that second overwrites the first one's file).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from zsad_jax import report

METRICS_FILE = "metrics.jsonl"
SESSION_START = 1  # tensorflow.SessionLog.START

_PACKAGE = "zsad_jax.tensorboard"
_F = descriptor_pb2.FieldDescriptorProto
# message -> (field, number, type, message type or None, repeated, in the ``what`` oneof)
_EVENT_FIELDS = {
    "SummaryValue": [
        ("tag", 1, _F.TYPE_STRING, None, False, False),
        ("simple_value", 2, _F.TYPE_FLOAT, None, False, False),
    ],
    "Summary": [("value", 1, _F.TYPE_MESSAGE, "SummaryValue", True, False)],
    "SessionLog": [("status", 1, _F.TYPE_ENUM, "SessionStatus", False, False)],
    "Event": [
        ("wall_time", 1, _F.TYPE_DOUBLE, None, False, False),
        ("step", 2, _F.TYPE_INT64, None, False, False),
        ("file_version", 3, _F.TYPE_STRING, None, False, True),
        ("summary", 5, _F.TYPE_MESSAGE, "Summary", False, True),
        ("session_log", 7, _F.TYPE_MESSAGE, "SessionLog", False, True),
    ],
}


def _event_class():
    """The ``Event`` message class, built in a private descriptor pool (no clash with a
    TensorFlow or TensorBoard imported in the same process)."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="zsad_jax_tensorboard_event.proto", package=_PACKAGE, syntax="proto3"
    )
    status = proto.enum_type.add(name="SessionStatus")
    for name, number in (("STATUS_UNSPECIFIED", 0), ("START", SESSION_START)):
        status.value.add(name=name, number=number)
    for message, fields in _EVENT_FIELDS.items():
        declared = proto.message_type.add(name=message)
        if any(in_oneof for *_, in_oneof in fields):
            declared.oneof_decl.add(name="what")
        for name, number, kind, type_name, repeated, in_oneof in fields:
            field = declared.field.add(
                name=name,
                number=number,
                type=kind,
                label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL,
            )
            if type_name:
                field.type_name = f".{_PACKAGE}.{type_name}"
            if in_oneof:
                field.oneof_index = 0
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Event"))


Event = _event_class()


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The TFRecord checksum: crc32c rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """TFRecord framing: uint64 length, its masked crc, the data, the data's masked crc."""
    length = struct.pack("<Q", len(data))
    checks = struct.pack("<I", masked_crc32c(length)), struct.pack("<I", masked_crc32c(data))
    return length + checks[0] + data + checks[1]


def read_records(path: str | os.PathLike) -> Iterator[bytes]:
    """The payloads of a TFRecord file; a bad checksum raises ``ValueError`` naming the file."""
    data = Path(path).read_bytes()
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        (length,) = struct.unpack_from("<Q", data, pos)
        (length_crc,) = struct.unpack_from("<I", data, pos + 8)
        if masked_crc32c(data[pos : pos + 8]) != length_crc:
            raise ValueError(f"{path}: bad length checksum at byte {pos}")
        payload = data[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
        if len(payload) != length or masked_crc32c(payload) != payload_crc:
            raise ValueError(f"{path}: bad record checksum at byte {pos}")
        yield payload
        pos += 16 + length


def read_events(path: str | os.PathLike) -> list[dict]:
    """Every event of a file: ``{"step", "wall_time", "scalars": {tag: value}, "file_version",
    "session_start"}``."""
    events = []
    for record in read_records(path):
        event = Event.FromString(record)
        events.append(
            {
                "step": event.step,
                "wall_time": event.wall_time,
                "scalars": {v.tag: v.simple_value for v in event.summary.value},
                "file_version": event.file_version or None,
                "session_start": event.session_log.status == SESSION_START,
            }
        )
    return events


class EventFileWriter:
    """Appends scalar events to a new ``events.out.tfevents.*`` file in ``logdir``."""

    def __init__(self, logdir: str | os.PathLike, *, resume_step: int = 0):
        """``resume_step``: a ``SessionLog START`` at ``resume_step + 1`` follows the header, on
        which TensorBoard drops the events of those steps written before (a killed run's lost
        tail)."""
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = logdir / name
        self._file = open(self.path, "ab")  # noqa: SIM115  (closed in close())
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if resume_step:
            start = Event(wall_time=time.time(), step=resume_step + 1)
            start.session_log.status = SESSION_START
            self._write(start)
        self._file.flush()

    def _write(self, event) -> None:
        self._file.write(frame_record(event.SerializeToString()))

    def add_scalars(self, step: int, scalars: Mapping[str, float], wall_time: float | None = None):
        event = Event(wall_time=time.time() if wall_time is None else wall_time, step=int(step))
        for tag, value in scalars.items():
            event.summary.value.add(tag=tag, simple_value=float(value))
        self._write(event)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class MetricWriter:
    """``metrics.jsonl`` + TensorBoard events in ``workdir``; a no-op where ``active`` is False
    (every process but the first in a multi-host run)."""

    def __init__(self, workdir: str | os.PathLike, *, active: bool = True, resume_step: int = 0):
        """``resume_step``: the step a resumed run restarts from; rows written after it (by the
        part of a killed run whose checkpoint was lost) are dropped, so each step has one row."""
        self.active = active
        self.workdir = Path(workdir)
        if not active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.workdir / METRICS_FILE, resume_step)
        self._jsonl = open(self.workdir / METRICS_FILE, "a")  # noqa: SIM115
        self._events = EventFileWriter(self.workdir, resume_step=resume_step)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        now = time.time()
        line = {"step": int(step), "time": round(now, 3)}
        line.update(report.json_ready({k: float(v) for k, v in scalars.items()}))
        self._jsonl.write(json.dumps(line) + "\n")
        self._events.add_scalars(step, {k: float(v) for k, v in scalars.items()}, now)
        # Rows are rare (every log_every_steps) and a preempted or crashed run should keep them.
        self.flush()

    def flush(self) -> None:
        if self.active:
            self._jsonl.flush()
            self._events.flush()

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._events.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keeps the rows of ``path`` with ``step <= step`` (atomically: a new file renamed over it);
    a torn last line of a killed writer is dropped too."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if int(row.get("step", 0)) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        report.write_atomic(path, "".join(line + "\n" for line in kept))


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The lines of ``workdir/metrics.jsonl``."""
    path = Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
