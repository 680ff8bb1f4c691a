"""Read a W&B run file (run-<id>.wandb) back, without W&B servers.

wandb no longer ships a Python reader for its transaction log, so this is a
small one; the tests use it to prove that logged metrics really reached W&B.
The file layout: iter_raw_records; how keys and values read back: read_history.
"""

from __future__ import annotations

import json
import pathlib
import re
import struct
import zlib
from typing import Any, Iterator

BLOCK_SIZE = 32 * 1024
FILE_IDENT = b":W&B"
FILE_MAGIC = 0xBEE1
FILE_VERSION = 0
FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version: 7 bytes
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type: 7 bytes
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class RunFileError(ValueError):
    """The file is not a W&B run file, or it is corrupt."""


def iter_raw_records(path, *, verify_crc: bool = True) -> Iterator[bytes]:
    """The reassembled logical records of a run file, as bytes.

    A record cut off at the end of the file (a run killed while writing) ends
    the iteration quietly; a bad header, bad CRC or broken FIRST/MIDDLE/LAST
    sequence raises RunFileError.

    File layout, as written by wandb-core (checked against wandb 0.31):

    * a 7-byte file header: the ident ``b":W&B"``, a little-endian uint16 magic
      0xBEE1 (bytes ``e1 be``) and a uint8 version 0;
    * then the LevelDB log format, with 32 KiB blocks counted from the start of
      the file (so the first block holds 32768 - 7 bytes of records). Each
      physical record has a 7-byte header: CRC (uint32 LE), length (uint16 LE),
      type (FULL=1, FIRST=2, MIDDLE=3, LAST=4), then ``length`` bytes of data.
      A logical record is one FULL or a FIRST, MIDDLEs, LAST sequence. A block
      tail shorter than 7 bytes is zero padding. Unlike LevelDB, the CRC is the
      plain zlib CRC-32 (not CRC-32C, not masked) of the type byte followed by
      the data, so it is verified here with the standard library.
    * every logical record is a serialized ``wandb.proto.wandb_internal_pb2.Record``.
    """
    data = pathlib.Path(path).read_bytes()
    if len(data) < FILE_HEADER.size:
        raise RunFileError(f"{path}: too short to be a W&B run file ({len(data)} bytes)")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != FILE_IDENT or magic != FILE_MAGIC or version != FILE_VERSION:
        raise RunFileError(f"{path}: not a W&B run file "
                           f"(header {data[:FILE_HEADER.size].hex()}, expected "
                           f"{FILE_HEADER.pack(FILE_IDENT, FILE_MAGIC, FILE_VERSION).hex()})")
    offset = FILE_HEADER.size
    pending: bytearray | None = None
    while offset < len(data):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < RECORD_HEADER.size:  # zero padding at a block tail
            offset += left_in_block
            continue
        if offset + RECORD_HEADER.size > len(data):
            return  # truncated header at the end of the file
        crc, length, kind = RECORD_HEADER.unpack_from(data, offset)
        start = offset + RECORD_HEADER.size
        # preallocated / zeroed space: skip the rest of the block
        if kind == 0 and length == 0:
            offset += left_in_block
            continue
        if start + length > len(data):
            return  # truncated payload at the end of the file
        if RECORD_HEADER.size + length > left_in_block:
            raise RunFileError(f"{path}: record at offset {offset} crosses a block boundary")
        payload = data[start:start + length]
        if verify_crc and zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise RunFileError(f"{path}: CRC mismatch in record at offset {offset}")
        offset = start + length
        if kind == FULL:
            if pending is not None:
                raise RunFileError(f"{path}: FULL record at offset {offset} inside a fragmented "
                                   f"record")
            yield bytes(payload)
        elif kind == FIRST:
            if pending is not None:
                raise RunFileError(f"{path}: FIRST record at offset {offset} inside a "
                                   f"fragmented record")
            pending = bytearray(payload)
        elif kind in (MIDDLE, LAST):
            if pending is None:
                raise RunFileError(f"{path}: {'MIDDLE' if kind == MIDDLE else 'LAST'} record at "
                                   f"offset {offset} without a FIRST")
            pending += payload
            if kind == LAST:
                yield bytes(pending)
                pending = None
        else:
            raise RunFileError(f"{path}: unknown record type {kind} at offset {offset}")


def iter_records(path, *, verify_crc: bool = True):
    """The ``wandb_internal_pb2.Record`` messages of a run file, in order."""
    from wandb.proto import wandb_internal_pb2

    for raw in iter_raw_records(path, verify_crc=verify_crc):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def run_file_complete(path) -> bool:
    """Whether wandb-core has finished writing a run file: its last record is the run's exit
    record.

    wandb's ``run.finish()`` returns before wandb-core has flushed and closed
    the file (that happens asynchronously, in the service process), so a
    reader in the same process must wait for this.
    """
    last = None
    try:
        for raw in iter_raw_records(path, verify_crc=False):
            last = raw
    except (OSError, RunFileError):
        return False
    if last is None:
        return False
    from wandb.proto import wandb_internal_pb2

    record = wandb_internal_pb2.Record()
    try:
        record.ParseFromString(last)
    except Exception:  # noqa: BLE001 - a torn record is just "not complete yet"
        return False
    return record.WhichOneof("record_type") in ("exit", "final", "footer")


