"""Missing, corrupt, truncated and foreign databases: one clear line, exit 2, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from fgtrac_core import CorruptRunError, RunNotFoundError, RunStore, SchemaVersionError
from tests.conftest import run_cli


def _assert_one_line_error(proc, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fgtrac: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert needle in lines[0]


def _snapshot_files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.glob("*.duckdb")}


def test_missing_run(tmp_path: Path) -> None:
    with pytest.raises(RunNotFoundError):
        RunStore(tmp_path / "nope")
    _assert_one_line_error(run_cli("info", str(tmp_path / "nope")), "no run directory")
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(run_cli("info", str(tmp_path / "empty")), "holds no fgtrac run")


def test_corrupt_snapshot(digits_copy: Path) -> None:
    snap = digits_copy / "snapshot.duckdb"
    snap.write_bytes(b"this is not a database" * 100)
    before = _snapshot_files(digits_copy)
    with pytest.raises(CorruptRunError):
        RunStore(digits_copy)
    _assert_one_line_error(run_cli("info", str(digits_copy)), "not a readable fgtrac run database")
    assert _snapshot_files(digits_copy) == before


def test_truncated_snapshot(digits_copy: Path) -> None:
    snap = digits_copy / "snapshot.duckdb"
    data = snap.read_bytes()
    snap.write_bytes(data[: len(data) // 3])
    before = _snapshot_files(digits_copy)
    proc = run_cli("info", str(digits_copy), "--json")
    _assert_one_line_error(proc, str(snap))
    assert _snapshot_files(digits_copy) == before


def test_other_schema_version(digits_copy: Path) -> None:
    snap = digits_copy / "snapshot.duckdb"
    with duckdb.connect(str(snap)) as con:
        con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(SchemaVersionError, match="99"):
        RunStore(digits_copy)
    _assert_one_line_error(run_cli("info", str(digits_copy)), "schema version 99")


def test_duckdb_file_that_is_not_a_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with duckdb.connect(str(run / "snapshot.duckdb")) as con:
        con.execute("CREATE TABLE t (x INT)")
    _assert_one_line_error(run_cli("info", str(run)), "not an fgtrac run")


def test_unknown_sample_id(digits_run: Path) -> None:
    _assert_one_line_error(run_cli("sample", str(digits_run), "123456"), "123456")


def test_demo_refuses_existing_run(digits_copy: Path) -> None:
    before = _snapshot_files(digits_copy)
    _assert_one_line_error(
        run_cli("demo", "--no-app", "--out", str(digits_copy)), "already holds an fgtrac run"
    )
    assert _snapshot_files(digits_copy) == before


def test_live_database_locked_by_recorder(digits_copy: Path) -> None:
    from fgtrac_core import Run

    run = Run.open(digits_copy)
    try:
        # readers use the snapshot, never the live file, so the recorder does not block them...
        proc = run_cli("info", str(digits_copy))
        assert proc.returncode == 0, proc.stderr
        # ...while a second recorder process is refused with a clear error
        child = subprocess.run(
            [sys.executable, "-c", _SECOND_RECORDER, str(digits_copy)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert child.stdout.strip() == "RunLockedError", child.stdout + child.stderr
    finally:
        run.close()


_SECOND_RECORDER = """
import sys
from fgtrac_core import FgtracError, Run
try:
    Run.open(sys.argv[1])
except FgtracError as exc:
    print(type(exc).__name__)
"""
