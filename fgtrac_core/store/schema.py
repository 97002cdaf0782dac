"""The versioned DuckDB schema of a run (documented column by column in docs/schema.md).

Every table has a stable key so that each row can be re-encoded as a ledger entry.  Timestamps are naive UTC.
JSON columns hold canonical JSON (sorted keys, compact separators).
"""

from __future__ import annotations

import re
from functools import cache

import duckdb

from fgtrac_core.errors import CorruptRunError, SchemaVersionError, TamperedRunError

SCHEMA_VERSION = 8  # 8: one tree per batch over (id, target), a hash per sample's uses, stages.autocast (docs/schema.md)

_DDL = """
CREATE TABLE meta (
    key VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);
CREATE TABLE run_sessions (
    session_id INTEGER PRIMARY KEY,
    opened_at TIMESTAMP NOT NULL,
    closed_at TIMESTAMP
);
CREATE TABLE samples (
    sample_id BIGINT PRIMARY KEY,
    split VARCHAR NOT NULL,
    label INTEGER,
    content_sha256 VARCHAR NOT NULL,
    thumbnail BLOB,
    thumbnail_sha256 VARCHAR,
    display VARCHAR,
    source VARCHAR,
    registered_at TIMESTAMP NOT NULL
);
CREATE TABLE sample_annotations (
    sample_id BIGINT NOT NULL,
    key VARCHAR NOT NULL,
    value VARCHAR,
    PRIMARY KEY (sample_id, key)
);
CREATE TABLE transforms (
    transform_id INTEGER PRIMARY KEY,
    name VARCHAR NOT NULL,
    params VARCHAR NOT NULL,
    n_samples BIGINT NOT NULL,
    stage_id INTEGER,
    logged_at TIMESTAMP NOT NULL
);
CREATE TABLE transform_samples (
    transform_id INTEGER NOT NULL,
    sample_id BIGINT NOT NULL
);
CREATE TABLE stages (
    stage_id INTEGER PRIMARY KEY,
    name VARCHAR NOT NULL UNIQUE,
    optimizer VARCHAR NOT NULL,
    hparams VARCHAR NOT NULL,
    lr_schedule VARCHAR NOT NULL,
    start_step BIGINT NOT NULL,
    end_step BIGINT,
    status VARCHAR NOT NULL,
    started_at TIMESTAMP NOT NULL,
    ended_at TIMESTAMP,
    autocast VARCHAR
);
CREATE TABLE batches (
    batch_id BIGINT PRIMARY KEY,
    step BIGINT NOT NULL,
    stage_id INTEGER NOT NULL,
    epoch INTEGER,
    lr DOUBLE,
    group_lrs VARCHAR,
    loss DOUBLE,
    n_samples INTEGER NOT NULL
);
CREATE TABLE batch_samples (
    batch_id BIGINT NOT NULL,
    position INTEGER NOT NULL,
    sample_id BIGINT NOT NULL,
    target INTEGER
);
CREATE TABLE optimizer_steps (
    step BIGINT PRIMARY KEY,
    stage_id INTEGER NOT NULL,
    hparams VARCHAR NOT NULL,
    clip VARCHAR,
    grads_altered BOOLEAN NOT NULL,
    param_fingerprint DOUBLE,
    forward_seeds VARCHAR
);
CREATE TABLE checkpoints (
    checkpoint_id INTEGER PRIMARY KEY,
    step BIGINT NOT NULL,
    stage_id INTEGER,
    epoch INTEGER,
    kind VARCHAR NOT NULL,
    lr DOUBLE,
    val_loss DOUBLE,
    metrics VARCHAR NOT NULL,
    optimizer VARCHAR,
    path VARCHAR NOT NULL,
    sha256 VARCHAR NOT NULL,
    size_bytes BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE TABLE analyses (
    analysis_id INTEGER PRIMARY KEY,
    kind VARCHAR NOT NULL,
    method VARCHAR NOT NULL,
    params VARCHAR NOT NULL,
    checkpoints VARCHAR NOT NULL,
    n_rows BIGINT NOT NULL,
    seconds DOUBLE,
    created_at TIMESTAMP NOT NULL
);
CREATE TABLE influence_tests (
    row_id BIGINT PRIMARY KEY,
    analysis_id INTEGER NOT NULL,
    sample_id BIGINT NOT NULL,
    label INTEGER,
    prediction INTEGER,
    confidence DOUBLE,
    loss DOUBLE
);
CREATE TABLE influence_topk (
    row_id BIGINT PRIMARY KEY,
    analysis_id INTEGER NOT NULL,
    test_id BIGINT NOT NULL,
    view VARCHAR NOT NULL,
    direction VARCHAR NOT NULL,
    rank INTEGER NOT NULL,
    train_id BIGINT NOT NULL,
    score DOUBLE NOT NULL,
    cosine DOUBLE NOT NULL,
    contributions VARCHAR NOT NULL
);
CREATE TABLE self_influence (
    row_id BIGINT PRIMARY KEY,
    analysis_id INTEGER NOT NULL,
    sample_id BIGINT NOT NULL,
    value DOUBLE NOT NULL,
    rank INTEGER NOT NULL
);
CREATE TABLE stage_effects (
    row_id BIGINT PRIMARY KEY,
    analysis_id INTEGER NOT NULL,
    method VARCHAR NOT NULL,
    behaviour VARCHAR NOT NULL,
    test_id BIGINT NOT NULL,
    stage_id INTEGER NOT NULL,
    value DOUBLE
);
CREATE TABLE stage_aggregates (
    row_id BIGINT PRIMARY KEY,
    analysis_id INTEGER NOT NULL,
    method VARCHAR NOT NULL,
    behaviour VARCHAR NOT NULL,
    slice VARCHAR NOT NULL,
    stage_id INTEGER NOT NULL,
    value DOUBLE,
    n INTEGER NOT NULL
);
CREATE TABLE stage_faithfulness (
    row_id BIGINT PRIMARY KEY,
    analysis_id INTEGER NOT NULL,
    method VARCHAR NOT NULL,
    horizon INTEGER,
    stage_id INTEGER,
    pearson DOUBLE,
    spearman DOUBLE,
    sign_agreement DOUBLE,
    top1_agreement DOUBLE,
    aggregate_error DOUBLE,
    seconds DOUBLE,
    reference_seconds DOUBLE,
    confidence DOUBLE
);
CREATE TABLE usage_indexes (
    index_id INTEGER PRIMARY KEY,
    ledger_size BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE TABLE ledger (
    seq BIGINT PRIMARY KEY,
    kind VARCHAR NOT NULL,
    ref_id BIGINT,
    ref_key VARCHAR,
    entry BLOB NOT NULL,
    leaf_hash BLOB NOT NULL,
    chain_hash BLOB NOT NULL
);
CREATE TABLE tree_heads (
    sth_id INTEGER PRIMARY KEY,
    run_id VARCHAR NOT NULL,
    tree_size BIGINT NOT NULL,
    root VARCHAR NOT NULL,
    chain_head VARCHAR NOT NULL,
    timestamp VARCHAR NOT NULL,
    key_fingerprint VARCHAR NOT NULL,
    signature VARCHAR NOT NULL
);
"""

