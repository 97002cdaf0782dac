"""Recorder overhead: the sample pipeline's training loop with the real recorder vs. a `NullRun`.

Both arms run the identical loop (same seed, same batches, same evaluation); the only difference is whether the
recorder calls record.  Arms are interleaved so machine noise hits both alike; the median of each is compared.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fgtrac_core.tracking import NullRun, Run
from sample_runs import digits


def _timed_train(data: digits.DigitsData, run: Run | NullRun) -> float:
    t0 = time.perf_counter()
    digits.train(data, run, seed=0)
    return time.perf_counter() - t0


def measure(repeats: int = 5) -> dict[str, Any]:
    """Median training wall time with and without recording, and the overhead in percent."""
    digits.configure_determinism()
    data = digits.load_data(0)
    plain: list[float] = []
    recorded: list[float] = []
    ingest: list[float] = []
    close: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        _timed_train(data, NullRun())  # warm-up: first-call allocations and kernel selection
        for i in range(repeats):
            plain.append(_timed_train(data, NullRun()))
            t0 = time.perf_counter()
            run = Run.create(Path(tmp) / f"run{i}", name="bench")
            digits.record_dataset(run, data)
            ingest.append(time.perf_counter() - t0)
            recorded.append(_timed_train(data, run))
            t0 = time.perf_counter()
            run.close()
            close.append(time.perf_counter() - t0)
    p, r = statistics.median(plain), statistics.median(recorded)
    end_to_end = statistics.median([a + b for a, b in zip(recorded, close, strict=True)])
    return {
        "repeats": repeats,
        "train_plain_s": p,
        "train_recorded_s": r,
        "overhead_pct": 100.0 * (r - p) / p,
        "close_s": statistics.median(close),
        "end_to_end_s": end_to_end,
        "end_to_end_overhead_pct": 100.0 * (end_to_end - p) / p,
        "ingest_s": statistics.median(ingest),
        "steps": 330,
    }


def report(res: dict[str, Any]) -> str:
    return (
        f"recorder overhead: training loop {res['train_plain_s']:.3f} s plain vs {res['train_recorded_s']:.3f} s "
        f"recorded (median of {res['repeats']}) -> {res['overhead_pct']:+.1f}%; until everything is durable "
        f"(loop + close, which drains the background writer) {res['end_to_end_s']:.3f} s -> "
        f"{res['end_to_end_overhead_pct']:+.1f}%; ingest of 1,797 samples (hash, thumbnails, insert) "
        f"{res['ingest_s']:.3f} s"
    )


if __name__ == "__main__":
    print(report(measure()))
