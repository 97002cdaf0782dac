"""Influence sharded on Ray: the influence-at-scale job (bench/influence_scale.py: synthetic MLP, last-layer
review, top-50 both ways + self-influence) on a local Ray cluster of 1 and of 2 workers, against one process.

Each arm runs in a fresh subprocess (its own Ray cluster, its own peak memory).  Per shard it reports the seconds
on its worker and the worker's peak resident memory, from which a reader can project N workers: wall ≈ driver
time (test features, merge) + ceil(shards / N) × per-shard seconds.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import subprocess
import sys
import time
from typing import Any


def _job(n_train: int, n_test: int, n_checkpoints: int, workers: int, shard_size: int) -> dict[str, Any]:
    from bench.influence_scale import _problem
    from fgtrac_core.influence import review
    from fgtrac_core.influence.sharded import connected, sharded_review

    model, train, test, checkpoints = _problem(n_train, n_test, n_checkpoints)
    if workers == 0:
        t0 = time.perf_counter()
        review(model, "head", train, test, checkpoints, k=50, cosine=True)
        return {"workers": 0, "seconds": time.perf_counter() - t0,
                "driver_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # fmt: skip
    with connected(num_cpus=workers):
        t_start = time.perf_counter()
        rev = sharded_review(model, "head", train, test, checkpoints, k=50, cosine=True, shard_size=shard_size)
        seconds = time.perf_counter() - t_start
    return {
        "workers": workers,
        "seconds": seconds,
        "shards": rev.n_shards,
        "shard_size": rev.shard_size,
        "shard_seconds_median": statistics.median(rev.shard_seconds),
        "shard_seconds_sum": sum(rev.shard_seconds),
        "worker_peak_rss_gib": max(rev.shard_peak_rss) / 2**30,
        "driver_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def measure(quick: bool = False) -> dict[str, Any]:
    """Single process, then Ray with 1 and 2 workers (8 shards), on the 60k x 10k x 10 job (quick: 6k x 1k x 3)."""
    shape = (6_000, 1_000, 3) if quick else (60_000, 10_000, 10)
    shard_size = math.ceil(shape[0] / 8)
    arms = []
    for workers in (0, 1, 2):
        proc = subprocess.run(
            [sys.executable, "-m", "bench.ray_scaling", *map(str, shape), str(workers), str(shard_size)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        arms.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"n_train": shape[0], "n_test": shape[1], "checkpoints": shape[2], "arms": arms}


def project(r: dict[str, Any], workers: int, n_train: int, n_test: int, n_checkpoints: int) -> float:
    """Projected seconds of a job on `workers` workers, scaled from the measured 1-worker per-shard figures
    (work grows as n_train × n_test × checkpoints; the driver's share as n_test × checkpoints)."""
    one = next(a for a in r["arms"] if a["workers"] == 1)
    pair_seconds = one["shard_seconds_sum"] / (r["n_train"] * r["n_test"] * r["checkpoints"])
    driver = max(0.0, one["seconds"] - one["shard_seconds_sum"]) / (r["n_test"] * r["checkpoints"])
    return pair_seconds * n_train * n_test * n_checkpoints / workers + driver * n_test * n_checkpoints


def report(r: dict[str, Any]) -> str:
    lines = [f"influence sharded on Ray ({r['n_train']:,} train x {r['n_test']:,} test x {r['checkpoints']} "
             "checkpoints, last layer, top-50 raw and cosine + self-influence):"]  # fmt: skip
    for a in r["arms"]:
        if a["workers"] == 0:
            lines.append(f"  one process: {a['seconds']:.1f} s, peak RSS {a['driver_peak_rss_gib']:.2f} GiB")
        else:
            lines.append(
                f"  Ray, {a['workers']} worker(s), {a['shards']} shards of {a['shard_size']:,}: {a['seconds']:.1f} s "
                f"(per shard {a['shard_seconds_median']:.2f} s median on its worker, worker peak RSS "
                f"{a['worker_peak_rss_gib']:.2f} GiB, driver {a['driver_peak_rss_gib']:.2f} GiB)"
            )
    if any(a["workers"] == 1 for a in r["arms"]):
        lines.append(
            "  projected from the 1-worker per-shard figures: 1M train x 50k test x 10 checkpoints on 64 workers "
            f"{project(r, 64, 1_000_000, 50_000, 10) / 60:.0f} min, on 256 workers "
            f"{project(r, 256, 1_000_000, 50_000, 10) / 60:.0f} min"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 6:
        print(json.dumps(_job(*map(int, sys.argv[1:]))))
    else:
        print(report(measure(quick="--quick" in sys.argv)))
