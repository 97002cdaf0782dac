"""The 1M-sample dashboard section: goals judged from the measured figures, and `--write` replacing only its own
block of BENCHMARKS.md (the measurement itself needs the 1M run and chromium: `python -m bench.dashboard_scale`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import dashboard_scale, report_file


def _result(first: float, switches: list[float]) -> dict[str, Any]:
    scan = {"table": "samples", "kind": "Index Scan", "rows": 10, "row_groups": 0, "of_row_groups": 9}
    return {
        "goals": dashboard_scale.GOALS,
        "queries": [
            {"when": "switch", "query": "influence_topk", "first_ms": 20.0, "ms": 10.2, "largest_scan": scan, "whole_table": False},
            {"when": "lifecycle", "query": "sample_usage", "first_ms": 12.0, "ms": 9.0, "whole_table": True,
             "largest_scan": {**scan, "table": "batch_samples", "kind": "Sequential Scan", "rows": 10**6,
                              "row_groups": 9, "of_row_groups": 9}},
        ],  # fmt: skip
        "browser": {"n_train": 1_000_000, "n_test": 2000, "cpus": 2, "load_avg_1min_before": 1.0,
                    "load_avg_1min_after": 1.0, "first_render_warm_s": first, "first_render_cold_server_s": 3.0,
                    "switch_s": {"median": sorted(switches)[len(switches) // 2], "max": max(switches),
                                 "all": switches}},
    }  # fmt: skip


def test_goals_are_judged_from_the_figures() -> None:
    good = dashboard_scale.report(_result(1.5, [0.3, 0.4, 0.45]))
    assert "1.50 s (goal <= 2.0 s: met)" in good and "median met, worst met" in good
    bad = dashboard_scale.report(_result(2.5, [0.3, 0.4, 0.9]))
    assert "2.50 s (goal <= 2.0 s: not met)" in bad and "median met, worst not met" in bad
    assert bad.endswith("sample_usage")


def test_write_replaces_only_its_block(tmp_path: Path) -> None:
    md, js = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    speed = report_file.block("dashboard_speed", "## Dashboard speed (x)\n\nfifty k.", None)
    mislabel = report_file.block("mislabel", "## Mislabel\n\nrest", None)
    md.write_text(f"# b\n\n{speed}\na note on speed.\n\n{mislabel}")
    js.write_text(json.dumps({"other": 1}))
    stamp = {"at": "2026-12-05 22:00 UTC", "commit": "abc1234", "machine": "m", "versions": "v", "quick": False}
    dashboard_scale.write(_result(1.5, [0.4]), stamp, md, js)
    dashboard_scale.write(_result(1.7, [0.4]), {**stamp, "commit": "def5678"}, md, js)
    text = md.read_text()
    assert text.count(dashboard_scale.HEADING) == 1 and "1.70 s" in text and "1.50 s" not in text
    assert text.index("a note on speed.") < text.index(dashboard_scale.HEADING) < text.index("## Mislabel")
    assert "on the code of def5678" in text and "abc1234" not in text
    assert text.endswith(mislabel)
    results = json.loads(js.read_text())
    assert results["other"] == 1 and results["dashboard_scale"]["measured"]["commit"] == "def5678"
    assert "| lifecycle | `sample_usage` | 12.0 | 9.0 | batch_samples: sequential scan" in text
