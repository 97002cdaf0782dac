"""`python -m bench [--quick] [--only NAME ...]`: run the benchmarks, print every figure, update BENCHMARKS.md and
bench/results.json.

Only the sections measured by this run change: their figures in results.json, their dated blocks in BENCHMARKS.md
(`bench.report_file`); every other section, and the notes written between the blocks, stay as they were.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import report_file
from bench.sections import ORDER, ROOT, SECTIONS, measured, update


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
