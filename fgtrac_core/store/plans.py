"""What the statements of one `RunStore` call read: every table scan (index or sequential, rows read, row groups
read), from DuckDB's ``EXPLAIN (ANALYZE, FORMAT JSON)``.

The dashboard-at-scale benchmark and the tests use it to show that a per-example query reads a few rows through
an index or a zone map, never a whole large table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fgtrac_core.store.reader import RunStore


@dataclass(frozen=True)
class Scan:
    """One table scan of an executed statement."""

    table: str  # unqualified table name
    kind: str  # DuckDB's scan type: "Index Scan" or "Sequential Scan"
    rows_scanned: int  # rows the scan read (after zone-map pruning, before other filters)
    row_groups_scanned: int  # row groups (122,880 rows each) it read
    row_groups: int  # row groups the table holds


@dataclass(frozen=True)
class Statement:
    """One statement a `RunStore` call executed, and its table scans."""

    sql: str
    scans: tuple[Scan, ...] | None  # None: DuckDB 2.0.1 reports no plan for it (a parameterised count(*) gets
    # '{"result": "error"}' from EXPLAIN ANALYZE in JSON while the statement itself runs)


@contextmanager
def _recorded(store: RunStore) -> Iterator[list[tuple[str, list[Any]]]]:
    """Record (sql, params) of every statement `store` runs through its `df`/`_rows`/`_numpy` while in the block."""
    calls: list[tuple[str, list[Any]]] = []
    methods = ("df", "_rows", "_numpy")

    def recording(run: Callable[..., Any]) -> Callable[..., Any]:
        def record(sql: str, params: list[Any] | None = None) -> Any:
            calls.append((sql, list(params or [])))
            return run(sql, params)

        return record

    for name in methods:
        setattr(store, name, recording(getattr(store, name)))
    try:
        yield calls
    finally:
        for name in methods:
            delattr(store, name)  # the class's methods again


def statements(store: RunStore, method: str, *args: Any) -> tuple[Any, list[Statement]]:
    """Call `store.<method>(*args)`; return its result and every statement it ran, each re-run under EXPLAIN
    ANALYZE for its scans (so each statement runs twice: call timings belong outside this function)."""
    with _recorded(store) as calls:
        result = getattr(store, method)(*args)
    out = []
    for sql, params in calls:
        with store._con.cursor() as cur:
            plan = json.loads(cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchall()[0][1])
        scans = tuple(_scans(plan["operator"])) if "operator" in plan else None
        out.append(Statement(" ".join(sql.split()), scans))
    return result, out


def _scans(operators: list[dict[str, Any]]) -> Iterator[Scan]:
    for op in operators:
        info = op.get("extra_info", {})
        if op.get("type") == "TABLE_SCAN" and "Table" in info:
            yield Scan(
                table=info["Table"].rsplit(".", 1)[-1],
                kind=info.get("Type", "Sequential Scan"),
                rows_scanned=int(op.get("rows_scanned", 0)),
                row_groups_scanned=int(op.get("row_groups_scanned", 0)),
                row_groups=int(op.get("total_row_groups_to_scan", 0)),
            )
        yield from _scans(op.get("children", []))
