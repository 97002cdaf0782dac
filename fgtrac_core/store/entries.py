"""Reading table rows back as ledger entries (the recorder when it appends, the verifier when it recomputes).

One query per entry kind selects the row key (`ref_id`, `ref_key`) and the body fields; sets of sample ids are
reduced to Merkle roots here.
"""

from __future__ import annotations

from collections.abc import Iterator

import duckdb
import numpy as np
import pyarrow as pa

from fgtrac_core.ledger.encoding import ENCODING_VERSION
from fgtrac_core.ledger.entries import (
    ENTRY_FIELDS,
    ENTRY_KINDS,
    RESULT_KINDS,
    encode_columns,
    json_string,
    members_root,
)
from fgtrac_core.ledger.kinds import BY_KIND, KINDS, RecordKind
from fgtrac_core.ledger.merkle import HASH_SIZE, leaf_hash, root_from_leaf_hashes
from fgtrac_core.store.merkle_batch import big_endian, forest_roots, hex_rows, leaf_hashes, runs
from fgtrac_core.store.schema import column_types
from fgtrac_core.store.usage_index import read_usage_index


def _select(kind: RecordKind) -> str:
    """The rows of `kind` as (ref_id, ref_key, one column per entry field): a plain projection of base columns.

    Timestamps are formatted by DuckDB exactly as the entry encoding writes them (vectorised, no datetimes).
    """
    types = column_types(kind.table)
    ref_id = f"t.{kind.id_column}" if kind.id_column else "NULL::BIGINT"
    ref_key = f"t.{kind.key_column}" if kind.key_column else "NULL::VARCHAR"
    cols = [
        f"strftime(t.{c}, '%Y-%m-%dT%H:%M:%S.%f') AS {c}" if types[c] == "TIMESTAMP" else f"t.{c}"
        for c in dict.fromkeys(kind.columns)
    ]
    sql = f"SELECT {ref_id} AS ref_id, {ref_key} AS ref_key, {', '.join(cols)} FROM {kind.table} t"
    return sql + (f" WHERE t.{kind.present_when} IS NOT NULL" if kind.present_when else "")


_SELECT: dict[str, str] = {k.kind: _select(k) for k in KINDS}
_EMPTY_SET_ROOT = members_root([])

# kinds whose entries hold a digest only the Python path computes (count_mismatches skips them)
_PYTHON_ONLY = {k.kind for k in KINDS if k.computed}

Entry = tuple[int | None, str | None, bytes]


def _link_roots(keys: np.ndarray, ids: np.ndarray, values: pa.ChunkedArray | pa.Array | None) -> dict[int, str]:
    """Merkle root (hex) of each set's members, from link rows ordered by set key, then by the set's order column;
    with `values` (the link table's pair column), a member's leaf carries its value beside its id.

    The leaves are `members_root`'s (`fgtrac_core.ledger.entries`, the reference), built as arrays: every set of
    a commit or a verification is hashed in one pass (`merkle_batch`)."""
    if not len(keys):
        return {}
    starts, lengths = runs(keys)
    id_bytes = big_endian(np.asarray(ids, np.int64), ">i8")
    # a sample is in many sets: each distinct leaf is hashed once
    if values is None:
        hashes = leaf_hashes(id_bytes, repeated=True)
    else:
        null = np.asarray(values.is_null().to_numpy(zero_copy_only=False), bool)
        hashes = np.empty((len(id_bytes), HASH_SIZE), np.uint8)
        if null.any():  # a NULL value leaves the id alone
            hashes[null] = leaf_hashes(id_bytes[null], repeated=True)
        if not null.all():
            value = values.fill_null(0).to_numpy(zero_copy_only=False)[~null]
            pairs = np.concatenate([id_bytes[~null], big_endian(value, ">i8")], axis=1)
            hashes[~null] = leaf_hashes(pairs, repeated=True)
    return dict(zip(keys[starts].tolist(), hex_rows(forest_roots(hashes, lengths)), strict=True))


