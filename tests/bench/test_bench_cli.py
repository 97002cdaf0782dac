"""`python -m bench --quick`, as CI runs it: every section's figures are produced (no thresholds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_python_m_bench_quick_writes_every_section(tmp_path: Path) -> None:
    md, js = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(md), "--json", str(js)],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "FGTRAC_KEY_DIR": str(tmp_path / "keys")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(js.read_text())
    for section in (
        "recorder_overhead", "verify_throughput", "influence_speed", "influence_scale", "mislabel",
        "faithfulness", "run_faithfulness", "stage_faithfulness",
    ):  # fmt: skip
        assert results[section], section
    assert results["quick"] is True
    text = md.read_text()
    for heading in ("Recorder overhead", "Verify throughput", "Influence speed", "Influence at scale",
                    "Stage-attribution faithfulness", "Influence faithfulness on the sample run"):  # fmt: skip
        assert f"## {heading}" in text, heading
