"""The recorder's in-memory entries (`entries_of_rows`) against the read-back the verifier uses (`iter_entries`),
and held inserts (`BufferedInserts`) against plain ones."""

from __future__ import annotations

import math
from datetime import datetime

import duckdb
import pyarrow as pa
import pytest

from fgtrac_core.store.db import BufferedInserts, execute_on, insert_arrow
from fgtrac_core.store.entries import entries_of_rows, iter_entries
from fgtrac_core.store.schema import create_schema


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    c = duckdb.connect()
    create_schema(c)
    return c


def _batches() -> tuple[pa.Table, pa.Table]:
    batches = pa.table(
        {
            "batch_id": pa.array([3, 4, 5], pa.int64()),
            "step": pa.array([7, 8, 9], pa.int64()),
            "stage_id": pa.array([0, 0, 1], pa.int32()),
            "epoch": pa.array([None, 1, 2], pa.int32()),
            "lr": pa.array([0.1, None, 1 / 3], pa.float64()),
            "group_lrs": pa.array([None, None, "[0.0001,0.3333333333333333]"], pa.string()),
            "loss": pa.array([math.nan, math.inf, 2.5e-7], pa.float64()),
            "n_samples": pa.array([2, 1, 3], pa.int32()),
        }
    )
    samples = pa.table(
        {
            "batch_id": pa.array([3, 3, 4, 5, 5, 5], pa.int64()),
            "position": pa.array([0, 1, 0, 0, 1, 2], pa.int32()),
            "sample_id": pa.array([9, -2, 4, 2**40, 0, 9], pa.int64()),
            "target": pa.array([None, None, 1, 0, None, 7], pa.int32()),  # batch 3: no targets logged
        }
    )
    return batches, samples


def test_batches_with_id_sets_equal_the_read_back(con: duckdb.DuckDBPyConnection) -> None:
    batches, samples = _batches()
    insert_arrow(con, "batches", batches)
    insert_arrow(con, "batch_samples", samples)
    assert entries_of_rows("batch", batches, samples) == list(iter_entries(con, "batch"))


def test_timestamps_and_text_equal_the_read_back(con: duckdb.DuckDBPyConnection) -> None:
    row = pa.table(
        {
            "stage_id": pa.array([2], pa.int32()),
            "name": pa.array(['fine "tune" é'], pa.string()),
            "optimizer": pa.array(["AdamW"], pa.string()),
            "hparams": pa.array(['{"lr":0.001}'], pa.string()),
            "lr_schedule": pa.array(["{}"], pa.string()),
            "start_step": pa.array([40], pa.int64()),
            "end_step": pa.nulls(1, pa.int64()),
            "status": pa.array(["running"]),
            "started_at": pa.array([datetime(2026, 12, 4, 3, 5, 7, 12)], pa.timestamp("us")),
            "ended_at": pa.nulls(1, pa.timestamp("us")),
        }
    )
    insert_arrow(con, "stages", row)
    assert entries_of_rows("stage_start", row) == list(iter_entries(con, "stage_start"))


def test_kinds_computed_from_the_database_are_refused() -> None:
    with pytest.raises(ValueError, match="computed from the database"):
        entries_of_rows("analysis", pa.table({"analysis_id": [0]}))


def test_held_inserts_are_written_before_any_other_use(con: duckdb.DuckDBPyConnection) -> None:
    batches, samples = _batches()
    held = BufferedInserts(con)
    insert_arrow(held, "batches", batches.slice(0, 2))
    insert_arrow(held, "batch_samples", samples.slice(0, 3))
    insert_arrow(held, "batches", batches.slice(2))
    insert_arrow(held, "batch_samples", samples.slice(3))
    assert con.execute("SELECT count(*) FROM batches").fetchall() == [(0,)]  # held: nothing written yet
    # a query through the held connection first writes everything held, in order
    assert held.execute("SELECT batch_id FROM batches ORDER BY batch_id").fetchall() == [(3,), (4,), (5,)]
    assert list(iter_entries(con, "batch")) == entries_of_rows("batch", batches, samples)


def test_a_statement_on_named_tables_leaves_the_others_held(con: duckdb.DuckDBPyConnection) -> None:
    batches, samples = _batches()
    held = BufferedInserts(con)
    insert_arrow(held, "batches", batches)
    insert_arrow(held, "batch_samples", samples)
    execute_on(held, ("batches",), "UPDATE batches SET epoch = ? WHERE batch_id = ?", [9, 3])
    # the batches held were written first, so the update found its row; the samples are still held
    assert con.execute("SELECT batch_id, epoch FROM batches ORDER BY batch_id").fetchall() == [(3, 9), (4, 1), (5, 2)]
    assert con.execute("SELECT count(*) FROM batch_samples").fetchall() == [(0,)]
    held.flush()
    assert con.execute("SELECT count(*) FROM batch_samples").fetchall() == [(samples.num_rows,)]
    execute_on(con, ("batches",), "UPDATE batches SET epoch = ? WHERE batch_id = ?", [8, 3])  # a plain connection
    assert con.execute("SELECT epoch FROM batches WHERE batch_id = 3").fetchall() == [(8,)]


def test_a_failing_held_insert_fails_at_the_flush(con: duckdb.DuckDBPyConnection) -> None:
    batches, _ = _batches()
    held = BufferedInserts(con)
    insert_arrow(held, "batches", batches)
    insert_arrow(held, "batches", batches.slice(0, 1))  # a duplicate key
    with pytest.raises(duckdb.ConstraintException):
        held.flush()
