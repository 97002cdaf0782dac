"""The background writer: jobs queued behind a busy writer share one transaction, and a failure among them still
commits exactly the jobs before it (the shared transaction is rolled back, the ledger state reset, and the jobs
rerun one transaction each); the GIL switch interval is short while a writer lives."""

from __future__ import annotations

import subprocess
import sys
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


_SWITCH_INTERVAL_SCRIPT = """
import sys
from pathlib import Path
from fgtrac_core.tracking import Run
from fgtrac_core.tracking._switch_interval import SWITCH_INTERVAL_S

def short() -> bool:
    return abs(sys.getswitchinterval() - SWITCH_INTERVAL_S) < 2e-6  # held in whole microseconds


root = Path(sys.argv[1])
sys.setswitchinterval(0.005)
first = Run.create(root / "a", name="a")
assert short()
second = Run.create(root / "b", name="b")
first.close()
assert short()  # the second writer still lives
second.close()
assert sys.getswitchinterval() == 0.005

run = Run.create(root / "c", name="c")
sys.setswitchinterval(0.003)  # the program's own choice while recording
run.close()
assert sys.getswitchinterval() == 0.003

sys.setswitchinterval(1e-4)  # already shorter: never lengthened
shorter = sys.getswitchinterval()
run = Run.open(root / "c")
assert sys.getswitchinterval() == shorter
run.close()
assert sys.getswitchinterval() == shorter
print("ok")
"""


def test_switch_interval_is_short_while_a_writer_lives_then_the_programs_own(tmp_path: Path) -> None:
    """The first open run shortens the GIL switch interval, the last one to close restores the program's; a value
    the program sets meanwhile, or one already shorter, is left as the program has it.  In a fresh interpreter:
    the interval is process-wide, and runs other tests leave open would hold it."""
    proc = subprocess.run(
        [sys.executable, "-c", _SWITCH_INTERVAL_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
