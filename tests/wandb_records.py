"""Read a W&B offline run file (``run-*.wandb``) in tests.

The file is a LevelDB-style log (a 7-byte W&B header, then 32 KiB blocks of
chunks with a 7-byte header: crc32c, length, type) whose records are
``wandb_internal_pb2.Record`` messages. wandb 0.31 no longer ships a Python
reader, so tests read it with these few lines and wandb's own protobufs.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec


def logged_values(path: Path) -> dict[str, object]:
    """Every key logged to history or summary, with its last value."""
    out: dict[str, object] = {}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        items = rec.history.item if kind == "history" else rec.summary.update if kind == "summary" else []
        for item in items:
            key = item.key or "/".join(item.nested_key)
            out[key] = json.loads(item.value_json)
    return out
