"""Strict JSON (RFC 8259) for everything difusi prints or serves.

Python's `json.dumps` writes `Infinity` and `NaN` by default, which `JSON.parse`, `jq` and most other parsers
reject. A job's `s_tmax` defaults to infinity (A1111's "no upper bound"), so it reached `difusi history --json`
that way. difusi's rule, the same as `GET /difusi/v1/fields` (a range's open end) and the HTTP API
(pydantic writes non-finite floats as null): **a non-finite number is written as `null`**. For a job field,
null means "the field's default" when it is read back (`GenerationParams.from_mapping` skips None), and
`s_tmax`'s default is infinity, so a null `s_tmax` round-trips to the same job. Validated jobs never hold NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any


def to_strict(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, tuples and lists as lists, paths as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: to_strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_strict(item) for item in value]
    if isinstance(value, PurePath):
        return str(value)
    return value


def dumps(value: Any, **options: Any) -> str:
    """`json.dumps` of `to_strict(value)` with `allow_nan=False`: anything non-finite left over is a bug, not text
    a strict parser would choke on later."""
    return json.dumps(to_strict(value), allow_nan=False, **options)
