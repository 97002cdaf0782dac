"""`fgtrac verify` end to end: the intact sample run, a tamper campaign over every table and column,
row-level attacks, checkpoint files, and unusable input."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest

from fgtrac_core.errors import SchemaVersionError
from fgtrac_core.ledger.entries import ENTRY_KINDS
from fgtrac_core.store.schema import TABLES, create_schema
from fgtrac_core.verify import VerifyReport, verify_run
from tests.conftest import run_cli

# the key each table's rows are ordered (and named) by; link tables have no primary key
_KEYS: dict[str, tuple[str, ...]] = {
    "meta": ("key",),
    "run_sessions": ("session_id",),
    "samples": ("sample_id",),
    "sample_annotations": ("sample_id", "key"),
    "transforms": ("transform_id",),
    "transform_samples": ("transform_id", "sample_id"),
    "stages": ("stage_id",),
    "batches": ("batch_id",),
    "batch_samples": ("batch_id", "position"),
    "optimizer_steps": ("step",),
    "checkpoints": ("checkpoint_id",),
    "analyses": ("analysis_id",),
    "influence_tests": ("row_id",),
    "influence_topk": ("row_id",),
    "self_influence": ("row_id",),
    "stage_effects": ("row_id",),
    "stage_aggregates": ("row_id",),
    "stage_faithfulness": ("row_id",),
    "usage_indexes": ("index_id",),
    "ledger": ("seq",),
    "tree_heads": ("sth_id",),
}
# link table -> (the table whose ledger entry commits its id set, the shared key column)
_LINKS = {"batch_samples": ("batches", "batch_id"), "transform_samples": ("transforms", "transform_id")}
# ledger columns whose change the chain/sequence checks report against the ledger table itself; a change to
# entry / ref_id / ref_key is reported against the table of the entry's row (entries are recomputed from rows),
# or, when the new key duplicates another entry's, against the ledger row as a second entry for that row
_LEDGER_SELF = {"seq", "kind", "leaf_hash", "chain_hash"}


def _schema_columns() -> list[tuple[str, str, str]]:
    """(table, column, type) of every column, read from a schema-only in-memory database."""
    con = duckdb.connect()
    try:
        create_schema(con)
        rows = con.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "ORDER BY table_name, ordinal_position"
        ).fetchall()
    finally:
        con.close()
    order = {t: i for i, t in enumerate(TABLES)}
    return sorted(((t, c, d) for t, c, d in rows if t in order), key=lambda r: order[r[0]])


_COLUMNS = _schema_columns()


def _column_param(table: str, column: str, dtype: str) -> Any:
    return pytest.param(table, column, dtype, id=f"{table}.{column}")


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def snap_copy(digits_run: Path, tmp_path: Path) -> Path:
    """A damageable copy of the sample run holding only what readers use: the snapshot and checkpoint files."""
    dst = tmp_path / "run"
    dst.mkdir()
    shutil.copy2(digits_run / "snapshot.duckdb", dst / "snapshot.duckdb")
    shutil.copytree(digits_run / "checkpoints", dst / "checkpoints")
    return dst


def _changed(value: Any, dtype: str) -> Any:
    """A different value of the same type."""
    if value is None:
        fresh = {"BIGINT": 1, "INTEGER": 1, "DOUBLE": 1.0, "VARCHAR": "x", "BLOB": b"x", "BOOLEAN": True}
        return fresh.get(dtype, dt.datetime(2000, 1, 1))
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return 1.0 if math.isnan(value) else value * 1.5 + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, dt.datetime):
        return value + dt.timedelta(seconds=1)
    if isinstance(value, bytes):
        b = bytearray(value)
        b[len(b) // 2] ^= 0x01
        return bytes(b)
    raise TypeError(f"no change rule for {type(value).__name__}")


def _flip_hex(text: str, index: int | None = None) -> str:
    """`text` with one hex digit changed (the middle hex digit by default)."""
    if index is None:
        index = len(text) // 2
    while text[index] not in "0123456789abcdef":
        index += 1
    return text[:index] + format(int(text[index], 16) ^ 1, "x") + text[index + 1 :]


def _middle_row(con: duckdb.DuckDBPyConnection, table: str) -> tuple[int, dict[str, Any]] | None:
    """(rowid, row) of the middle row of `table` by its key, or None for an empty table."""
    (n,) = con.execute(f"SELECT count(*) FROM {table}").fetchone()
    if n == 0:
        return None
    cur = con.execute(
        f"SELECT rowid AS _rowid, * FROM {table} ORDER BY {', '.join(_KEYS[table])} LIMIT 1 OFFSET ?",
        [n // 2],
    )
    names = [d[0] for d in cur.description]
    row = dict(zip(names, cur.fetchone(), strict=True))
    return row.pop("_rowid"), row


def _set_value(con: duckdb.DuckDBPyConnection, table: str, column: str, rowid: int, new: Any) -> Any:
    """Update one cell; a changed key that collides with another row's key takes a fresh value instead."""
    try:
        con.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", [new, rowid])
    except duckdb.ConstraintException:
        (new,) = con.execute(f"SELECT max({column}) + 1 FROM {table}").fetchone()
        con.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", [new, rowid])
    (hits,) = con.execute(
        f"SELECT count(*) FROM {table} WHERE {column} IS NOT DISTINCT FROM ?", [new]
    ).fetchone()
    assert hits >= 1
    return new


