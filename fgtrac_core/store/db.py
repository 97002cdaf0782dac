"""Opening run databases with errors a user can act on, and publishing read-only snapshots."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from fgtrac_core.errors import CorruptRunError, RunLockedError, RunNotFoundError
from fgtrac_core.store.layout import RunLayout
from fgtrac_core.store.run_files import remove_stale_temporaries, replace_atomically
from fgtrac_core.store.schema import check_catalog, check_schema, column_order


def first_line(exc: BaseException) -> str:
    """The first line of an exception message, for one-line error reports."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _held_elsewhere(exc: duckdb.Error) -> bool:
    """Whether DuckDB refused to open a file because another process holds its lock."""
    return "lock" in first_line(exc).lower()


def connect(path: Path, *, read_only: bool, wait_for_lock_s: float = 0.0) -> duckdb.DuckDBPyConnection:
    """Open an existing run database and check its schema version and catalog (exactly fgtrac's tables).

    A lock held by another process is retried for `wait_for_lock_s` seconds: a recorder's writer process outlives
    a killed training process by the milliseconds the kernel takes to end it.  Raises RunNotFoundError,
    RunLockedError, CorruptRunError, SchemaVersionError or TamperedRunError, never a raw DuckDB error.
    """
    if not path.is_file():
        raise RunNotFoundError(f"no run database at {path}")
    deadline = time.monotonic() + wait_for_lock_s
    while True:
        try:
            # a run database never needs files beyond itself: a planted view or macro cannot read any either
            con = duckdb.connect(str(path), read_only=read_only, config={"enable_external_access": False})
            break
        except duckdb.Error as exc:
            msg = first_line(exc)
            if not _held_elsewhere(exc):
                raise CorruptRunError(f"{path} is not a readable fgtrac run database ({msg})") from None
            if time.monotonic() >= deadline:
                raise RunLockedError(f"{path} is held open by another process ({msg})") from None
            time.sleep(0.02)
    try:
        check_schema(con, str(path))
        check_catalog(con, str(path))
    except duckdb.Error as exc:
        con.close()
        raise CorruptRunError(f"{path} is damaged ({first_line(exc)})") from None
    except Exception:
        con.close()
        raise
    return con


def discard_unfinished_create(layout: RunLayout) -> None:
    """Remove what an interrupted `Run.create` left in `layout` (a database without its first signed commit:
    nothing was recorded in it yet), so that the run can be created afresh.

    The live database is opened first, which takes DuckDB's lock on it: a creation still running in another
    process is refused (RunLockedError), never deleted from under it.
    """
    if layout.live_db.exists():
        try:
            duckdb.connect(str(layout.live_db)).close()
        except duckdb.Error as exc:
            if _held_elsewhere(exc):
                raise RunLockedError(f"{layout.root} is being created by another process ({first_line(exc)})") from None
            # a partial file DuckDB cannot open: nothing in it to keep
    for path in (layout.live_db, layout.live_db.with_name(layout.live_db.name + ".wal"), layout.snapshot_db):
        path.unlink(missing_ok=True)
    remove_stale_temporaries(layout)


def publish_snapshot(con: duckdb.DuckDBPyConnection, live: Path, snapshot: Path) -> None:
    """Publish a consistent read-only copy of the live database.

    CHECKPOINT moves everything from the WAL into the main file, so a byte copy taken before the recorder's next
    write is a complete database.  The copy is renamed into place atomically, so readers see the old or the new
    snapshot, never a partial one, and readers never touch (or lock) the live file.

    The copy runs in a child `cp` process on purpose: DuckDB guards the live file with a POSIX fcntl lock, and
    POSIX drops all of a process's locks on a file when that process closes *any* descriptor of it — copying
    in-process would silently unlock the live database for a second writer.

    The copy goes into a temporary created exclusively (O_CREAT|O_EXCL|O_NOFOLLOW) under an unpredictable name in
    the run directory and already open here: `cp` writes through that descriptor (`/dev/fd/N`), so a link planted
    at a temporary's name is never written through.
    """
    con.execute("CHECKPOINT")

    def copy(fd: int) -> None:
        proc = subprocess.run(
            ["cp", "--reflink=auto", str(live), f"/dev/fd/{fd}"], pass_fds=(fd,), capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise OSError(f"could not publish a snapshot of {live}: {proc.stderr.strip()}")

    replace_atomically(snapshot, copy)


def insert_arrow(con: duckdb.DuckDBPyConnection | BufferedInserts, table: str, data: pa.Table) -> None:
    """Insert an Arrow table into `table` by column name (held until the next use of the connection when `con`
    is a `BufferedInserts`).

    With every column of the table given, the columns are put in the table's order and inserted by position
    through a relation: one statement, no catalog change.  A relation's `.query()` (needed to name a subset of
    the columns, the rest left to their defaults) creates and drops a temporary view around the insert: three
    statements, ~2.3 ms an insert against ~1.5 ms, measured inside a transaction.  `register` is a catalog change
    too (~10 ms a call), and the replacement scan of a Python variable is off on our connections (external
    access is disabled).
    """
    if isinstance(con, BufferedInserts):
        con.hold(table, data)
        return
    order = column_order(table) or con.table(table).columns
    if sorted(order) == sorted(data.column_names):
        con.from_arrow(data.select(order)).insert_into(table)
        return
    cols = ", ".join(data.column_names)
    con.from_arrow(data).query("_fgtrac_in", f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _fgtrac_in")


def execute_on(
    con: duckdb.DuckDBPyConnection | BufferedInserts, tables: Collection[str], sql: str, parameters: Sequence[Any]
) -> None:
    """Run `sql`, a statement that reads and writes only `tables` (held inserts into other tables stay held when
    `con` is a `BufferedInserts`)."""
    if isinstance(con, BufferedInserts):
        con.execute_on(tables, sql, parameters)
    else:
        con.execute(sql, parameters)


class BufferedInserts:
    """A connection whose Arrow inserts (`insert_arrow`) are held and written together: one statement per table
    and schema instead of one per call.

    The recorder's writer hands one to the jobs that share a transaction: a backlog of jobs then costs a few
    inserts, not a few per job (each statement costs ~1 ms here, most of it DuckDB's binding).  Any other use of
    the connection (a query, an update, a commit) first writes everything held, so every statement sees every
    insert before it, as without holding.  Tables are written in the order first held (fgtrac's schema has no
    foreign keys, so only each table's own row order matters, and that is kept).
    """

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self._con = con
        self._held: dict[tuple[str, pa.Schema], list[pa.Table]] = {}

    def hold(self, table: str, data: pa.Table) -> None:
        self._held.setdefault((table, data.schema), []).append(data)

    def flush(self, tables: Collection[str] | None = None) -> None:
        """Write everything held (only what is held for `tables` when given)."""
        if tables is None:
            held, self._held = self._held, {}
        else:
            held = {key: parts for key, parts in self._held.items() if key[0] in tables}
            self._held = {key: parts for key, parts in self._held.items() if key[0] not in tables}
        for (table, _), parts in held.items():
            insert_arrow(self._con, table, parts[0] if len(parts) == 1 else pa.concat_tables(parts))

    def execute_on(self, tables: Collection[str], sql: str, parameters: Sequence[Any]) -> None:
        """Run a statement that reads and writes only `tables`: what is held for other tables stays held (an
        update in the middle of a backlog then costs one statement, not one per table held)."""
        self.flush(tables)
        self._con.execute(sql, parameters)

    def __getattr__(self, name: str) -> object:
        self.flush()
        return getattr(self._con, name)
