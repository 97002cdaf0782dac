"""What the recorder's writer commits, as data: a `Transaction` of operations and the ledger entries of the rows
they write, and the database side (`Committer`) that applies it.

The training process prepares transactions (Arrow tables of its buffers, checkpoint files: everything that needs
torch); applying one needs only DuckDB, pyarrow and the ledger.  Being plain picklable data, a transaction is
applied the same way by the writer thread (`LocalWriter`) or by a writer process
(`fgtrac_core.tracking._writer_process`), which then holds the database, the ledger state and the signing key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import duckdb
import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fgtrac_core.store.db import BufferedInserts, execute_on, insert_arrow, publish_snapshot
from fgtrac_core.store.ledger_log import LedgerLog, Touched
from fgtrac_core.store.schema import create_lookup_indexes
from fgtrac_core.tracking._writer import MIN_PUBLISH_GAP_S, Writer

Connection = duckdb.DuckDBPyConnection | BufferedInserts

_USAGE_INDEX_SCHEMA = pa.schema(
    [("index_id", pa.int32()), ("ledger_size", pa.int64()), ("created_at", pa.timestamp("us"))]
)


@dataclass(frozen=True)
class Insert:
    """Insert Arrow rows into a table (by column name)."""

    table: str
    data: pa.Table

    def apply(self, con: Connection, ledger: LedgerLog) -> None:
        insert_arrow(con, self.table, self.data)


@dataclass(frozen=True)
class Execute:
    """A statement that reads and writes only `tables` (inserts held for other tables stay held)."""

    tables: tuple[str, ...]
    sql: str
    parameters: tuple[Any, ...]

    def apply(self, con: Connection, ledger: LedgerLog) -> None:
        execute_on(con, self.tables, self.sql, list(self.parameters))


@dataclass(frozen=True)
class UsageIndexRow:
    """The `usage_indexes` row of an index over every ledger entry appended before it (its size is the ledger's
    when applied, so it is read on the database side)."""

    index_id: int
    created_at: datetime

    def apply(self, con: Connection, ledger: LedgerLog) -> None:
        row = {"index_id": [self.index_id], "ledger_size": [ledger.size], "created_at": [self.created_at]}
        insert_arrow(con, "usage_indexes", pa.table(row, schema=_USAGE_INDEX_SCHEMA))


@dataclass(frozen=True)
class LookupIndexes:
    """Build the per-sample lookup indexes (once, at close, rather than kept up to date by every insert)."""

    def apply(self, con: Connection, ledger: LedgerLog) -> None:
        create_lookup_indexes(con)  # type: ignore[arg-type]  # any statement first writes what is held


class Operation(Protocol):
    def apply(self, con: Connection, ledger: LedgerLog) -> None: ...


@dataclass(frozen=True)
class Transaction:
    """Operations, then ledger entries for the rows they wrote (`touched`, in order), then, with `sign`, a signed
    tree head (every checkpoint, stage end and close has one; their snapshots are spaced)."""

    operations: Sequence[Operation]
    touched: Sequence[Touched]
    sign: bool = False


Prepare = Callable[[], Transaction]


class Committer:
    """The database side: the live connection, the ledger's in-memory state and the signing key."""

    def __init__(
        self, con: duckdb.DuckDBPyConnection, live: Path, snapshot: Path, run_id: str, key: Ed25519PrivateKey
    ) -> None:
        # the writer's small statements gain nothing from DuckDB's thread pool, and its threads would compete
        # with the training loop's for the cores
        con.execute("SET threads = 1")
        self.con = con
        self._live, self._snapshot = live, snapshot
        self._run_id, self._key = run_id, key
        self.ledger = LedgerLog(con, run_id, key)

    def apply(self, con: Connection, transaction: Transaction) -> None:
        for op in transaction.operations:
            op.apply(con, self.ledger)
        self.ledger.append(con, transaction.touched)
        if transaction.sign:
            self.ledger.sign_if_grown(con)

    def publish(self) -> None:
        """Sign a tree head over everything appended so far, then publish the snapshot."""
        self.ledger.sign_if_grown(self.con)
        publish_snapshot(self.con, self._live, self._snapshot)

    def reset(self) -> None:
        """Reload the ledger state from the database (after a rolled-back shared transaction)."""
        self.ledger = LedgerLog(self.con, self._run_id, self._key)

    def writer(self, *, min_publish_gap_s: float = MIN_PUBLISH_GAP_S) -> Writer:
        return Writer(self.con, self.publish, self.reset, min_publish_gap_s=min_publish_gap_s)


class _Once:
    """A transaction prepared at its first use and kept: a shared transaction that fails is rerun job by job,
    and a checkpoint's file is written once."""

    def __init__(self, prepare: Prepare) -> None:
        self._prepare: Prepare | None = prepare
        self._made: Transaction | None = None

    def __call__(self) -> Transaction:
        if self._prepare is not None:
            self._made, self._prepare = self._prepare(), None
        assert self._made is not None
        return self._made


class LocalWriter:
    """Transactions prepared and applied by one background thread of the training process."""

    def __init__(self, committer: Committer) -> None:
        self._committer = committer
        self._writer = committer.writer()

    def submit(self, prepare: Prepare, *, publish: bool = False, wait: bool = False) -> None:
        once = _Once(prepare)
        self._writer.submit(lambda con: self._committer.apply(con, once()), publish=publish, wait=wait)

    def drain(self) -> None:
        self._writer.drain()

    def raise_if_failed(self) -> None:
        self._writer.raise_if_failed()

    def stop(self) -> None:
        """Finish queued work, end the thread and close the database."""
        try:
            self._writer.stop()
        finally:
            self._committer.con.close()

    @property
    def cpu_s(self) -> float:
        return self._writer.cpu_s
