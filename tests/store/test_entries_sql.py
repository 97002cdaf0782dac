"""The SQL entry encoder (verification's fast path) against the reference encoder, value by value.

The fast path may only ever be *more* suspicious than the reference: where it formats a value differently the
verifier falls back to the reference, but if it formatted two different values the same way, an edit could pass.
So: equal bytes for every double (one-ulp neighbours, -0.0, NaN, infinities, subnormals), and any one-ulp edit,
sign flip of zero or NaN substitution counted as a mismatch.
"""

from __future__ import annotations

import math
import random
import struct

import duckdb
import pyarrow as pa
import pytest

from fgtrac_core.ledger.entries import entry_bytes
from fgtrac_core.ledger.kinds import BY_KIND, KINDS
from fgtrac_core.store.db import insert_arrow
from fgtrac_core.store.entries import _SELECT, count_mismatches, iter_entries
from fgtrac_core.store.schema import column_types, create_schema


def _doubles() -> list[float]:
    special = [0.0, -0.0, 1.0, 0.1, 1 / 3, 1e-5, 1e-7, 1e15, 1e16, 1e21, 1e22, 123456789012345678.0,
               1.7976931348623157e308, 5e-324, 2.2250738585072014e-308, -2.5, 3e-4]  # fmt: skip
    rng = random.Random(0)
    values = special + [rng.uniform(-1e3, 1e3) for _ in range(300)] + [rng.lognormvariate(0, 30) for _ in range(300)]
    ulps = [math.nextafter(v, d) for v in special for d in (-math.inf, math.inf)]
    return values + ulps + [math.nan, math.inf, -math.inf]


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    c = duckdb.connect()
    create_schema(c)
    return c


def _store(con: duckdb.DuckDBPyConnection, values: list[float]) -> None:
    """self_influence rows holding `values`, and their ledger entries from the reference encoder."""
    rows = {"row_id": list(range(len(values))), "analysis_id": [0] * len(values), "sample_id": list(range(len(values))),
            "value": values, "rank": list(range(len(values)))}  # fmt: skip
    insert_arrow(con, "self_influence", pa.table(rows))
    entries = [entry_bytes("self_influence", {k: v[i] for k, v in rows.items()}) for i in range(len(values))]
    ledger = {"seq": list(range(len(values))), "kind": ["self_influence"] * len(values),
              "ref_id": rows["row_id"], "ref_key": [None] * len(values), "entry": entries,
              "leaf_hash": [b"\0" * 32] * len(values), "chain_hash": [b"\0" * 32] * len(values)}  # fmt: skip
    insert_arrow(con, "ledger", pa.table(ledger, schema=pa.schema([
        ("seq", pa.int64()), ("kind", pa.string()), ("ref_id", pa.int64()), ("ref_key", pa.string()),
        ("entry", pa.binary()), ("leaf_hash", pa.binary()), ("chain_hash", pa.binary())])))  # fmt: skip


def test_sql_and_reference_encoders_agree_on_every_double(con: duckdb.DuckDBPyConnection) -> None:
    values = _doubles()
    _store(con, values)
    assert count_mismatches(con, "self_influence") == 0
    # the reference path reproduces the stored entries too
    assert [e for _, _, e in iter_entries(con, "self_influence")] == [
        bytes(e) for (e,) in con.execute("SELECT entry FROM ledger ORDER BY seq").fetchall()
    ]


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda v: math.nextafter(v, math.inf), id="one-ulp-up"),
        pytest.param(lambda v: math.nextafter(v, -math.inf), id="one-ulp-down"),
        pytest.param(lambda v: -v, id="sign"),
        pytest.param(lambda v: math.nan, id="nan"),
    ],
)
def test_every_small_double_edit_is_a_mismatch(con: duckdb.DuckDBPyConnection, edit) -> None:
    values = [0.0, -0.0, 0.1, 1 / 3, 1e-7, 1e16, 5e-324, 1.7976931348623157e308]
    _store(con, values)
    edited = 0
    for row_id, v in enumerate(values):
        con.execute("UPDATE self_influence SET value = ? WHERE row_id = ?", [edit(v), row_id])
        stored = con.execute("SELECT value FROM self_influence WHERE row_id = ?", [row_id]).fetchall()[0][0]
        if struct.pack("<d", stored) != struct.pack("<d", v):  # DuckDB's UPDATE stores -0.0 as 0.0: no edit
            edited += 1
            assert count_mismatches(con, "self_influence") == 1, (v, stored)
        con.execute("DELETE FROM self_influence WHERE row_id = ?", [row_id])
        _reinsert(con, row_id, v)
    assert count_mismatches(con, "self_influence") == 0
    assert edited >= len(values) - 2


def _reinsert(con: duckdb.DuckDBPyConnection, row_id: int, value: float) -> None:
    # through Arrow, which keeps the sign of zero
    row = {"row_id": [row_id], "analysis_id": [0], "sample_id": [row_id], "value": [value], "rank": [row_id]}
    insert_arrow(con, "self_influence", pa.table(row))


def test_strings_that_format_differently_fall_back_and_verify(con: duckdb.DuckDBPyConnection) -> None:
    """Control characters: DuckDB writes \\u001F where the reference writes \\u001f — a mismatch for the fast
    path (so the reference rechecks), never a false match."""
    texts = ["plain", "\x00", "\x1f", "\x7f", "\u2028", "é", "\\", '"', "/", "emoji 😀", "tab\t", "nl\n"]
    rows = {"sample_id": list(range(len(texts))), "key": ["k"] * len(texts), "value": texts}
    insert_arrow(con, "sample_annotations", pa.table(rows))
    for i, t in enumerate(texts):
        entry = entry_bytes("annotation", {"sample_id": i, "key": "k", "value": t})
        con.execute("INSERT INTO ledger VALUES (?, 'annotation', ?, 'k', ?, ?, ?)", [i, i, entry, b"", b""])
    assert count_mismatches(con, "annotation") >= 1  # \x00, \x1f: hex case differs
    stored = [bytes(e) for (e,) in con.execute("SELECT entry FROM ledger ORDER BY seq").fetchall()]
    assert [e for _, _, e in iter_entries(con, "annotation")] == stored


def test_registry_matches_the_schema() -> None:
    """Every kind's table and entry columns exist with the types its select reads; keys are columns."""
    for kind in KINDS:
        types = column_types(kind.table)
        assert types, kind.table
        for col in (*kind.columns, kind.id_column, kind.key_column, kind.present_when):
            assert col is None or col in types, (kind.kind, col)
        if kind.id_set is not None:
            link_types = column_types(kind.id_set[0])
            assert {kind.id_column, kind.id_set[1], "sample_id"} <= set(link_types), kind.kind
        assert kind.kind in _SELECT
    assert BY_KIND["stage_end"].present_when == "ended_at"
