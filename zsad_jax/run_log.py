"""Training metrics: ``metrics.jsonl`` plus TensorBoard event files, written without TensorFlow.

Each ``MetricWriter.write(step, scalars)`` appends one JSON line ``{"step", "time", **scalars}`` to
``DIR/metrics.jsonl`` (non-finite values become ``null``) and one ``Event`` with scalar summaries to
``DIR/events.out.tfevents.<time>.<host>``, so ``tensorboard --logdir DIR`` shows the curves.

The event file is TFRecord framing of ``tensorflow.Event`` protobufs::

    uint64 length | uint32 masked_crc32c(length) | bytes event | uint32 masked_crc32c(event)

with ``Event{double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5}``,
``Summary{repeated Value value = 1}``, ``Value{string tag = 1; float simple_value = 2}``. The
protobuf fields are encoded by hand (a few varints); ``read_events`` parses them back.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from zsad_jax import report

METRICS_FILE = "metrics.jsonl"


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


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = _varint((number << 3) | wire_type)
    if wire_type == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


SESSION_START = 1  # tensorflow.SessionLog.START


def encode_event(
    step: int,
    wall_time: float,
    scalars: Mapping[str, float] | None = None,
    file_version: str | None = None,
    session_start: bool = False,
) -> bytes:
    """A serialised ``Event`` with one ``simple_value`` per scalar; ``session_start`` adds
    ``session_log {status: START}``, on which TensorBoard drops the events of step >= ``step``
    written before it (the lost tail of a killed run)."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(int(step)))
    if file_version is not None:
        out += _field(3, 2, file_version.encode())
    if session_start:
        out += _field(6, 2, _field(1, 0, _varint(SESSION_START)))
    if scalars:
        values = b"".join(
            _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
            for tag, v in scalars.items()
        )
        out += _field(5, 2, values)
    return out


def frame_record(data: bytes) -> bytes:
    """TFRecord framing: length, its masked crc, the data, the data's masked crc."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


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


def _parse_fields(data: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, raw bytes or varint value) of one protobuf message."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            b = data[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 1:
            yield number, wire, data[pos : pos + 8]
            pos += 8
        elif wire == 5:
            yield number, wire, data[pos : pos + 4]
            pos += 4
        elif wire == 2:
            n = varint()
            yield number, wire, data[pos : pos + n]
            pos += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def read_events(path: str | os.PathLike) -> list[dict]:
    """Every event of a file: ``{"step", "wall_time", "scalars": {tag: value}, "file_version"}``."""
    events = []
    for record in read_records(path):
        event = {
            "step": 0,
            "wall_time": 0.0,
            "scalars": {},
            "file_version": None,
            "session_start": False,
        }
        for number, _, raw in _parse_fields(record):
            if number == 1:
                event["wall_time"] = struct.unpack("<d", raw)[0]
            elif number == 2:
                event["step"] = raw - (1 << 64) if raw >= 1 << 63 else raw
            elif number == 3:
                event["file_version"] = raw.decode()
            elif number == 6:
                event["session_start"] = (
                    dict((n, r) for n, _, r in _parse_fields(raw)).get(1) == SESSION_START
                )
            elif number == 5:
                for _, _, value in _parse_fields(raw):
                    fields = {n: r for n, _, r in _parse_fields(value)}
                    if 1 in fields and 2 in fields:
                        event["scalars"][fields[1].decode()] = struct.unpack("<f", fields[2])[0]
        events.append(event)
    return events


class EventFileWriter:
    """Appends scalar events to a new ``events.out.tfevents.*`` file in ``logdir``."""

    def __init__(self, logdir: str | os.PathLike, *, resume_step: int = 0):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = logdir / name
        self._file = open(self.path, "ab")  # noqa: SIM115  (closed in close())
        self._file.write(frame_record(encode_event(0, time.time(), file_version="brain.Event:2")))
        if resume_step:
            start = encode_event(resume_step + 1, time.time(), session_start=True)
            self._file.write(frame_record(start))
        self._file.flush()

    def add_scalars(self, step: int, scalars: Mapping[str, float], wall_time: float | None = None):
        event = encode_event(step, time.time() if wall_time is None else wall_time, scalars)
        self._file.write(frame_record(event))

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