def _tamper_cell(
    db: Path, table: str, column: str, change: Callable[[Any], Any]
) -> tuple[dict[str, Any], Any] | None:
    """Change `column` in the middle row of `table`; returns (row before, new value), None if the table is empty."""
    con = duckdb.connect(str(db))
    try:
        found = _middle_row(con, table)
        if found is None:
            return None
        rowid, row = found
        new = change(row[column])
        assert new != row[column]
        return row, _set_value(con, table, column, rowid, new)
    finally:
        con.close()


Expected = tuple[set[str], list[set[str]]]


def _expected_failure(table: str, column: str, before: dict[str, Any], new: Any) -> Expected:
    """Tables the first failure may name, and for each key part of its row the accepted `key=value` texts
    (the value before or after the change; `*` matches any prefix or suffix)."""

    def named(key: str) -> set[str]:
        return {f"{key}={before[key]}", f"{key}={new}"} if column == key else {f"{key}={before[key]}"}

    if table in _LINKS:
        parent, key = _LINKS[table]
        return {table, parent}, [named(key)]
    if table == "ledger":
        if column in _LEDGER_SELF:
            return {"ledger"}, [{"seq=*"} if column == "seq" else {f"seq={before['seq']}"}]
        ref_table = ENTRY_KINDS[before["kind"]][0]
        refs = {before["ref_id"], new} if column == "ref_id" else {before["ref_id"]}
        accepted = {f"*={r}" for r in refs if r is not None} or {f"*={before['ref_key']}"}
        return {ref_table, "ledger"}, [accepted | {f"seq={before['seq']}"}]
    return {table}, [named(k) for k in _KEYS[table]]


def _row_parts(row: str | None) -> list[str]:
    """The `key=value` parts of a failure's row text, e.g. "row sample_id=3, key=x" -> [sample_id=3, key=x]."""
    assert row is not None and row.startswith(("row ", "rows ")), row
    return row.split(" ", 1)[1].split(", ")


def _matches(part: str, accepted: set[str]) -> bool:
    return any(
        part == a
        or (a.endswith("*") and part.startswith(a[:-1]))
        or (a.startswith("*") and part.endswith(a[1:]))
        for a in accepted
    )


def _assert_detected(report: VerifyReport, tables: set[str], row_keys: list[set[str]]) -> None:
    f = report.first_failure
    assert report.ok is False and f is not None, "the change verified as intact"
    assert f.table in tables, f
    parts = _row_parts(f.row)
    assert all(any(_matches(p, accepted) for p in parts) for accepted in row_keys), (f, row_keys)
    assert any(c.name == f.check and c.ok is False for c in report.checks), report.checks


def _verify_cli(run: Path, *extra: str) -> tuple[int, str]:
    """Exit code and the TAMPERED: line (or "") of `fgtrac verify RUN`."""
    proc = run_cli("verify", str(run), *extra)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TAMPERED:")]
    assert len(lines) <= 1, proc.stdout
    return proc.returncode, lines[0] if lines else ""