# Secondary indexes for the per-sample reads of the tables that grow with the data (a sample's uses on the lifecycle
# page and in its proofs, its self-influence, its annotations and transforms): point lookups through an index
# instead of a scan of every row (zone maps narrow those scans only while rows were logged in id order; the
# annotations' primary key leads with sample_id but DuckDB answers only whole-key lookups from it).  They are built
# when a recording session closes (`create_lookup_indexes`), not with the tables: each insert during recording
# would otherwise maintain them on the writer's clock.  A run may hold all, some or none of them.
_LOOKUP_INDEXES = """
CREATE INDEX IF NOT EXISTS batch_samples_by_sample ON batch_samples (sample_id);
CREATE INDEX IF NOT EXISTS self_influence_by_sample ON self_influence (sample_id);
CREATE INDEX IF NOT EXISTS sample_annotations_by_sample ON sample_annotations (sample_id);
CREATE INDEX IF NOT EXISTS transform_samples_by_sample ON transform_samples (sample_id);
"""

# every base table, in declaration order
TABLES: tuple[str, ...] = tuple(re.findall(r"^CREATE TABLE (\w+) \(", _DDL, flags=re.MULTILINE))

# the catalog as DuckDB reports it, scoped to the run's database; `check_catalog` compares these exactly
_CATALOG_QUERIES: dict[str, str] = {
    "table": """SELECT schema_name || '.' || table_name, temporary FROM duckdb_tables()
                WHERE database_name = current_database() ORDER BY ALL""",
    "column": """SELECT table_name || '.' || column_name, column_index, data_type, is_nullable, column_default
                 FROM duckdb_columns() WHERE database_name = current_database() ORDER BY ALL""",
    "constraint": """SELECT table_name, constraint_type, constraint_text, constraint_column_names::VARCHAR
                     FROM duckdb_constraints() WHERE database_name = current_database() ORDER BY ALL""",
    "view": """SELECT schema_name || '.' || view_name FROM duckdb_views()
               WHERE database_name = current_database() AND NOT internal ORDER BY ALL""",
    "macro": """SELECT DISTINCT schema_name || '.' || function_name FROM duckdb_functions()
                WHERE database_name = current_database() AND NOT internal ORDER BY ALL""",
    "sequence": """SELECT schema_name || '.' || sequence_name FROM duckdb_sequences()
                   WHERE database_name = current_database() ORDER BY ALL""",
    "index": """SELECT table_name || '.' || index_name, sql FROM duckdb_indexes()
                WHERE database_name = current_database() ORDER BY ALL""",
    "type": """SELECT schema_name || '.' || type_name FROM duckdb_types()
               WHERE database_name = current_database() AND NOT internal ORDER BY ALL""",
    "schema": """SELECT schema_name FROM duckdb_schemas()
                 WHERE database_name = current_database() AND NOT internal ORDER BY ALL""",
}


