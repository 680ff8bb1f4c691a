"""Read a W&B offline run file (run-<id>.wandb) back, without a W&B server.

wandb no longer ships a Python reader for this file. Its layout: a 7-byte
header (b":W&B", a little-endian uint16 magic, a version byte), then the
LevelDB log format -- 32 KiB blocks of records, each with a 7-byte header
(crc32c: 4 bytes, length: uint16 LE, type: FULL=1 FIRST=2 MIDDLE=3 LAST=4);
block tails shorter than a header are zero padding. Each reassembled record
is a serialized `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Iterator

BLOCK_SIZE = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_payloads(data: bytes) -> Iterator[bytes]:
    """Reassembled record payloads of a LevelDB-log-framed byte string (file header included)."""
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (missing the ':W&B' header)")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < HEADER:  # zero padding at the end of a block
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:  # preallocated / padded tail
            pos += left_in_block
            continue
        payload = data[pos + HEADER: pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""


def iter_records(path):
    """wandb_internal_pb2.Record messages of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    for payload in iter_payloads(pathlib.Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _items(items) -> dict:
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json)
    return out


def read_history(path) -> list[dict]:
    """One dict per history row: {key: value} as logged (images appear as their JSON descriptors)."""
    path = find_run_file(path) if pathlib.Path(path).is_dir() else pathlib.Path(path)
    return [_items(r.history.item) for r in iter_records(path) if r.WhichOneof("record_type") == "history"]


def read_summary(path) -> dict:
    """The last summary record's values."""
    path = find_run_file(path) if pathlib.Path(path).is_dir() else pathlib.Path(path)
    summary = {}
    for record in iter_records(path):
        if record.WhichOneof("record_type") == "summary":
            summary.update(_items(record.summary.update))
    return summary


def find_run_file(folder) -> pathlib.Path:
    """The newest run-*.wandb under `folder` (a workdir, its wandb/ folder or a run folder)."""
    files = sorted(pathlib.Path(folder).rglob("run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file under {folder}")
    return files[-1]
