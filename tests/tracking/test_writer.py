"""The background writer: jobs queued behind a busy writer share one transaction, and a failure among them still
commits exactly the jobs before it (the shared transaction is rolled back, the ledger state reset, and the jobs
rerun one transaction each); publishes a job asks for are spaced, one a waiter asks for is not; the GIL switch
interval is short while a writer lives."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest

from fgtrac_core.tracking._writer import PUBLISH_SPACING, RecordingFailedError, Writer


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


def _timed_writer(tmp_path: Path, gap: float, publish_s: float = 0.0) -> tuple[Writer, duckdb.DuckDBPyConnection, list]:
    """A writer whose publishes record (start, end) in time.monotonic() and take `publish_s` seconds."""
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.execute("CREATE TABLE t (job INTEGER, txid BIGINT)")
    spans: list[tuple[float, float]] = []

    def publish() -> None:
        start = time.monotonic()
        time.sleep(publish_s)
        spans.append((start, time.monotonic()))

    return Writer(con, publish, lambda: None, min_publish_gap_s=gap), con, spans


def _committed(con: duckdb.DuckDBPyConnection, job: int, timeout: float = 10.0) -> None:
    cursor = con.cursor()  # another connection to the same database: sees what the writer committed
    deadline = time.monotonic() + timeout
    while not cursor.execute("SELECT count(*) FROM t WHERE job = ?", [job]).fetchall()[0][0]:
        assert time.monotonic() < deadline, f"job {job} was never committed"
        time.sleep(0.005)


def _until(condition, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_publishes_a_job_asks_for_are_spaced_and_still_happen(tmp_path: Path) -> None:
    """A checkpoint's publish within the gap of the last one waits for the gap to pass, then runs by itself
    (nothing more submitted), covering every job committed by then."""
    gap = 0.6
    writer, con, spans = _timed_writer(tmp_path, gap)
    writer.submit(_job(0), publish=True)
    _until(lambda: len(spans) == 1)  # the first publish runs at once
    for i in (1, 2):
        writer.submit(_job(i), publish=True)
    _committed(con, 2)
    assert len(spans) == 1  # committed, but their publish waits for the gap
    _until(lambda: len(spans) == 2, timeout=gap + 10)
    assert spans[1][0] - spans[0][1] >= gap  # one publish for both, no earlier than the gap
    time.sleep(gap + 0.2)
    assert len(spans) == 2  # nothing more was due
    writer.stop()


def test_a_waiter_gets_a_snapshot_at_once(tmp_path: Path) -> None:
    writer, con, spans = _timed_writer(tmp_path, gap=60.0)
    writer.submit(_job(0), publish=True)
    _until(lambda: len(spans) == 1)
    writer.submit(_job(1), publish=True)
    writer.drain()  # flush(): waits, and the publish due is not held back by the gap
    assert len(spans) == 2
    writer.submit(_job(2), publish=True)
    writer.stop()  # close(): the last publish is never left behind
    assert len(spans) == 3


def test_the_gap_grows_with_the_publish_time(tmp_path: Path) -> None:
    """A slow publish (a large database) is followed by a gap of PUBLISH_SPACING times its duration."""
    publish_s = 0.05
    writer, con, spans = _timed_writer(tmp_path, gap=0.0, publish_s=publish_s)
    writer.submit(_job(0), publish=True)
    _until(lambda: len(spans) == 1)
    writer.submit(_job(1), publish=True)
    _until(lambda: len(spans) == 2)
    first_took = spans[0][1] - spans[0][0]
    assert spans[1][0] - spans[0][1] >= PUBLISH_SPACING * first_took >= PUBLISH_SPACING * publish_s
    writer.stop()


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


def test_cpu_seconds_count_the_writers_work_not_its_waits(tmp_path: Path) -> None:
    """`cpu_s` (what `Run.background_cpu_s` reports) is the writer thread's CPU time: a job computing for ~0.2 s
    adds about that, a job sleeping as long adds almost nothing, and the final figure is kept after `stop`."""
    writer, _, _ = _writer(tmp_path)

    def compute(con: duckdb.DuckDBPyConnection) -> None:
        end = time.thread_time() + 0.2
        while time.thread_time() < end:
            pass

    writer.drain()
    start = writer.cpu_s
    writer.submit(lambda con: time.sleep(0.2), wait=True)
    slept = writer.cpu_s - start
    writer.submit(compute, wait=True)
    computed = writer.cpu_s - start - slept
    last = writer.cpu_s
    writer.stop()
    assert slept < 0.05
    assert 0.2 <= computed < 0.4
    assert writer.cpu_s >= last


def test_a_runs_background_cpu_is_its_writers_and_final_after_close(tmp_path: Path) -> None:
    from fgtrac_core import Run

    run = Run.create(tmp_path / "run", name="cpu")
    run.register_samples(
        list(range(50)), split="train", labels=[i % 3 for i in range(50)], raw=[bytes([i]) for i in range(50)]
    )
    run.flush()
    committed = run.background_cpu_s
    assert committed > 0.0  # schema, registrations, ledger entries, a signed head, a snapshot
    run.close()
    final = run.background_cpu_s
    assert final >= committed
    time.sleep(0.05)
    assert run.background_cpu_s == final  # the thread has ended: nothing more is counted