def _id_roots(con: duckdb.DuckDBPyConnection, kind: str, keys: np.ndarray) -> dict[int, str]:
    """`_link_roots` of the sets whose key is in `keys`, read from the kind's link table."""
    record = BY_KIND[kind]
    assert record.id_set is not None and record.id_column is not None
    (link, order), key = record.id_set, record.id_column
    pair = record.pair_column
    lo, hi = (int(keys.min()), int(keys.max())) if len(keys) else (0, -1)
    table = con.sql(  # lo, hi are ints
        f"SELECT {key} AS k, sample_id{f', {pair} AS pair' if pair else ''} FROM {link} "
        f"WHERE {key} BETWEEN {lo} AND {hi} ORDER BY {key}, {order}"
    ).to_arrow_table()
    values = table.column("pair") if pair else None
    return _link_roots(table.column("k").to_numpy(), table.column("sample_id").to_numpy(), values)


def _with_id_roots(kind: str, cols: dict[str, list], roots: dict[int, str]) -> None:
    """Add the kind's computed id-set root column to `cols`, one value per `ref_id` (an empty set's root where a
    row links no sample)."""
    cols[BY_KIND[kind].computed[0]] = [roots.get(r, _EMPTY_SET_ROOT) for r in cols["ref_id"]]


def entries_of_rows(kind: str, rows: pa.Table, links: pa.Table | None = None) -> list[Entry]:
    """(ref_id, ref_key, entry bytes) for rows held in memory, as `iter_entries` yields them once the rows are in
    the database: the recorder commits what it writes without reading it back.

    `rows` holds at least the kind's key and entry columns, ordered by key, typed as the table's columns
    (timestamps as Arrow timestamps: the encoder writes them as DuckDB's read-back formats them).  For kinds with
    an id set, `links` holds the link rows of these keys (the key column, ``sample_id`` and the pair column),
    ordered by key, then by the set's order column.  Not for kinds whose computed fields need the database
    (an analysis' result rows, the usage index).
    """
    record = BY_KIND[kind]
    if record.computed and record.id_set is None:
        raise ValueError(f"entries of kind {kind!r} are computed from the database")
    n = rows.num_rows
    cols: dict[str, list] = {
        "ref_id": rows.column(record.id_column).to_pylist() if record.id_column else [None] * n,
        "ref_key": rows.column(record.key_column).to_pylist() if record.key_column else [None] * n,
    }
    for c in dict.fromkeys(record.columns):
        cols[c] = rows.column(c).to_pylist()
    if record.id_set is not None:
        assert links is not None and record.id_column is not None
        values = links.column(record.pair_column) if record.pair_column else None
        keys = links.column(record.id_column).to_numpy()
        _with_id_roots(kind, cols, _link_roots(keys, links.column("sample_id").to_numpy(), values))
    return list(zip(cols["ref_id"], cols["ref_key"], encode_columns(kind, cols), strict=True))


def _analysis_roots(con: duckdb.DuckDBPyConnection, analysis_ids: list[int]) -> dict[int, str]:
    """`rows_root` of each analysis: the RFC 9162 root over the leaf hashes of its result entries, recomputed
    from the result rows (RESULT_KINDS order, then row_id order)."""
    wanted = sorted(set(analysis_ids))
    leaves: dict[int, list[bytes]] = {a: [] for a in wanted}
    for kind in RESULT_KINDS:
        table = ENTRY_KINDS[kind][0]
        lo, hi = con.execute(
            f"SELECT min(row_id), max(row_id) FROM {table} WHERE analysis_id BETWEEN ? AND ?",
            [wanted[0], wanted[-1]],
        ).fetchall()[0]
        if lo is None:
            continue
        owner = con.execute(
            f"SELECT analysis_id FROM {table} WHERE row_id BETWEEN ? AND ? ORDER BY row_id", [lo, hi]
        ).fetchnumpy()["analysis_id"]
        for a, (_, _, entry) in zip(owner.tolist(), iter_entries(con, kind, key_range=(lo, hi)), strict=True):
            if a in leaves:
                leaves[a].append(leaf_hash(entry))
    return {a: root_from_leaf_hashes(h).hex() for a, h in leaves.items()}


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
    sql = _SELECT[kind]
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
        record = BY_KIND[kind]
        if record.id_set is not None:
            _with_id_roots(kind, cols, _id_roots(con, kind, np.asarray(cols["ref_id"], dtype=np.int64)))
        elif kind == "analysis":
            roots = _analysis_roots(con, cols["ref_id"])
            cols["rows_root"] = [roots[r] for r in cols["ref_id"]]
        elif kind == "usage_index":
            indexes = {size: read_usage_index(con, size) for size in set(cols["ledger_size"])}
            cols["n_samples"] = [len(indexes[s].usage_leaves) for s in cols["ledger_size"]]
            cols["n_uses"] = [indexes[s].n_uses for s in cols["ledger_size"]]
            cols["usage_root"] = [indexes[s].usage_root.hex() for s in cols["ledger_size"]]
            cols["content_root"] = [indexes[s].content_root.hex() for s in cols["ledger_size"]]
        yield from zip(cols["ref_id"], cols["ref_key"], encode_columns(kind, cols), strict=True)


