"""How a sample looks to a reviewer when it has no image: a short text, or named feature values.

`Run.register_samples(..., display=...)` takes one value per sample — a string (text data) or a mapping of
feature name to value (tabular data) — and stores it as JSON in `samples.display`, a field of the sample's
ledger entry (so `fgtrac verify` covers it like any recorded value).  Readers get it back with `decode`, and the
dashboard asks `feature_contrast` which features of a listed sample stand out against the test example.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from fgtrac_core._json import to_jsonable
from fgtrac_core.errors import FgtracError

MAX_TEXT = 2000  # characters of text per sample: a reviewer's glance, not the document
MAX_FEATURES = 512

Display = str | dict[str, Any]


def encode(values: Any, n: int) -> list[str | None]:
    """One JSON text per sample (None for a sample given None) from `display=`: a sequence of strings or
    mappings, or a pandas DataFrame (one row per sample, its columns the feature names)."""
    if isinstance(values, pd.DataFrame):
        narrow = [c for c, dtype in values.dtypes.items() if dtype in (np.float32, np.float16)]
        # to_dict would widen them to float64's digits (float32 21.72 -> 21.719999313354492)
        values = values.assign(**{c: [_feature_value(v) for v in values[c].to_numpy()] for c in narrow})
        values = values.to_dict("records")
    if isinstance(values, str | bytes | Mapping) or not isinstance(values, Sequence | np.ndarray):
        raise FgtracError("register_samples: display= must hold one value per sample (a list or a DataFrame)")
    if len(values) != n:
        raise FgtracError(f"register_samples: display has {len(values)} entries for {n} sample ids")
    return [_encode_one(v, i) for i, v in enumerate(values)]


def _encode_one(value: Any, i: int) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise FgtracError(
                f"register_samples: display text of entry {i} has {len(value)} characters (at most {MAX_TEXT})"
            )
        return json.dumps({"text": value}, ensure_ascii=False)
    if isinstance(value, Mapping):
        if not value or len(value) > MAX_FEATURES:
            raise FgtracError(
                f"register_samples: display entry {i} has {len(value)} features (1 to {MAX_FEATURES})"
            )
        features = {str(k): _feature_value(v) for k, v in value.items()}
        bad = next((k for k, v in features.items() if isinstance(v, dict | list)), None)
        if bad is not None:
            raise FgtracError(f"register_samples: display feature {bad!r} of entry {i} is not a single value")
        return json.dumps({"features": features}, ensure_ascii=False)
    raise FgtracError(
        f"register_samples: display entry {i} is a {type(value).__name__}; give a string (text) or a mapping "
        "of feature names to values (tabular)"
    )


def _feature_value(value: Any) -> Any:
    """A feature value as JSON; a float32 or float16 as the shortest decimal that reads back as it (what numpy and
    pandas print), not as the digits of its float64 widening."""
    if isinstance(value, np.floating) and value.dtype.itemsize < 8 and np.isfinite(value):
        return float(str(value))
    return to_jsonable(value)


def decode(stored: str | None) -> Display | None:
    """The text (str) or the feature mapping (dict, in recorded order) stored for a sample, or None."""
    if stored is None:
        return None
    try:
        value = json.loads(stored)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("features"), dict):
        return value["features"]
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return value["text"]
    return stored  # not what register_samples writes (an edited run): shown as the text it is


def feature_contrast(
    reference: Mapping[str, Any] | None,
    rows: Mapping[int, Mapping[str, Any]],
    spread: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """How far each listed sample's features are from the reference's (the test example): |x − x_ref| / s, where
    s is the feature's spread in `spread` (e.g. its standard deviation over the training set,
    `RunStore.feature_spread`), else its standard deviation over the listed samples and the reference.  One row
    per sample id, one column per feature, ordered by mean distance (largest first); NaN where a value is
    missing or not a number, or the spread is 0.  Without a reference, the distance is from the listed samples'
    mean."""
    frame = pd.DataFrame.from_dict(dict(rows), orient="index")
    numeric = frame.apply(pd.to_numeric, errors="coerce").astype(float)
    ref = (
        pd.Series(reference).reindex(numeric.columns).pipe(pd.to_numeric, errors="coerce").astype(float)
        if reference is not None
        else numeric.mean()
    )
    if spread is not None:
        scale = pd.Series(spread, dtype=float).reindex(numeric.columns)
    else:
        scale = pd.concat([numeric, ref.to_frame().T]).std(ddof=0)
    distance = (numeric - ref).abs() / scale.where(scale > 0)
    order = distance.mean().fillna(-math.inf).sort_values(ascending=False, kind="stable").index
    return distance[order]
