"""Read a W&B offline run (``run-<id>.wandb``) back, without W&B's service.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB
blocks of frames (CRC-32, 2-byte length, type: whole, first, middle or last piece of a
record; a block's tail too short for a frame header is padding). Each record is a
``wandb_internal_pb2.Record``; its ``history`` rows are the logged steps, ``config`` and
``summary`` the updates of those."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto.wandb_internal_pb2 import Record

BLOCK = 32768
FRAME = 7  # crc (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pos, parts = [], 7, b""
    while pos + FRAME <= len(data):
        space = BLOCK - pos % BLOCK
        if space < FRAME:
            pos += space
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0:  # zeros: the rest of the block is padding
            pos += space
            continue
        piece = data[pos + FRAME:pos + FRAME + length]
        pos += FRAME + length
        parts = piece if kind in (FULL, FIRST) else parts + piece
        if kind in (FULL, LAST):
            out.append(Record.FromString(parts))
    return out


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def run_data(path: Path) -> dict[str, Any]:
    """``{"history": [row, ...], "config": {...}, "summary": {...}}`` of one run file, with
    the values decoded from their JSON."""
    history, config, summary = [], {}, {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":
            config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
    return {"history": history, "config": config, "summary": summary}
