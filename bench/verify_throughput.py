"""Verification throughput: ledger entries recomputed and checked per second, on the sample run and on a
synthetic run of N sample registrations (each one ledger entry)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fgtrac_core.tracking import Run
from fgtrac_core.verify import verify_run
from sample_runs import digits


def _figures(run_dir: Path) -> dict[str, Any]:
    report = verify_run(run_dir)
    assert report.ok, report.first_failure
    ledger_s = report.ledger_seconds
    return {
        "entries": report.n_entries,
        "ledger_seconds": ledger_s,
        "entries_per_s": report.n_entries / ledger_s,
        "total_seconds": report.seconds,
        "checks": {c.name: round(c.seconds, 4) for c in report.checks},
    }


def measure(synthetic_entries: int = 1_000_000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("FGTRAC_KEY_DIR", str(Path(tmp) / "keys"))
        sample_dir = digits.build(Path(tmp) / "digits")
        out = {"sample_run": _figures(sample_dir)}
        synth = Path(tmp) / "synthetic"
        t0 = time.perf_counter()
        ids = np.arange(synthetic_entries, dtype=np.int64)
        hashes = [hashlib.sha256(int(i).to_bytes(8, "little")).hexdigest() for i in ids.tolist()]
        with Run.create(synth, name="synthetic") as run:
            run.register_samples(ids, split="train", labels=ids % 10, content_sha256=hashes)
        record_s = time.perf_counter() - t0
        out["synthetic"] = {**_figures(synth), "record_seconds": record_s}
    return out


def report(res: dict[str, Any]) -> str:
    s, y = res["sample_run"], res["synthetic"]
    return (
        f"verify throughput: sample run {s['entries']:,} entries in {s['ledger_seconds']:.3f} s "
        f"= {s['entries_per_s']:,.0f} entries/s (all checks incl. source re-hash {s['total_seconds']:.2f} s); "
        f"synthetic {y['entries']:,} entries in {y['ledger_seconds']:.2f} s = {y['entries_per_s']:,.0f} entries/s "
        f"(recording them took {y['record_seconds']:.1f} s)"
    )


if __name__ == "__main__":
    print(report(measure()))
