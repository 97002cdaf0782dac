"""Reading a run's stored influence analysis back, to hold two analyses of one run to each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest

_QUERIES = (
    "SELECT sample_id, prediction, confidence, loss FROM influence_tests WHERE analysis_id = ? ORDER BY sample_id",
    "SELECT test_id, view, direction, rank, train_id, score FROM influence_topk WHERE analysis_id = ? "
    "ORDER BY test_id, view, direction, rank",
    "SELECT sample_id, value FROM self_influence WHERE analysis_id = ? ORDER BY sample_id",
)


def stored_influence(run_dir: Path, analysis_id: int) -> list[list[tuple[Any, ...]]]:
    """The stored test predictions, top-k rows and self-influence of one influence analysis."""
    with duckdb.connect(str(run_dir / "snapshot.duckdb"), read_only=True) as con:
        return [con.execute(sql, [analysis_id]).fetchall() for sql in _QUERIES]


def rows_close(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]], rel: float = 1e-5) -> bool:
    """The same rows: floats to `rel` relative (1e-9 absolute), everything else equal."""
    return len(a) == len(b) and all(
        len(r) == len(s)
        and all(x == (pytest.approx(v, rel=rel, abs=1e-9) if isinstance(v, float) else v) for x, v in zip(r, s, strict=True))
        for r, s in zip(a, b, strict=True)
    )
