"""The background writer: jobs queued behind a busy writer share one transaction, and a failure among them still
commits exactly the jobs before it (the shared transaction is rolled back, the ledger state reset, and the jobs
rerun one transaction each)."""

from __future__ import annotations

import threading
from pathlib import Path

import duckdb
import pytest

from fgtrac_core.tracking._writer import RecordingFailedError, Writer


def _writer(tmp_path: Path) -> tuple[Writer, duckdb.DuckDBPyConnection, list[str]]:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.execute("CREATE TABLE t (job INTEGER, txid BIGINT)")
    calls: list[str] = []
    return Writer(con, lambda: calls.append("publish"), lambda: calls.append("reset")), con, calls


def _job(i: int, fail: bool = False):  # noqa: ANN202
    def job(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("INSERT INTO t SELECT ?, txid_current()", [i])
        if fail:
            raise OSError(f"job {i} failed")

    return job


def _hold(writer: Writer) -> threading.Event:
    """Keep the writer busy until the returned event is set, so that what is submitted next queues up."""
    started, release = threading.Event(), threading.Event()

    def busy(con: duckdb.DuckDBPyConnection) -> None:
        started.set()
        release.wait()

    writer.submit(busy)
    started.wait()
    return release


def test_queued_jobs_share_one_transaction(tmp_path: Path) -> None:
    writer, con, calls = _writer(tmp_path)
    release = _hold(writer)
    for i in range(5):
        writer.submit(_job(i), publish=i == 2)
    release.set()
    writer.drain()
    rows = con.execute("SELECT job, txid FROM t ORDER BY job").fetchall()
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4]
    assert len({r[1] for r in rows}) == 1  # one transaction for the five
    writer.submit(_job(5), wait=True)  # alone in the queue: its own transaction
    assert con.execute("SELECT txid FROM t WHERE job = 5").fetchall()[0][0] != rows[0][1]
    assert calls == ["publish"]  # the backlog's publishes coalesce into one, after the shared commit
    writer.stop()


def test_a_failure_in_a_shared_transaction_commits_exactly_the_jobs_before_it(tmp_path: Path) -> None:
    writer, con, calls = _writer(tmp_path)
    release = _hold(writer)
    for i in range(5):
        writer.submit(_job(i, fail=i == 2))
    release.set()
    with pytest.raises(RecordingFailedError, match="job 2 failed"):
        writer.stop()
    assert [r[0] for r in con.execute("SELECT job FROM t ORDER BY job").fetchall()] == [0, 1]
    assert calls == ["reset"]  # in-memory state reloaded once, after the shared transaction's rollback
