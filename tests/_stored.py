"""Holding two analyses of one run to each other: stored influence read back, stage effects compared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import pytest

from fgtrac_core.pipeline import Pipeline
from fgtrac_core.stages import analyze
from tests.conftest import run_cli

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


def assert_same_influence(run_dir: Path, *pipelines: list[str]) -> None:
    """`fgtrac influence RUN ... --json` once per argument list (the pipeline and mode flags): every stored analysis
    equals the first's, which is not empty."""
    analyses = []
    for args in pipelines:
        proc = run_cli("influence", str(run_dir), *args, "--json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        analyses.append(stored_influence(run_dir, json.loads(proc.stdout)["analysis_id"]))
    assert all(rows for rows in analyses[0])
    for other in analyses[1:]:
        for got, want in zip(analyses[0], other, strict=True):
            assert rows_close(got, want)


def assert_same_stage_effects(run_dir: Path, *pipelines: Pipeline) -> None:
    """`analyze(compare=True)` (replay and every estimator) through each pipeline: the same effects."""
    first, *others = (analyze(run_dir, compare=True, pipeline=p, progress=False).effects for p in pipelines)
    assert not first.empty
    for other in others:
        assert list(first.columns) == list(other.columns)
        for col in first.columns:
            if first[col].dtype.kind == "f":
                assert first[col].to_numpy() == pytest.approx(other[col].to_numpy(), rel=1e-4, abs=1e-7), col
            else:
                assert first[col].tolist() == other[col].tolist(), col
