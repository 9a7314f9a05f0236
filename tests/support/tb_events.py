"""Read TensorBoard event files back, as TensorBoard would show them, without TensorBoard.

An event file is a sequence of TFRecord frames (8-byte length, 4-byte CRC of it, the data, a
4-byte CRC of the data), each an ``Event`` protobuf. Files are read in name order (their names
start with the time they were opened); a ``SessionLog.START`` at step T (a writer's
``purge_step``, as after a resume) hides what earlier files logged at steps >= T."""

from __future__ import annotations

import struct
from pathlib import Path

from tensorboardX.proto.event_pb2 import Event, SessionLog


def events(path: Path) -> list[Event]:
    """Every event of one file, in order."""
    data, out, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        at += 12  # the length and its CRC
        out.append(Event.FromString(data[at:at + length]))
        at += length + 4  # the data and its CRC
    assert at == len(data), f"{path}: a truncated frame"
    return out


def scalars(folder: str | Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of every scalar under ``folder``, purged steps dropped."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(Path(folder).rglob("events.out.tfevents.*"), key=lambda p: p.name):
        for event in events(path):
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                for steps in out.values():
                    for step in [s for s in steps if s >= event.step]:
                        del steps[step]
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def texts(folder: str | Path) -> dict[str, list[str]]:
    """``{tag: [text, ...]}`` of the text summaries under ``folder``, in order."""
    out: dict[str, list[str]] = {}
    for path in sorted(Path(folder).rglob("events.out.tfevents.*"), key=lambda p: p.name):
        for event in events(path):
            for value in event.summary.value:
                if value.HasField("tensor") and value.tensor.string_val:
                    out.setdefault(value.tag, []).append(
                        value.tensor.string_val[0].decode())
    return out