def _assert_usage_error(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fgtrac: error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# ---------------------------------------------------------------------------------------------- intact


def test_intact_run_verifies(digits_run: Path) -> None:
    """The sample run verifies: text and JSON output, every check passes, the ledger covers every entry."""
    proc = run_cli("verify", str(digits_run))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Ledger intact" in proc.stdout and "TAMPERED" not in proc.stdout

    proc = run_cli("verify", str(digits_run), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["first_failure"] is None
    for check in report["checks"]:
        assert check["ok"] in ((True, None) if check["name"] == "source_data" else (True,)), check
    assert report["n_entries"] == report["tree_size"] > 3000
    assert report["key_pinned"] is False


def test_intact_run_python_api(digits_run: Path) -> None:
    """verify_run on the untouched run reports ok with no failure."""
    report = verify_run(digits_run)
    assert report.ok and report.first_failure is None
    assert {c.name for c in report.checks} >= {"ledger", "entries", "chain", "signatures", "checkpoint_files"}


# ---------------------------------------------------------------------------------------------- tamper campaign


@pytest.mark.parametrize(("table", "column", "dtype"), [_column_param(*c) for c in _COLUMNS])
def test_tamper_every_column(snap_copy: Path, table: str, column: str, dtype: str) -> None:
    """One changed value in the middle row of any table, in any column, is detected and located."""
    done = _tamper_cell(snap_copy / "snapshot.duckdb", table, column, lambda v: _changed(v, dtype))
    if done is None:
        pytest.skip(f"{table} has no rows in the sample run")
    before, new = done
    _assert_detected(verify_run(snap_copy), *_expected_failure(table, column, before, new))


def test_campaign_covers_every_table(digits_run: Path) -> None:
    """The campaign's columns (from the schema) span all tables and are exactly the sample run's columns."""
    assert {t for t, _, _ in _COLUMNS} == set(TABLES) == set(_KEYS)
    assert len(_COLUMNS) > 60
    with duckdb.connect(str(digits_run / "snapshot.duckdb"), read_only=True) as con:
        actual = con.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
        ).fetchall()
        empty = [t for t in TABLES if con.execute(f"SELECT count(*) FROM {t}").fetchone() == (0,)]
    assert sorted(actual) == sorted(_COLUMNS)
    assert not empty, f"the sample run leaves {empty} empty, so the campaign skips them"


_HEX_COLUMNS = [
    ("samples", "content_sha256"),
    ("samples", "thumbnail_sha256"),
    ("checkpoints", "sha256"),
    ("tree_heads", "root"),
    ("tree_heads", "chain_head"),
    ("tree_heads", "signature"),
    ("tree_heads", "key_fingerprint"),
    ("tree_heads", "run_id"),
]


@pytest.mark.parametrize(("table", "column"), _HEX_COLUMNS, ids=[f"{t}.{c}" for t, c in _HEX_COLUMNS])
def test_tamper_hex_digit(snap_copy: Path, table: str, column: str) -> None:
    """A well-formed change to a hash (one hex digit) is detected, not just a malformed one."""
    done = _tamper_cell(snap_copy / "snapshot.duckdb", table, column, _flip_hex)
    assert done is not None
    before, new = done
    _assert_detected(verify_run(snap_copy), *_expected_failure(table, column, before, new))


def test_tamper_every_meta_value(snap_copy: Path, tmp_path: Path) -> None:
    """Changing the value of any meta key is detected (a changed schema version is refused as unreadable)."""
    with duckdb.connect(str(snap_copy / "snapshot.duckdb"), read_only=True) as con:
        keys = [k for (k,) in con.execute("SELECT key FROM meta ORDER BY key").fetchall()]
    assert {"schema_version", "run_id", "config", "signer_public_key", "signer_fingerprint"} <= set(keys)
    problems = []
    for key in keys:
        run = tmp_path / f"meta-{key}"
        shutil.copytree(snap_copy, run)
        with duckdb.connect(str(run / "snapshot.duckdb")) as con:
            con.execute("UPDATE meta SET value = value || 'x' WHERE key = ?", [key])
        if key == "schema_version":
            with pytest.raises(SchemaVersionError):
                verify_run(run)
            continue
        report = verify_run(run)
        f = report.first_failure
        if report.ok or f is None or f.table != "meta" or f"key={key}" not in (f.row or ""):
            problems.append(f"{key}: ok={report.ok} first_failure={f}")
        shutil.rmtree(run)
    assert not problems, problems


_FORGED_PNG = b"\x89PNG\r\n\x1a\nforged"
_FIRST_SAMPLE = "(SELECT min(sample_id) FROM samples)"


def _sql_cases() -> list[Any]:
    """Hand-made changes: NULLs, consistent rewrites, valid JSON, reordered ledger rows, removed heads."""
    return [
        pytest.param([(f"UPDATE samples SET thumbnail = NULL WHERE sample_id = {_FIRST_SAMPLE}", [])],
                     "samples", "thumbnail", id="thumbnail-null"),
        pytest.param([(f"UPDATE samples SET thumbnail = ?, thumbnail_sha256 = ? WHERE sample_id = {_FIRST_SAMPLE}",
                       [_FORGED_PNG, hashlib.sha256(_FORGED_PNG).hexdigest()])],
                     "samples", "thumbnail_sha256", id="thumbnail-and-its-hash-rewritten"),
        pytest.param([("UPDATE meta SET value = json_object('seed', 12345)::VARCHAR WHERE key = 'config'", [])],
                     "meta", "value", id="config-valid-json"),
        pytest.param([("UPDATE checkpoints SET path = (SELECT path FROM checkpoints WHERE checkpoint_id = 0) "
                       "WHERE checkpoint_id = 1", [])],
                     "checkpoints", "path", id="checkpoint-path-to-another-file"),
        pytest.param([("UPDATE ledger SET seq = -1 WHERE seq = 100", []),
                      ("UPDATE ledger SET seq = 100 WHERE seq = 101", []),
                      ("UPDATE ledger SET seq = 101 WHERE seq = -1", [])],
                     "ledger", "chain_hash", id="two-ledger-rows-swapped"),
        pytest.param([("DELETE FROM tree_heads WHERE sth_id = (SELECT max(sth_id) FROM tree_heads)", [])],
                     "ledger", None, id="last-tree-head-deleted"),
        pytest.param([("UPDATE stages SET status = 'running' WHERE stage_id = 0", [])],
                     "stages", None, id="stage-reopened"),
    ]  # fmt: skip


@pytest.mark.parametrize(("sqls", "table", "field"), _sql_cases())
def test_tamper_special(
    snap_copy: Path, sqls: list[tuple[str, list[Any]]], table: str, field: str | None
) -> None:
    """Less obvious single-row changes are detected too."""
    with duckdb.connect(str(snap_copy / "snapshot.duckdb")) as con:
        for sql, params in sqls:
            con.execute(sql, params)
    report = verify_run(snap_copy)
    f = report.first_failure
    assert report.ok is False and f is not None
    assert f.table == table, f
    if field is not None:
        assert f.field == field, f


def _position_cases() -> list[Any]:
    last = "(SELECT max(position) FROM batch_samples WHERE batch_id = 7)"
    return [
        pytest.param([f"UPDATE batch_samples SET position = position + 1 WHERE batch_id = 7 AND position = {last}"],
                     id="last-position-plus-one"),
        pytest.param(["UPDATE batch_samples SET position = position * 10 + 5 WHERE batch_id = 7"],
                     id="positions-renumbered"),
    ]  # fmt: skip


@pytest.mark.parametrize("sqls", _position_cases())
def test_tamper_batch_position(snap_copy: Path, sqls: list[str]) -> None:
    """Rewriting batch_samples.position (the reported position of a sample in its batch) must be detected."""
    with duckdb.connect(str(snap_copy / "snapshot.duckdb")) as con:
        for sql in sqls:
            con.execute(sql)
        assert con.execute("SELECT count(*) FROM batch_samples WHERE batch_id = 7").fetchone()[0] > 1
    report = verify_run(snap_copy)
    assert report.ok is False, "batch_samples.position changed but the run verifies as intact"


# ---------------------------------------------------------------------------------------------- row attacks


Attack = Callable[[duckdb.DuckDBPyConnection], tuple[set[str], str]]


def _one(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> Any:
    return con.execute(sql, params or []).fetchone()[0]


def _mid(con: duckdb.DuckDBPyConnection, table: str, key: str) -> int:
    return int(_one(con, f"SELECT quantile_disc({key}, 0.5) FROM {table}"))


def _delete_row(table: str, key: str) -> Attack:
    def attack(con: duckdb.DuckDBPyConnection) -> tuple[set[str], str]:
        k = _mid(con, table, key)
        con.execute(f"DELETE FROM {table} WHERE {key} = ?", [k])
        return {table}, f"{key}={k}"

    return attack


def _delete_batch_sample(con: duckdb.DuckDBPyConnection) -> tuple[set[str], str]:
    b = _mid(con, "batches", "batch_id")
    con.execute("DELETE FROM batch_samples WHERE batch_id = ? AND position = 1", [b])
    return {"batches", "batch_samples"}, f"batch_id={b}"


def _insert_sample(con: duckdb.DuckDBPyConnection) -> tuple[set[str], str]:
    new = _one(con, "SELECT max(sample_id) + 1 FROM samples")
    con.execute(
        "INSERT INTO samples SELECT ?, split, label, content_sha256, thumbnail, thumbnail_sha256, display, source, "
        "registered_at FROM samples WHERE sample_id = (SELECT min(sample_id) FROM samples)",
        [new],
    )
    return {"samples"}, f"sample_id={new}"


def _insert_batch_sample(con: duckdb.DuckDBPyConnection) -> tuple[set[str], str]:
    b = _mid(con, "batches", "batch_id")
    pos = _one(con, "SELECT max(position) + 1 FROM batch_samples WHERE batch_id = ?", [b])
    con.execute("INSERT INTO batch_samples VALUES (?, ?, (SELECT min(sample_id) FROM samples), NULL)", [b, pos])
    return {"batches", "batch_samples"}, f"batch_id={b}"


def _insert_orphan_batch_sample(con: duckdb.DuckDBPyConnection) -> tuple[set[str], str]:
    b = _one(con, "SELECT max(batch_id) + 1000 FROM batches")
    con.execute("INSERT INTO batch_samples VALUES (?, 0, (SELECT min(sample_id) FROM samples), NULL)", [b])
    return {"batch_samples"}, f"batch_id={b}"


def _swap_batch_samples(con: duckdb.DuckDBPyConnection) -> tuple[set[str], str]:
    b = _mid(con, "batches", "batch_id")
    (a0, a1) = (_one(con, "SELECT sample_id FROM batch_samples WHERE batch_id = ? AND position = ?", [b, p])
                for p in (0, 1))  # fmt: skip
    assert a0 != a1
    con.execute("UPDATE batch_samples SET sample_id = ? WHERE batch_id = ? AND position = 0", [a1, b])
    con.execute("UPDATE batch_samples SET sample_id = ? WHERE batch_id = ? AND position = 1", [a0, b])
    return {"batches", "batch_samples"}, f"batch_id={b}"


def _swap_content_hashes(con: duckdb.DuckDBPyConnection) -> tuple[set[str], str]:
    s = _mid(con, "samples", "sample_id")
    h0, h1 = (_one(con, "SELECT content_sha256 FROM samples WHERE sample_id = ?", [i]) for i in (s, s + 1))
    assert h0 != h1
    con.execute("UPDATE samples SET content_sha256 = ? WHERE sample_id = ?", [h1, s])
    con.execute("UPDATE samples SET content_sha256 = ? WHERE sample_id = ?", [h0, s + 1])
    return {"samples"}, f"sample_id={s}"


def _truncate_ledger(n: int, heads_too: bool) -> Attack:
    def attack(con: duckdb.DuckDBPyConnection) -> tuple[set[str], str]:
        cut = _one(con, "SELECT count(*) FROM ledger") - n
        kinds = {k for (k,) in con.execute("SELECT kind FROM ledger WHERE seq >= ?", [cut]).fetchall()}
        con.execute("DELETE FROM ledger WHERE seq >= ?", [cut])
        if heads_too:
            con.execute("DELETE FROM tree_heads WHERE tree_size > ?", [cut])
            assert _one(con, "SELECT count(*) FROM tree_heads") > 0
        return {"ledger"} | {ENTRY_KINDS[k][0] for k in kinds}, ""

    return attack


_ROW_ATTACKS: dict[str, Attack] = {
    "delete-sample": _delete_row("samples", "sample_id"),
    "delete-batch": _delete_row("batches", "batch_id"),
    "delete-batch-sample": _delete_batch_sample,
    "delete-checkpoint": _delete_row("checkpoints", "checkpoint_id"),
    "delete-stage": _delete_row("stages", "stage_id"),
    "insert-sample": _insert_sample,
    "insert-batch-sample": _insert_batch_sample,
    "insert-batch-sample-of-missing-batch": _insert_orphan_batch_sample,
    "swap-batch-sample-ids": _swap_batch_samples,
    "swap-content-hashes": _swap_content_hashes,
    "truncate-ledger": _truncate_ledger(3, heads_too=False),
    "truncate-ledger-and-heads": _truncate_ledger(3, heads_too=True),
}


@pytest.mark.parametrize("name", list(_ROW_ATTACKS))
def test_row_attack(snap_copy: Path, name: str) -> None:
    """Deleted, inserted, reordered and truncated rows: `fgtrac verify` exits 1 naming the table."""
    with duckdb.connect(str(snap_copy / "snapshot.duckdb")) as con:
        tables, text = _ROW_ATTACKS[name](con)
    rc, line = _verify_cli(snap_copy)
    assert rc == 1 and line, line
    assert line.split()[1] in tables, line
    assert text in line, line


def _checkpoint_paths(run: Path) -> list[str]:
    with duckdb.connect(str(run / "snapshot.duckdb"), read_only=True) as con:
        return [p for (p,) in con.execute("SELECT path FROM checkpoints ORDER BY checkpoint_id").fetchall()]


def test_checkpoint_file_byte_edited(snap_copy: Path) -> None:
    """One changed byte in a checkpoint file is reported with the file's path."""
    rel = _checkpoint_paths(snap_copy)[5]
    path = snap_copy / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x80
    path.write_bytes(bytes(data))
    rc, line = _verify_cli(snap_copy)
    assert rc == 1 and line.startswith("TAMPERED: checkpoints ") and rel in line, line


def test_checkpoint_file_deleted(snap_copy: Path) -> None:
    """A missing checkpoint file is reported with its path."""
    rel = _checkpoint_paths(snap_copy)[-1]
    (snap_copy / rel).unlink()
    rc, line = _verify_cli(snap_copy)
    assert rc == 1 and line.startswith("TAMPERED: checkpoints ") and rel in line and "missing" in line, line


def test_checkpoint_files_swapped(snap_copy: Path) -> None:
    """Two checkpoint files with their contents swapped: the first one is reported with its path."""
    paths = _checkpoint_paths(snap_copy)
    a, b = snap_copy / paths[1], snap_copy / paths[2]
    da, db = a.read_bytes(), b.read_bytes()
    assert da != db
    a.write_bytes(db)
    b.write_bytes(da)
    rc, line = _verify_cli(snap_copy)
    assert rc == 1 and line.startswith("TAMPERED: checkpoints ") and paths[1] in line, line


def test_tampered_json_output(snap_copy: Path) -> None:
    """`verify --json` on a tampered run exits 1 and locates the failure."""
    with duckdb.connect(str(snap_copy / "snapshot.duckdb")) as con:
        tables, text = _delete_row("samples", "sample_id")(con)
    proc = run_cli("verify", str(snap_copy), "--json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    assert report["first_failure"]["table"] in tables and text in report["first_failure"]["row"]


# ---------------------------------------------------------------------------------------------- unusable input, keys


def test_missing_run_dir(tmp_path: Path) -> None:
    _assert_usage_error(run_cli("verify", str(tmp_path / "nope")))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_snapshot(snap_copy: Path, damage: str) -> None:
    snap = snap_copy / "snapshot.duckdb"
    data = snap.read_bytes()
    snap.write_bytes(b"not a database " * 1000 if damage == "garbage" else data[: len(data) // 3])
    _assert_usage_error(run_cli("verify", str(snap_copy)))


@pytest.mark.parametrize("content", [b"garbage, not a key\n", b"", b"-----BEGIN PUBLIC KEY-----\nAAAA\n"])
def test_garbage_public_key(digits_run: Path, tmp_path: Path, content: bytes) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(content)
    _assert_usage_error(run_cli("verify", str(digits_run), "--public-key", str(key)))
    _assert_usage_error(run_cli("verify", str(digits_run), "--public-key", str(tmp_path / "missing.pem")))


def test_pinned_public_key(digits_run: Path, tmp_path: Path) -> None:
    """Pinned with another key: exit 1; pinned with the key that signed the run: exit 0, "(pinned)"."""
    other_dir = tmp_path / "other-keys"
    proc = subprocess.run(
        [sys.executable, "-m", "fgtrac_core.cli", "key", "export"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "FGTRAC_KEY_DIR": str(other_dir)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    other = tmp_path / "other.pem"
    other.write_text(proc.stdout)
    rc, line = _verify_cli(digits_run, "--public-key", str(other))
    assert rc == 1 and line.startswith("TAMPERED: tree_heads ") and "pinned" in line, line

    mine = tmp_path / "mine.pem"
    mine.write_text(run_cli("key", "export", check=True).stdout)
    assert mine.read_text() != other.read_text()
    proc = run_cli("verify", str(digits_run), "--public-key", str(mine))
    assert proc.returncode == 0, proc.stdout
    assert "(pinned)" in proc.stdout and "Ledger intact" in proc.stdout
    report = verify_run(digits_run, public_key=mine)
    assert report.ok and report.key_pinned
