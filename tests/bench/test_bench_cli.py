"""`python -m bench --quick`, as CI runs it: every section's figures are produced (no thresholds); `--only`
re-measures one section and leaves the rest of BENCHMARKS.md, notes included, as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import report_file
from bench.sections import BY_KEY


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "FGTRAC_KEY_DIR": str(tmp_path / "keys")},
    )


def test_python_m_bench_quick_writes_every_section(tmp_path: Path) -> None:
    md, js = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    proc = _bench(tmp_path, "--quick", "--out", str(md), "--json", str(js))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(js.read_text())
    for section in (
        "recorder_overhead", "verify_throughput", "influence_speed", "influence_scale", "mislabel",
        "faithfulness", "run_faithfulness", "stage_faithfulness",
    ):  # fmt: skip
        assert results[section], section
        assert results[section]["measured"]["quick"] is True
    text = md.read_text()
    for heading in ("Recorder overhead", "Verify throughput", "Influence speed", "Influence at scale",
                    "Stage-attribution faithfulness", "Influence faithfulness on the sample run"):  # fmt: skip
        assert f"## {heading}" in text, heading
    assert report_file.check(text) is None and "## Dashboard speed" not in text  # not measured in a quick run

    # one section again: its block and figures change, every other block, the notes and the other figures stay
    noted = text.replace("<!-- python -m bench: influence_speed -->", "A note by hand.\n\n<!-- python -m bench: influence_speed -->")
    md.write_text(noted)
    before = json.loads(js.read_text())
    proc = _bench(tmp_path, "--quick", "--only", "verify_throughput", "--out", str(md), "--json", str(js))
    assert proc.returncode == 0, proc.stderr[-3000:]
    after, again = md.read_text(), json.loads(js.read_text())
    figures = again["verify_throughput"]
    assert report_file.block("verify_throughput", BY_KEY["verify_throughput"].render(figures), figures["measured"]) in after
    assert {k: v for k, v in again.items() if k != "verify_throughput"} == {
        k: v for k, v in before.items() if k != "verify_throughput"
    }
    start, end = "<!-- python -m bench: verify_throughput -->", "<!-- end python -m bench: verify_throughput -->"
    outside = [s[: s.index(start)] + s[s.index(end) :] for s in (noted, after)]
    assert outside[0] == outside[1] and "A note by hand." in after


def test_a_broken_benchmarks_file_is_refused_before_measuring(tmp_path: Path) -> None:
    md, js = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    md.write_text("# b\n\n<!-- python -m bench: verify_throughput -->\n## Verify throughput\n")
    proc = _bench(tmp_path, "--only", "verify_throughput", "--out", str(md), "--json", str(js))
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.strip().count("\n") == 0 and "'verify_throughput' is not closed" in proc.stderr
    assert not js.exists() and md.read_text().endswith("## Verify throughput\n")