def table_of(kind: str) -> str:
    return ENTRY_KINDS[kind][0]


def _json_sql(column: str, duck_type: str) -> str:
    """SQL for one column's canonical JSON text (mirrors `fgtrac_core.ledger.entries`' encoder)."""
    c = f'q."{column}"'
    if duck_type in ("DOUBLE", "FLOAT"):
        return (
            f"CASE WHEN {c} IS NULL THEN 'null' WHEN isnan({c}) THEN '\"NaN\"' "
            f"WHEN isinf({c}) AND {c} > 0 THEN '\"Infinity\"' WHEN isinf({c}) THEN '\"-Infinity\"' "
            f"ELSE {c}::VARCHAR END"
        )
    if duck_type in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UBIGINT", "UINTEGER"):
        return f"coalesce({c}::VARCHAR, 'null')"
    if duck_type == "BOOLEAN":
        return f"CASE WHEN {c} IS NULL THEN 'null' WHEN {c} THEN 'true' ELSE 'false' END"
    if duck_type == "VARCHAR":
        return f"coalesce(to_json({c})::VARCHAR, 'null')"
    raise TypeError(f"no SQL encoding for {duck_type}")


def count_mismatches(con: duckdb.DuckDBPyConnection, kind: str) -> int | None:
    """Rows of `kind` whose entry, encoded by DuckDB, differs from the stored ledger entry — plus ledger entries
    without a row, rows without an entry, and duplicate entries.  0 means every entry of this kind is verified.

    A vectorised fast path for verification: it runs inside DuckDB, in parallel.  Its JSON formatting mirrors the
    Python encoder but is not the specification, so a non-zero count only means "recheck this kind with
    `iter_entries`" (which may still find everything in order).  None for kinds whose entries hold Merkle roots
    over id sets, which only the Python path computes.
    """
    if kind in _PYTHON_ONLY:
        return None
    sql = _SELECT[kind]
    types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE {sql})").fetchall())
    pieces = []
    for name, col in sorted([("kind", None), ("v", None), *ENTRY_FIELDS[kind]], key=lambda f: f[0]):
        key = json_string(name) + ":"
        if col is None:
            value = str(ENCODING_VERSION) if name == "v" else json_string(kind)
            pieces.append("'" + (key + value).replace("'", "''") + "'")
        else:
            pieces.append("'" + key.replace("'", "''") + "' || " + _json_sql(col, types[col]))
    text = " || ',' || ".join(pieces)
    return con.execute(
        f"""WITH e AS (SELECT ref_id, ref_key, encode('{{' || {text} || '}}') AS entry FROM ({sql}) q),
                 l AS (SELECT ref_id, ref_key, entry FROM ledger WHERE kind = ?)
            SELECT (SELECT count(*) FROM l FULL OUTER JOIN e
                        ON l.ref_id IS NOT DISTINCT FROM e.ref_id AND l.ref_key IS NOT DISTINCT FROM e.ref_key
                    WHERE l.entry IS DISTINCT FROM e.entry)
                 + (SELECT count(*) FROM (SELECT 1 FROM l GROUP BY ref_id, ref_key HAVING count(*) > 1))""",
        [kind],
    ).fetchall()[0][0]
