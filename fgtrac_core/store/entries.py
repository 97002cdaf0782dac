"""Reading table rows back as ledger entries (the recorder when it appends, the verifier when it recomputes).

One query per entry kind selects the row key (`ref_id`, `ref_key`) and the body fields; sets of sample ids are
reduced to Merkle roots here.
"""

from __future__ import annotations

from collections.abc import Iterator

import duckdb
import numpy as np

from fgtrac_core.ledger.entries import ENTRY_KINDS, encode_columns, ids_root


def _iso(*cols: str) -> str:
    """Timestamps formatted by DuckDB exactly as the entry encoding writes them (vectorised, no datetimes)."""
    return " REPLACE (" + ", ".join(f"strftime(t.{c}, '%Y-%m-%dT%H:%M:%S.%f') AS {c}" for c in cols) + ")"


_SELECT: dict[str, str] = {
    "meta": "SELECT NULL::BIGINT AS ref_id, t.key AS ref_key, t.* FROM meta t",
    "session_open": "SELECT t.session_id AS ref_id, NULL AS ref_key, t.*"
    + _iso("opened_at", "closed_at")
    + " FROM run_sessions t",
    "session_close": "SELECT t.session_id AS ref_id, NULL AS ref_key, t.*"
    + _iso("opened_at", "closed_at")
    + " FROM run_sessions t",
    "sample": "SELECT t.sample_id AS ref_id, NULL AS ref_key, t.* EXCLUDE (thumbnail)"
    + _iso("registered_at")
    + " FROM samples t",
    "annotation": "SELECT t.sample_id AS ref_id, t.key AS ref_key, t.* FROM sample_annotations t",
    "transform": "SELECT t.transform_id AS ref_id, NULL AS ref_key, t.*"
    + _iso("logged_at")
    + " FROM transforms t",
    "stage_start": "SELECT t.stage_id AS ref_id, NULL AS ref_key, t.*"
    + _iso("started_at", "ended_at")
    + " FROM stages t",
    "stage_end": "SELECT t.stage_id AS ref_id, NULL AS ref_key, t.*"
    + _iso("started_at", "ended_at")
    + " FROM stages t",
    "batch": "SELECT t.batch_id AS ref_id, NULL AS ref_key, t.* FROM batches t",
    "checkpoint": "SELECT t.checkpoint_id AS ref_id, NULL AS ref_key, t.*"
    + _iso("created_at")
    + " FROM checkpoints t",
}
# rows that exist but have no entry of this kind yet (an open session, a running stage)
_EXISTS: dict[str, str] = {"session_close": "t.closed_at IS NOT NULL", "stage_end": "t.status <> 'running'"}
# per kind: (link table, its key column, ORDER BY inside one set) for Merkle roots over sample ids
_ID_SETS: dict[str, tuple[str, str, str]] = {
    "batch": ("batch_samples", "batch_id", "position"),
    "transform": ("transform_samples", "transform_id", "sample_id"),
}

Entry = tuple[int | None, str | None, bytes]


def _id_roots(con: duckdb.DuckDBPyConnection, kind: str, keys: np.ndarray) -> dict[int, str]:
    """Merkle root (hex) of each set's sample ids, for the sets whose key is in `keys`."""
    link, key, order = _ID_SETS[kind]
    lo, hi = (int(keys.min()), int(keys.max())) if len(keys) else (0, -1)
    cols = con.execute(
        f"SELECT {key} AS k, sample_id FROM {link} WHERE {key} BETWEEN ? AND ? ORDER BY {key}, {order}",
        [lo, hi],
    ).fetchnumpy()
    k, ids = cols["k"], cols["sample_id"].tolist()
    roots: dict[int, str] = {}
    if len(k):
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        ends = np.r_[starts[1:], len(k)]
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            roots[int(k[s])] = ids_root(ids[s:e])
    return roots


def iter_entries(
    con: duckdb.DuckDBPyConnection,
    kind: str,
    *,
    only_new: bool = False,
    key_range: tuple[int, int] | None = None,
) -> Iterator[Entry]:
    """Yield (ref_id, ref_key, entry bytes) for every row of `kind`, ordered by key.

    The recorder restricts this to the rows it just wrote: by `key_range` (inclusive ref_id bounds; cheap) or,
    for rare bulk writes with arbitrary keys, `only_new` (rows without an entry of this kind yet; an anti-join).
    """
    sql = _SELECT[kind] + (f" WHERE {_EXISTS[kind]}" if kind in _EXISTS else "")
    if key_range is not None:
        lo, hi = (int(x) for x in key_range)
        sql = f"SELECT * FROM ({sql}) q WHERE q.ref_id BETWEEN {lo} AND {hi}"
    elif only_new:
        sql = f"""SELECT * FROM ({sql}) q WHERE NOT EXISTS (
                      SELECT 1 FROM ledger l WHERE l.kind = '{kind}'
                      AND l.ref_id IS NOT DISTINCT FROM q.ref_id AND l.ref_key IS NOT DISTINCT FROM q.ref_key)"""
    table = con.sql(
        sql + " ORDER BY ref_id, ref_key"
    ).to_arrow_table()  # fully fetched: _id_roots queries too
    for batch in table.to_batches(max_chunksize=262_144):
        cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
        if kind in _ID_SETS:
            roots = _id_roots(con, kind, np.asarray(cols["ref_id"], dtype=np.int64))
            empty = ids_root([])
            cols["samples_root"] = [roots.get(r, empty) for r in cols["ref_id"]]
        yield from zip(cols["ref_id"], cols["ref_key"], encode_columns(kind, cols), strict=True)


def table_of(kind: str) -> str:
    return ENTRY_KINDS[kind][0]
