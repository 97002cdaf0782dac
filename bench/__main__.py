"""`python -m bench [--quick] [--only NAME ...]`: run the benchmarks, print every figure, update BENCHMARKS.md and
bench/results.json.

Only the sections measured by this run change: their figures in results.json, their dated blocks in BENCHMARKS.md
(`bench.report_file`); every other section, and the notes written between the blocks, stay as they were.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cleanlab
import duckdb
import sklearn
import torch

from bench import peers_dattri, report_file
from bench.sections import BY_KEY, ORDER, SECTIONS

ROOT = Path(__file__).resolve().parent.parent

HEADER = """# fgtrac benchmarks

Reproduce: `make bench` (or `python -m bench`; one section: `python -m bench --only recorder_overhead`). Each
section says when, on which code and machine it was measured; the notes between sections are written by hand.
"""


def _commit() -> str:
    """The checked-out commit (with ``+changes`` when the tree differs from it), or ``unknown`` outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def measured(quick: bool) -> dict[str, Any]:
    """When, on which code, machine and library versions a section is being measured (its block's stamp)."""
    return {
        "at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}",
        "versions": f"torch {torch.__version__}, duckdb {duckdb.__version__}, scikit-learn {sklearn.__version__}, "
        f"cleanlab {cleanlab.__version__}, dattri {peers_dattri.installed_version() or 'not installed'}",
        "quick": quick,
    }


def update(results: dict[str, Any], measured: list[str], markdown_path: Path, json_path: Path) -> None:
    """Write `results` to `json_path` and the blocks of the `measured` sections into `markdown_path` (created with
    every section `results` holds when missing)."""
    if markdown_path.exists():
        document, blocks = markdown_path.read_text(), measured
    else:
        document, blocks = HEADER, [key for key in ORDER if key in results]
    for key in blocks:
        res = results[key]
        text = report_file.block(key, BY_KEY[key].render(res), res.get("measured"))
        document = report_file.splice(document, key, text, ORDER)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    markdown_path.write_text(document)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (CI smoke test)")
    p.add_argument("--only", nargs="+", choices=ORDER, metavar="NAME", help=f"only these sections: {', '.join(ORDER)}")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument(
        "--json", default=str(ROOT / "bench" / "results.json"), help="where the figures go as JSON"
    )
    args = p.parse_args(argv)
    markdown_path, json_path = Path(args.out), Path(args.json)
    try:
        results = json.loads(json_path.read_text()) if json_path.exists() else {}
        if markdown_path.exists():  # a broken file is refused before hours of measuring, not after
            report_file.check(markdown_path.read_text())
    except (ValueError, OSError) as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    # the 50k- and 1M-sample dashboard timings and the crash campaign build their own large runs: not in quick runs
    run = [s for s in SECTIONS if (args.only is None and (s.in_quick or not args.quick)) or s.key in (args.only or ())]
    for section in run:
        stamp = measured(args.quick)
        results[section.key] = {**section.measure(args.quick), "measured": stamp}
        print(section.report(results[section.key]), flush=True)
    update(results, [s.key for s in run], markdown_path, json_path)
    print(f"wrote {args.out} and {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
