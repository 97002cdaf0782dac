"""Canonical JSON for the small parameter dictionaries stored in JSON columns."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def to_jsonable(value: Any) -> Any:
    """Convert hyperparameter-like values (tensors, numpy scalars, tuples) to plain JSON types.

    Non-finite floats become the strings "NaN", "Infinity", "-Infinity"; anything else unknown becomes its repr,
    so recording never fails on an exotic hyperparameter.
    """
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 1) == 0:
        return to_jsonable(item())
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return to_jsonable(tolist())
    return repr(value)


def canonical_json(value: Any) -> str:
    """Sorted-key, compact JSON of `to_jsonable(value)`."""
    return json.dumps(to_jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
