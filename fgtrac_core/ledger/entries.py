"""Which recorded facts become ledger entries, and how a table row becomes an entry's canonical bytes.

Both the recorder (when it appends) and the verifier (when it recomputes) build entries from table rows read back
from the database through the same functions, so an entry depends only on the row's values.  Rows arrive as
plain dicts (Arrow ``to_pylist``): datetimes are written as ISO 8601 strings with microseconds
(``YYYY-MM-DDTHH:MM:SS.ffffff``, naive UTC; the database side may hand them over already formatted), non-finite floats as "NaN" /
"Infinity" / "-Infinity", bytes as lowercase hex.

Sets of sample ids (the samples of a batch, of a preprocessing event) are committed by one RFC 9162 Merkle root
(`samples_root`) whose leaves are the members (`member_leaf`): for a batch in batch order (leaf index = position
in the batch), each id with the target it was trained on; for a transform in ascending id order, the ids alone.
So "sample X was used at step t, with target y" is a two-level proof: the member's inclusion in the batch root,
and the batch entry's inclusion in the ledger.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from .encoding import ENCODING_VERSION, encode_entry, encode_value
from .kinds import KINDS
from .kinds import RESULT_KINDS as RESULT_KINDS  # re-exported
from .merkle import leaf_hash, root_from_leaf_hashes

# kind -> (table it is recomputed from, body fields in the entry), derived from the registry in `kinds`
ENTRY_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {k.kind: (k.table, k.fields) for k in KINDS}


ENTRY_FIELDS: dict[str, list[tuple[str, str]]] = {k.kind: list(k.field_columns) for k in KINDS}


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="microseconds")
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return value


def entry_bytes(kind: str, row: Mapping[str, Any]) -> bytes:
    """The canonical entry of `kind` for one table row (a dict holding at least the kind's body fields)."""
    return encode_entry(kind, {name: _plain(row[col]) for name, col in ENTRY_FIELDS[kind]})


def _fallback(value: Any) -> str:
    return encode_value(_plain(value)).decode("utf-8")


def _float(value: float) -> str:
    return repr(value) if math.isfinite(value) else json_string(_plain(value))


json_string: Callable[[str], str] = json.encoder.encode_basestring  # json.dumps(ensure_ascii=False)'s escaper
_ENCODERS: dict[type, Callable[[Any], str]] = {
    str: json_string,
    int: str,
    float: _float,
    type(None): lambda v: "null",
    bool: lambda v: "true" if v else "false",
    datetime: lambda v: json_string(v.isoformat(timespec="microseconds")),
}


def _encode_column(values: Sequence[Any]) -> list[str]:
    """JSON text of every value; columns of one type (plus NULLs) map a C-level escaper over the whole list."""
    types = set(map(type, values))
    types.discard(type(None))
    if len(types) == 1 and (enc := _ENCODERS.get(types.pop())) is not None:
        if len(values) and None in values:
            return ["null" if v is None else enc(v) for v in values]
        return list(map(enc, values))
    return [_ENCODERS.get(type(v), _fallback)(v) for v in values]


def _format_escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def encode_columns(kind: str, columns: Mapping[str, Sequence[Any]]) -> list[bytes]:
    """Entries of `kind` for many rows at once, from column lists; byte-identical to `entry_bytes` per row.

    The hot path of recording and verification: one format template per kind and a per-type escaper per value,
    instead of the generic validating encoder (their equality is tested).
    """
    names = sorted([("kind", None), ("v", None), *ENTRY_FIELDS[kind]], key=lambda f: f[0])
    pieces: list[str] = []
    cols: list[list[str]] = []
    for name, col in names:
        key = json_string(name) + ":"
        if col is None:  # the envelope: "v" and the entry kind
            value = str(ENCODING_VERSION) if name == "v" else json_string(kind)
            pieces.append(_format_escape(key + value))
        else:
            pieces.append(_format_escape(key) + "{" + str(len(cols)) + "}")
            cols.append(_encode_column(columns[col]))
    template = "{{" + ",".join(pieces) + "}}"
    return [text.encode("utf-8") for text in map(template.format, *cols)]


def member_leaf(sample_id: int, value: int | None = None) -> bytes:
    """Leaf data of one member of an id set: the sample id as 8-byte big-endian signed integer, followed by the
    value it was linked with (a batch sample's target) as 8-byte big-endian signed integer when there is one.  An
    id alone is 8 bytes and an (id, value) pair 16, so the two never collide."""
    head = int(sample_id).to_bytes(8, "big", signed=True)
    return head if value is None else head + int(value).to_bytes(8, "big", signed=True)


def member_leaf_hashes(sample_ids: Iterable[int], values: Iterable[int | None] | None = None) -> list[bytes]:
    """Leaf hashes of an id set's members, in the given order (`values` None: ids alone)."""
    if values is None:
        return [leaf_hash(member_leaf(i)) for i in sample_ids]
    return [leaf_hash(member_leaf(i, v)) for i, v in zip(sample_ids, values, strict=True)]


def members_root(sample_ids: Sequence[int], values: Sequence[int | None] | None = None) -> str:
    """Hex RFC 9162 root over an id set's members in the given order (`member_leaf`): a batch's samples with the
    targets they were trained on, a transform's samples alone."""
    return root_from_leaf_hashes(member_leaf_hashes(sample_ids, values)).hex()
