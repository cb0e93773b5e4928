"""Read the records of a W&B offline run file (``run-*.wandb``) from disk, for tests.

The file is a 7-byte header (``:W&B``, magic, version) followed by a LevelDB-style log: 32 KiB blocks of
records, each with a 7-byte header (CRC, little-endian length, type: 1 full, 2 first, 3 middle, 4 last).
Each assembled payload is a serialized ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768


def _settled_bytes(path: Path, timeout: float = 30.0) -> bytes:
    """The file once it has stopped growing: W&B's service may still be flushing it when ``finish()`` returns."""
    deadline = time.monotonic() + timeout
    data = Path(path).read_bytes()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again = Path(path).read_bytes()
        if again == data:
            break
        data = again
    return data


def read_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = _settled_bytes(path)
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written (the run did not finish cleanly)
            break
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            pending = payload
        elif kind == 2:
            pending = payload
            continue
        elif kind == 3:
            pending += payload
            continue
        else:
            pending += payload
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        yield record


def history_keys(path: Path) -> dict[str, list[str]]:
    """Every history key logged in the run, with its JSON-encoded values in order."""
    out: dict[str, list[str]] = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                out.setdefault(key, []).append(item.value_json)
    return out
