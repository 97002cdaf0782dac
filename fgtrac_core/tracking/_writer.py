"""The recorder's background writer: one thread owns the DuckDB connection and does all slow I/O.

The training thread only validates, buffers and enqueues; serialising checkpoints, fsync, inserts, commits and
snapshot publishing happen here, in submission order.  Every job runs inside a transaction; when several are
queued (the writer is behind, as it is while training keeps the cores busy), they share one, so a backlog costs
one commit instead of one per job, and their inserts into each table are written as one (`BufferedInserts`).
If such a shared transaction fails it is rolled back, the recorder's in-memory ledger state is reset from the
database (`reset`), and its jobs run again one transaction each, so exactly the jobs before the failing one end up
committed, as without sharing.  A failed job stops the writer (later jobs would record out of order); the error
is re-raised in the training thread at its next recorder call.

Snapshots are spaced: a publish asked for by a job (a checkpoint, a stage end) waits until `min_publish_gap_s`
seconds, or `PUBLISH_SPACING` times the last publish's own duration if longer, have passed since the last one
ended, and then covers everything committed by then.  Each publishes a full copy of the database, so a loop
checkpointing every few milliseconds, or a database of gigabytes, would otherwise spend its writer on copies no
reader needs; readers still always see a complete, signed state, at most that gap old.  Someone waiting (`flush`,
`publish`, `close`) gets a snapshot at once.  Signing is not spaced: a tree head is signed in the transaction of
every checkpoint and stage end.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable

import duckdb

from fgtrac_core.errors import FgtracError
from fgtrac_core.store.db import BufferedInserts, first_line
from fgtrac_core.tracking import _switch_interval

Job = Callable[[duckdb.DuckDBPyConnection], None]


def lower_own_priority() -> None:
    """Run this thread (and the `cp` it spawns) at the lowest CPU priority.

    Training keeps every core busy with intra-op threads that wait for each other; a writer competing at equal
    priority stalls them all.  At nice 19 the writer works in the gaps (data loading, Python overhead) instead.
    Linux applies nice per thread; elsewhere this is a no-op.
    """
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


_MAX_GROUP = 64  # jobs sharing one transaction at most (bounds what one commit holds)
MIN_PUBLISH_GAP_S = 2.0  # a snapshot a job asks for waits at least this long after the last one
PUBLISH_SPACING = 20.0  # ... and this many times the last publish's duration (publishing <= ~5% of the time)


def _in_transaction(con: duckdb.DuckDBPyConnection, jobs: list[Job]) -> None:
    con.begin()
    try:
        held = BufferedInserts(con)  # the jobs' inserts into one table become one statement
        for job in jobs:
            job(held)  # type: ignore[arg-type]  # a connection to every job, its inserts held
        held.flush()
    except BaseException:
        con.rollback()
        raise
    con.commit()


class _Callback:
    """Called where a waiter's event would be set."""

    def __init__(self, call: Callable[[], None]) -> None:
        self._call = call

    def set(self) -> None:
        self._call()


class RecordingFailedError(FgtracError):
    """A background write failed; what was committed before it is intact."""


class Writer:
    """Runs jobs on one connection in a background thread, in order."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        publish: Callable[[], None],
        reset: Callable[[], None],
        *,
        min_publish_gap_s: float = MIN_PUBLISH_GAP_S,
    ) -> None:
        self._con = con
        self._publish = publish
        self._reset = reset
        self._min_gap = min_publish_gap_s
        self._next_publish = 0.0  # time.monotonic() from which a publish a job asked for may run
        # (job, publish after it, what to set once committed, whether someone waits for it)
        self._queue: queue.Queue[tuple[Job | None, bool, threading.Event | _Callback | None, bool]] = queue.Queue()
        self._error: BaseException | None = None
        self.cpu_s = 0.0  # CPU seconds this thread has used, as of its last finished job (what recording costs)
        self._thread = threading.Thread(target=self._run_loop, name="fgtrac-writer", daemon=True)
        _switch_interval.shorten()  # given back when the thread ends
        self._thread.start()

    def submit(
        self,
        job: Job,
        *,
        publish: bool = False,
        wait: bool = False,
        on_done: Callable[[], None] | None = None,
        urgent: bool = False,
    ) -> None:
        """Queue `job`; with `publish`, a snapshot follows it (spaced, see the module doc: it then covers later
        jobs too); with `wait`, block until it is committed and, if a publish is due, published.  `on_done` is
        called on the writer thread once the job is committed (a writer process acknowledging its jobs), and
        `urgent` gives the job a waiter's prompt commit and publish without blocking (someone waits for it
        elsewhere)."""
        self.raise_if_failed()
        done = threading.Event() if wait else None if on_done is None else _Callback(on_done)
        self._queue.put((job, publish, done, wait or urgent))
        if isinstance(done, threading.Event):
            done.wait()
            self.raise_if_failed()

    def drain(self) -> None:
        """Block until every queued job (and pending publish) is done."""
        self.submit(lambda con: None, wait=True)

    def stop(self) -> None:
        """Finish queued work and end the thread."""
        if self._thread.is_alive():
            self._queue.put((None, False, None, False))
            self._thread.join()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise RecordingFailedError(f"recording failed in the background: {first_line(self._error)}")

    def _run_loop(self) -> None:
        try:
            self._loop()
        finally:
            _switch_interval.restore()

    def _loop(self) -> None:
        lower_own_priority()
        publish_due = False
        held = None  # an item taken from the queue while gathering a group, run next
        while True:
            item, held = held, None
            if item is None:
                try:  # with a publish due, wake when its gap has passed even if nothing more is queued
                    wait = max(0.0, self._next_publish - time.monotonic()) if publish_due else None
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    if self._error is None:
                        self._publish_now()
                    publish_due = False
                    continue
            if item[0] is None:
                if publish_due and self._error is None:
                    self._publish_now()
                return
            group = [item]
            while not item[3] and len(group) < _MAX_GROUP:  # nobody waits on it: gather what is queued behind
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item[0] is None:
                    held = item
                    break
                group.append(item)
            if self._error is None:
                self._transaction([job for job, _, _, _ in group])
                publish_due |= any(publish for _, publish, _, _ in group)
                waited = group[-1][3]
                # when someone waits, or when caught up and the gap has passed (a backlog's jobs share one)
                ready = waited or (self._queue.empty() and time.monotonic() >= self._next_publish)
                if publish_due and ready and self._error is None:
                    self._publish_now()
                    publish_due = False
            for _, _, done, _ in group:
                if done is not None:
                    done.set()

    def _publish_now(self) -> None:
        start = time.monotonic()
        self._run(lambda con: self._publish())
        end = time.monotonic()
        self._next_publish = end + max(self._min_gap, PUBLISH_SPACING * (end - start))

    def _transaction(self, jobs: list[Job]) -> None:
        self._run(lambda con: _in_transaction(con, jobs))
        if self._error is not None and len(jobs) > 1:  # one of them failed: commit those before it, each alone
            self._error = None
            self._run(lambda con: self._reset())
            for job in jobs:
                if self._error is not None:
                    break
                self._run(lambda con, job=job: _in_transaction(con, [job]))

    def _run(self, job: Job) -> None:
        try:
            job(self._con)
        except BaseException as exc:  # reported to the training thread; the writer stops writing
            self._error = exc
        finally:  # every transaction and publish runs here, before anyone waiting on it is woken
            self.cpu_s = time.thread_time()