def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create all tables in an empty database and stamp the schema version."""
    con.execute(_DDL)
    con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])


def create_lookup_indexes(con: duckdb.DuckDBPyConnection) -> None:
    """Build the per-sample lookup indexes that are missing (those present are kept up to date by DuckDB)."""
    con.execute(_LOOKUP_INDEXES)


def check_schema(con: duckdb.DuckDBPyConnection, where: str) -> None:
    """Raise a one-line error unless `con` holds an fgtrac run of this schema version (read from `meta` only once
    it is known to be a base table: a planted view must not run before `check_catalog` names it)."""
    is_table = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = 'main' AND table_name = 'meta'"
    ).fetchall()[0][0]
    if not is_table:
        raise CorruptRunError(f"{where} is a DuckDB file but not an fgtrac run (no meta table)")
    try:
        rows = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        row = rows[0] if rows else None
    except duckdb.CatalogException:
        raise CorruptRunError(f"{where} is a DuckDB file but not an fgtrac run (no meta table)") from None
    if row is None:
        raise CorruptRunError(f"{where} has no schema version; it is not an fgtrac run")
    if row[0] != str(SCHEMA_VERSION):
        raise SchemaVersionError(
            f"{where} has schema version {row[0]}, but this fgtrac reads version {SCHEMA_VERSION}"
        )


def _catalog(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple]]:
    return {what: con.execute(sql).fetchall() for what, sql in _CATALOG_QUERIES.items()}


@cache
def _expected_catalog() -> dict[str, list[tuple]]:
    """The catalog of a run holding every lookup index (a run may lack any of them: see `check_catalog`)."""
    con = duckdb.connect(":memory:")
    try:
        create_schema(con)
        create_lookup_indexes(con)
        return _catalog(con)
    finally:
        con.close()


def check_catalog(con: duckdb.DuckDBPyConnection, where: str) -> None:
    """Raise TamperedRunError unless the database holds exactly fgtrac's base tables, columns, types and
    constraints, and nothing else.

    A view, macro, sequence, index, user type, extra schema or table, or a changed column (type, default,
    nullability) could make what a query returns depend on who asks (e.g. a view that consults
    `current_query()` shows the verifier the recorded rows and everyone else forged ones), so none is allowed.
    The only indexes allowed are fgtrac's lookup indexes, each exactly as `create_lookup_indexes` defines it;
    a run closed before they existed, or never closed, lacks them.
    """
    want = _expected_catalog()
    for what, got in _catalog(con).items():
        expected = want[what]
        if got == expected:
            continue
        extra = [r for r in got if r not in expected]
        missing = [] if what == "index" else [r for r in expected if r not in got]
        if not extra and not missing:
            continue
        if extra:
            detail = f"unexpected {what} {_name(extra[0])}"
        else:
            detail = f"{what} {_name(missing[0])} is missing or changed"
        raise TamperedRunError(
            f"{where}: {detail}; the database was altered outside fgtrac (tampering), refusing to read it"
        )


def _name(row: tuple) -> str:
    return repr(row[0]) if len(row) == 1 or row[0] is not None else repr(row)


@cache
def column_types(table: str) -> dict[str, str]:
    """Column name -> DuckDB type name of one of fgtrac's tables, in declaration order, as the schema declares it
    (empty for a table the schema lacks).

    From the schema itself, not a database: asking a connection costs a catalog bind (~4 ms), and a run
    database's catalog is checked to equal the schema's when it is opened."""
    prefix = table + "."
    cols = [(index, name[len(prefix) :], dtype) for name, index, dtype, _, _ in _expected_catalog()["column"]
            if name.startswith(prefix)]  # fmt: skip
    return {name: dtype for _, name, dtype in sorted(cols)}


def column_order(table: str) -> tuple[str, ...]:
    """The columns of one of fgtrac's tables in declaration order (empty for a table the schema lacks)."""
    return tuple(column_types(table))