def find_run_file(workdir_or_run_dir) -> pathlib.Path:
    """The newest run-*.wandb file in a folder, its wandb/ subfolder or the run folders inside it.

    Accepts a run file itself, a run folder (offline-run-... or run-...), a
    wandb folder, or the folder passed to ``wandb.init(dir=...)``. "Newest" is
    by the timestamp in the run folder name, then by modification time.
    """
    root = pathlib.Path(workdir_or_run_dir)
    if root.is_file():
        return root
    candidates = [p for pattern in ("run-*.wandb", "*/run-*.wandb", "wandb/*/run-*.wandb")
                  for p in root.glob(pattern) if p.is_file() and not p.parent.is_symlink()]
    if not candidates:
        raise FileNotFoundError(f"no W&B run file (run-*.wandb) under {root}")

    def age(p: pathlib.Path):
        # offline-run-20260101_120000-<id> / run-20260101_120000-<id>: the timestamp sorts
        # lexically.
        match = re.match(r"(?:offline-)?run-(\d{8}_\d{6})-", p.parent.name)
        return (match.group(1) if match else ""), p.stat().st_mtime

    return max(candidates, key=age)


def _item_value(item) -> Any:
    kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if kind is None:
        return json.loads(item.value_json) if item.value_json else None
    if kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    return getattr(item, kind)


def _item_path(item) -> list[str]:
    return list(item.nested_key) if len(item.nested_key) else [item.key]


def _put(target: dict, path: list[str], value: Any, nested: bool) -> None:
    if not nested:
        target["/".join(path)] = value
        return
    for part in path[:-1]:
        child = target.get(part)
        if not isinstance(child, dict):
            child = target[part] = {}
        target = child
    target[path[-1]] = value


def _drop(target: dict, path: list[str], nested: bool) -> None:
    if not nested:
        target.pop("/".join(path), None)
        return
    for part in path[:-1]:
        target = target.get(part)
        if not isinstance(target, dict):
            return
    target.pop(path[-1], None)


def read_history(path_or_run_dir, *, nested: bool = False) -> list[dict]:
    """One dict per history record (one per ``run.log`` commit), keys as logged, values parsed
    from JSON.

    Includes wandb's own ``_step``, ``_runtime`` and ``_timestamp``.

    History and summary items carry a key path (``nested_key``, or the legacy
    single ``key``) and a JSON value. By default a path is joined with "/", so a
    logged "train/loss" reads back as "train/loss" and the fields of a logged
    image "img" as "img/_type", "img/path", ... Pass ``nested=True`` to get
    nested dicts instead (``row["img"]["_type"] == "image-file"``), which keeps
    a path like ["a/b"] apart from ["a", "b"]. JSON values follow wandb's
    spelling of non-finite floats (NaN, Infinity), which ``json.loads`` accepts.
    """
    rows = []
    for record in iter_records(find_run_file(path_or_run_dir)):
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, _item_path(item), _item_value(item), nested)
            rows.append(row)
    return rows


def read_summary(path_or_run_dir, *, nested: bool = False) -> dict:
    """The run summary: every summary update and removal in the file, applied in order.

    wandb writes partial updates (not snapshots), so the last record alone is
    not the summary. With define_metric(summary="min,last") a value is a dict
    such as {"min": 1.2, "last": 1.3}. Empty if the file holds no summary.
    Keys and ``nested`` as in read_history.
    """
    summary: dict[str, Any] = {}
    for record in iter_records(find_run_file(path_or_run_dir)):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                _put(summary, _item_path(item), _item_value(item), nested)
            for item in record.summary.remove:
                _drop(summary, _item_path(item), nested)
    return summary


def read_run_info(path_or_run_dir) -> dict:
    """Identity of the run: id, project, name, group, job_type, tags, config, resumed, exit_code.

    config holds the plain values (wandb's {"value": ...} wrappers removed,
    its own "_wandb" entry dropped); exit_code is None when the run did not
    finish cleanly (no exit record).
    """
    info: dict[str, Any] = {"exit_code": None}
    config: dict[str, Any] = {}

    def add_config(items):
        for item in items:
            value = _item_value(item)
            if isinstance(value, dict) and set(value) <= {"value", "desc"} and "value" in value:
                value = value["value"]
            _put(config, _item_path(item), value, True)

    for record in iter_records(find_run_file(path_or_run_dir)):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            info.update(id=run.run_id, project=run.project, entity=run.entity,
                        name=run.display_name, group=run.run_group, job_type=run.job_type,
                        tags=list(run.tags), resumed=run.resumed)
            add_config(run.config.update)
        elif kind == "config":
            add_config(record.config.update)
            for item in record.config.remove:
                _drop(config, _item_path(item), True)
        elif kind == "exit":
            info["exit_code"] = record.exit.exit_code
    config.pop("_wandb", None)
    info["config"] = config
    return info


def read_artifacts(path_or_run_dir) -> list[dict]:
    """The artifacts a run logged, in order: name, type, aliases, metadata (a dict) and the names of
    the files in each (its manifest)."""
    out = []
    for record in iter_records(find_run_file(path_or_run_dir)):
        if record.WhichOneof("record_type") != "artifact":
            continue
        artifact = record.artifact
        out.append(dict(name=artifact.name, type=artifact.type, aliases=list(artifact.aliases),
                        metadata=json.loads(artifact.metadata) if artifact.metadata else {},
                        files=sorted(entry.path for entry in artifact.manifest.contents)))
    return out
