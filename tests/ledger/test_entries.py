"""Entries from table rows: the fast column encoder is byte-identical to the validating reference encoder."""

from __future__ import annotations

import random
from datetime import datetime

import pytest

from fgtrac_core.ledger import decode_entry, merkle_root
from fgtrac_core.ledger.entries import (
    ENTRY_FIELDS,
    ENTRY_KINDS,
    encode_columns,
    entry_bytes,
    member_leaf,
    members_root,
)

_STRINGS = [
    "",
    "a",
    'quote " backslash \\ newline \n tab \t',
    "\u0001\u001f control",
    "é ü 漢字 🙂",
    "{}[]:,",
]


def _random_value(rng: random.Random) -> object:
    choice = rng.randrange(7)
    if choice == 0:
        return None
    if choice == 1:
        return rng.randrange(-(2**62), 2**62)
    if choice == 2:
        return rng.choice(
            [0.1, -0.0, 1e-300, 1e20, 3.141592653589793, float("nan"), float("inf"), -float("inf")]
        )
    if choice == 3:
        return rng.choice(_STRINGS)
    if choice == 4:
        return datetime(
            2026, 11, 23, rng.randrange(24), rng.randrange(60), rng.randrange(60), rng.choice([0, 7, 999999])
        )
    if choice == 5:
        return rng.choice([True, False])
    return rng.random() * 10 ** rng.randrange(-8, 8)


@pytest.mark.parametrize("kind", sorted(ENTRY_KINDS))
def test_column_encoder_matches_reference(kind: str) -> None:
    rng = random.Random(kind)
    cols = {col for _, col in ENTRY_FIELDS[kind]}
    rows = [{c: _random_value(rng) for c in cols} for _ in range(300)]
    # homogeneous columns take the fast map path; mixed ones the per-value path: cover both
    rows += [{c: f"s{i}" for c in cols} for i in range(20)]
    columns = {c: [r[c] for r in rows] for c in cols}
    assert encode_columns(kind, columns) == [entry_bytes(kind, r) for r in rows]
    for e in encode_columns(kind, columns)[:20]:
        assert decode_entry(e)[0] == kind  # canonical by the decoder's own re-encoding check


def test_id_set_root_is_rfc9162_root_over_big_endian_members() -> None:
    ids = [5, -1, 2**40, 0]
    assert members_root(ids) == merkle_root([i.to_bytes(8, "big", signed=True) for i in ids]).hex()
    assert member_leaf(1) == b"\x00" * 7 + b"\x01"
    assert member_leaf(1, -2) == b"\x00" * 7 + b"\x01" + b"\xff" * 7 + b"\xfe"
    targets = [3, None, 0, -7]
    assert members_root(ids, targets) == merkle_root(
        [i.to_bytes(8, "big", signed=True) + (b"" if t is None else t.to_bytes(8, "big", signed=True))
         for i, t in zip(ids, targets, strict=True)]
    ).hex()  # fmt: skip
    assert members_root([]) == merkle_root([]).hex()
