"""The plain files a run writes beside W&B: one strict-JSON encoder, and metrics.jsonl read back
and rewound."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def scalar(key: str, value: Any) -> bool | int | float | str:
    """A Python scalar from a Python/NumPy/JAX scalar (or size-1 array)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    try:
        array = np.asarray(value)
    except Exception as e:  # noqa: BLE001 - report which key was bad
        raise TypeError(f"{key}: cannot log {type(value).__name__} as a scalar") from e
    if array.size != 1 or array.dtype.kind not in "biuf":
        raise TypeError(f"{key}: expected a real scalar, got {type(value).__name__} "
                        f"of shape {array.shape} and dtype {array.dtype}")
    return array.reshape(()).item()


def json_safe(value: Any) -> Any:
    """Strict-JSON value: non-finite floats as "NaN"/"Infinity"/"-Infinity", NumPy scalars as
    Python."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(json_safe(v) for v in value)
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # a JAX array
        return json_safe(np.asarray(value).tolist())
    return str(value)


def dumps(record: dict) -> str:
    return json.dumps(json_safe(record), allow_nan=False)


def write_json(path, value: Any, indent: int = 1) -> None:
    """`value` as strict JSON (json_safe: non-finite floats as "NaN"/"Infinity" strings) at
    `path`."""
    pathlib.Path(path).write_text(json.dumps(json_safe(value), indent=indent, allow_nan=False)
                                  + "\n")


def read_metrics_jsonl(path) -> list[dict]:
    """The records of a metrics.jsonl in order, with "NaN"/"Infinity"/"-Infinity" back as floats.

    Histogram lines (older files kept them here) are skipped, and so is a
    half-written last line (a run killed mid-write).
    """
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
        if "histogram" in record:
            continue
        records.append({k: _NON_FINITE.get(v, v) if isinstance(v, str) else v
                        for k, v in record.items()})
    return records


def rewind_metrics(path: pathlib.Path, step: int) -> list[dict]:
    """Drop records logged after `step` from metrics.jsonl (a resumed run re-logs them); return the
    rest.

    Records of one step are merged, so an eval's loss and statistics come back as one dict.
    """
    if not path.exists():
        return []
    def before(line):
        try:
            return json.loads(line)["step"] <= step
        except json.JSONDecodeError:  # a line half-written by a killed run
            return False

    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if before(line)]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))
    merged: dict[int, dict] = {}
    for record in read_metrics_jsonl(path):
        merged.setdefault(record["step"], {}).update(record)
    return [merged[s] for s in sorted(merged)]
