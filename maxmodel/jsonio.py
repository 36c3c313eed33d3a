"""Strict JSON for everything maxmodel writes (metrics.jsonl, goodput.json, data_stats.json, export.json,
planner and benchmark output). Python's json writes NaN / Infinity, which RFC 8259 readers (jq, JavaScript,
Go) reject; here a value that is not known (NaN, +-inf) is written as null, and numpy scalars and arrays
become plain numbers and lists, so no caller needs its own `default=`."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """`value` with non-finite floats replaced by None and numpy types turned into Python ones."""
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def dumps(value: Any, **kwargs) -> str:
    """json.dumps that never writes NaN / Infinity (allow_nan=False checks it: a value to_jsonable does not
    know how to clean raises instead of producing a file strict readers refuse)."""
    return json.dumps(to_jsonable(value), allow_nan=False, **kwargs)


def write(path: str | Path, value: Any, **kwargs) -> None:
    """Write one JSON document to `path`."""
    Path(path).write_text(dumps(value, **kwargs))
