"""Canonical, versioned byte encoding of ledger entries.

An entry is ``(kind, body)``.  Its bytes are the UTF-8 encoding of the compact JSON object
``{"v": 1, "kind": kind, **body}`` written with sorted keys, separators ``(",", ":")`` and
``ensure_ascii=False``.  The rules (also in ``docs/ledger.md``):

* values: ``str``, ``bool``, ``None``, ``int``, finite ``float``, ``dict`` with ``str`` keys, ``list``
  (a ``tuple`` is accepted and encoded as a list).  Anything else (``bytes``, sets, numpy scalars that
  are not ``int``/``float`` subclasses, ...) raises ``TypeError``; bytes must be passed as hex strings.
* ``int``: JSON integer in decimal, at most 4300 digits (CPython's int/str conversion limit).
* ``float``: JSON number written as Python's ``repr(x)`` (shortest string that round-trips to the same
  IEEE 754 double; ``-0.0`` stays ``-0.0``; a float always shows a ``.`` or an exponent, so it never
  decodes as an int).  NaN and +-infinity raise ``ValueError``: a caller that needs them stores the
  strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` explicitly.
* object keys sort by Unicode code point; strings escape only ``"``, ``\\`` and control characters
  below U+0020 (``\\b \\f \\n \\r \\t`` short forms, otherwise ``\\u00xx`` lowercase); lone surrogates
  are rejected.
* the body may not use the reserved keys ``"v"`` and ``"kind"``; ``kind`` is a non-empty string.

:func:`decode_entry` accepts only canonical bytes: it parses, re-encodes and compares byte for byte.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from .merkle import leaf_hash

__all__ = [
    "ENCODING_VERSION",
    "RESERVED_KEYS",
    "decode_entry",
    "encode_entry",
    "encode_value",
    "entry_leaf_hash",
]

#: Version written in the ``"v"`` field of every entry.
ENCODING_VERSION = 1
#: Top-level keys owned by the envelope; a body may not use them.
RESERVED_KEYS = frozenset({"v", "kind"})

_MAX_DEPTH = 64
_MAX_INT_DIGITS = 4300
_INT_LIMIT = 10**_MAX_INT_DIGITS

_dumps = json.JSONEncoder(
    skipkeys=False,
    ensure_ascii=False,
    check_circular=False,
    allow_nan=False,
    sort_keys=True,
    separators=(",", ":"),
).encode


def _normalise(value: Any, path: str, depth: int) -> Any:
    """Return ``value`` rebuilt from plain built-in types, enforcing the encoding's value rules."""
    t = type(value)
    if t is str or value is None or t is bool:
        return value
    if t is int:
        if value.bit_length() > 14_000 and abs(value) >= _INT_LIMIT:
            raise ValueError(f"{path}: integer has more than {_MAX_INT_DIGITS} decimal digits")
        return value
    if t is float:
        if not math.isfinite(value):
            raise ValueError(
                f"{path}: {value!r} is not allowed; store the string 'NaN', 'Infinity' or '-Infinity' explicitly"
            )
        return value
    if depth >= _MAX_DEPTH:
        raise ValueError(f"{path}: nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{path}: object key {k!r} is {type(k).__name__}, expected str")
            out[str(k)] = _normalise(v, f"{path}.{k}", depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_normalise(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    # Subclasses of the scalar types (e.g. IntEnum, numpy.float64, str subclasses) become the base type.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return _normalise(int(value), path, depth)
    if isinstance(value, float):
        return _normalise(float(value), path, depth)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{path}: bytes are not encoded implicitly; pass a lowercase hex string")
    raise TypeError(f"{path}: unsupported type {type(value).__name__}")


def _to_bytes(obj: Any) -> bytes:
    """Serialise an already normalised object canonically."""
    try:
        text = _dumps(obj)
    except ValueError as exc:  # e.g. the int/str digit limit
        raise ValueError(f"cannot encode entry: {exc}") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"string contains a character that is not valid UTF-8 (lone surrogate?): {exc}"
        ) from None


def encode_value(value: Any) -> bytes:
    """Return the canonical encoding of any allowed value (no envelope), e.g. to hash a config dict."""
    return _to_bytes(_normalise(value, "value", 0))


def encode_entry(kind: str, body: Mapping[str, Any]) -> bytes:
    """Return the canonical bytes of entry ``(kind, body)``: ``{"v":1,"kind":kind,...body}`` as UTF-8 JSON.

    Raises ``TypeError`` for a value of an unsupported type and ``ValueError`` for a disallowed value
    (NaN/infinity, reserved key, empty kind, over-long integer, lone surrogate).
    """
    if not isinstance(kind, str):
        raise TypeError(f"entry kind must be str, got {type(kind).__name__}")
    if not kind:
        raise ValueError("entry kind must be a non-empty string")
    if not isinstance(body, Mapping):
        raise TypeError(f"entry body must be a mapping, got {type(body).__name__}")
    clash = RESERVED_KEYS.intersection(body)
    if clash:
        raise ValueError(f"entry body uses reserved key(s) {sorted(clash)}")
    obj = _normalise(body, kind, 0)
    obj["v"] = ENCODING_VERSION
    obj["kind"] = str(kind)
    return _to_bytes(obj)


def entry_leaf_hash(kind: str, body: Mapping[str, Any]) -> bytes:
    """Return the Merkle leaf hash ``SHA-256(0x00 || encode_entry(kind, body))``."""
    return leaf_hash(encode_entry(kind, body))


def _reject_constant(name: str) -> Any:
    """``json.loads`` hook: the tokens NaN, Infinity and -Infinity are never canonical."""
    raise ValueError(f"non-canonical entry: JSON constant {name} is not allowed")


def decode_entry(data: bytes) -> tuple[str, dict[str, Any]]:
    """Parse canonical entry bytes back to ``(kind, body)``.

    Raises ``ValueError`` if ``data`` is not valid UTF-8 JSON, lacks the envelope, has an unknown version,
    or is not byte-for-byte the canonical encoding of what it decodes to (whitespace, key order, number
    spelling, escapes, duplicate keys, ...).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"entry data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except ValueError as exc:  # includes UnicodeDecodeError and JSONDecodeError
        raise ValueError(f"entry is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("entry must be a JSON object")
    version = obj.pop("v", None)
    if type(version) is not int:
        raise ValueError("entry has no integer 'v' (encoding version) field")
    if version != ENCODING_VERSION:
        raise ValueError(
            f"unsupported entry encoding version {version} (this fgtrac reads {ENCODING_VERSION})"
        )
    kind = obj.pop("kind", None)
    if not isinstance(kind, str) or not kind:
        raise ValueError("entry has no non-empty string 'kind' field")
    if encode_entry(kind, obj) != data:
        raise ValueError("entry bytes are not in canonical form")
    return kind, obj
