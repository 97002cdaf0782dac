"""Crash recovery and concurrent readers: `python -m bench.crash_concurrency [--kills N] [--repeats R] [--markdown]`.

Crash campaign: the small recording of tests/tracking/_recording.py (tiny MLP, 2 stages, 300 steps, a checkpoint
every 50 steps) SIGKILLed at N seeded random moments spread over registration, mid-stage, checkpoint file write,
snapshot publish and close; each run then reopened with `Run.open` (recovery), closed and verified, its batches
compared with the script's (a prefix, no gaps).  Readers: the same recording (600 steps) with and without
`fgtrac info`, `fgtrac verify` and the dashboard (AppTest) hammering it, interleaved, median of R each.

The machinery is shared with tests/tracking/test_crash_campaign.py and test_concurrent_readers.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from tests.tracking import _campaign, _readers

READER_STEPS = 300  # per stage, as in test_concurrent_readers.py


def measure(kills: int = 20, repeats: int = 3, seed: int = 14) -> dict[str, Any]:
    os.environ.setdefault(
        "FGTRAC_KEY_DIR", tempfile.mkdtemp(prefix="fgtrac-bench-keys-")
    )  # never the user's key
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results, _ = _campaign.campaign(Path(tmp) / "campaign", kills, seed)
        rec = [r.recovery for r in results if r.recovery is not None]
        ok = [r.recovery is not None and r.recovery.verify_ok and not r.recovery.problems for r in results]
        survived = [r for r, good in zip(results, ok, strict=True) if good]
        failures = [
            f"aimed {r.kill.phase}, landed {r.landed}: "
            + (r.error or r.recovery.verify_failure or "; ".join(r.recovery.problems))
            for r, good in zip(results, ok, strict=True)
            if not good
        ]
        sl = _readers.slowdown(
            Path(tmp) / "readers", repeats=repeats, steps=READER_STEPS, every=_campaign.EVERY
        )
    logs = [log for run in sl["logs"] for log in run.values()]
    by_reader: dict[str, dict[str, Any]] = {}
    for name in ("info", "verify", "app"):
        mine = [log for log in logs if log.name == name]
        secs = [s for log in mine for s in log.seconds]
        by_reader[name] = {
            "calls": sum(log.calls for log in mine),
            "failed": sum(len(log.failures) for log in mine),
            "median_s": statistics.median(secs) if secs else float("nan"),
            "failures": [f for log in mine for f in log.failures][:5],
        }
    return {
        "kills": len(results),
        "survived": len(survived),
        "failures": failures,
        "aimed": dict(Counter(r.kill.phase for r in results)),
        "landed": dict(Counter(r.landed for r in results)),
        "recovery_s": _stats([r.recovery_s for r in rec]),
        "close_s": _stats([r.close_s for r in rec]),
        "verify_s": _stats([r.verify_s for r in rec]),
        "batches_lost": _stats([float(r.logged - r.recovery.n_batches) for r in results if r.recovery]),
        "temporaries_after_kill": sum(bool(r.temporaries_after_kill) for r in rec),
        "temporaries_after_open": sum(bool(r.temporaries_after_open) for r in rec),
        "readers": {k: v for k, v in sl.items() if k not in ("logs", "reader_runs")},
        "reader_calls": by_reader,
        "verify_saw_recorder": sum(log.saw_recorder for log in logs if log.name == "verify"),
        "verify_snapshot_sizes": sorted({s for log in logs if log.name == "verify" for s in log.sizes}),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def _stats(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"median": float("nan"), "max": float("nan"), "min": float("nan")}
    return {"median": statistics.median(xs), "max": max(xs), "min": min(xs)}


def report(r: dict[str, Any]) -> str:
    rd = r["readers"]
    calls = ", ".join(f"{k} {v['calls']} calls ({v['failed']} failed)" for k, v in r["reader_calls"].items())
    text = (
        f"crash campaign: {r['survived']}/{r['kills']} SIGKILLs recovered to a verified prefix (aimed {r['aimed']}; "
        f"landed {r['landed']}); Run.open median {r['recovery_s']['median']:.2f} s (max {r['recovery_s']['max']:.2f}), "
        f"close {r['close_s']['median']:.2f} s, verify_run {r['verify_s']['median']:.2f} s "
        f"(max {r['verify_s']['max']:.2f}); batches logged but lost median {r['batches_lost']['median']:.0f} "
        f"(max {r['batches_lost']['max']:.0f}); temporaries left by the kill {r['temporaries_after_kill']}, after "
        f"Run.open {r['temporaries_after_open']}\n"
        f"concurrent readers: training loop {rd['loop_plain_s']:.2f} s alone vs {rd['loop_readers_s']:.2f} s with "
        f"readers (median of {rd['repeats']}) -> {rd['slowdown_pct']:+.0f}%; loop + close {rd['e2e_plain_s']:.2f} s "
        f"vs {rd['e2e_readers_s']:.2f} s -> {rd['e2e_slowdown_pct']:+.0f}%; training thread CPU in the loop "
        f"{rd['cpu_plain_s']:.2f} s vs {rd['cpu_readers_s']:.2f} s -> {rd['cpu_slowdown_pct']:+.0f}%; {calls}; "
        f"verify checked snapshots of ledger sizes {r['verify_snapshot_sizes']}; verify found the recorder "
        f"holding the live database {r['verify_saw_recorder']} times; load average {r['load_before']:.1f} before, "
        f"{r['load_after']:.1f} after"
    )
    if r["failures"]:
        text += "\nfailed kills:\n  " + "\n  ".join(r["failures"])
    for name, v in r["reader_calls"].items():
        if v["failures"]:
            text += f"\n{name} failures: {v['failures']}"
    return text


def markdown(r: dict[str, Any]) -> str:
    rd, rc = r["readers"], r["reader_calls"]
    return f"""## Crash recovery and concurrent readers

`python -m bench.crash_concurrency` (the machinery of tests/tracking/test_crash_campaign.py and
test_concurrent_readers.py). A small recording (tiny MLP, 2 stages, 300 steps, a checkpoint every 50 steps) was
SIGKILLed at {r["kills"]} seeded random moments spread over registration, mid-stage, checkpoint file write, snapshot
publish and close (where the kills landed: {", ".join(f"{k} {v}" for k, v in sorted(r["landed"].items()))}), then
reopened with `Run.open`, closed and verified. Load average {r["load_before"]:.1f} when it started (the machine was
shared).

| | median | max |
|---|---|---|
| kills recovered (Run.open ok, verify ok, batches a prefix of the script's) | **{r["survived"]}/{r["kills"]}** | |
| `Run.open` after the kill (ledger check of live database and snapshot, recovery, first publish) | {r["recovery_s"]["median"]:.2f} s | {r["recovery_s"]["max"]:.2f} s |
| `verify_run` of the recovered run | {r["verify_s"]["median"]:.2f} s | {r["verify_s"]["max"]:.2f} s |
| batches the script had logged but the run lost | {r["batches_lost"]["median"]:.0f} | {r["batches_lost"]["max"]:.0f} |

Temporaries left behind by the kill: {r["temporaries_after_kill"]} runs; still there after `Run.open`:
{r["temporaries_after_open"]}.{_failed(r)}

Readers: the same recording with 600 steps, with and without `fgtrac info` and `fgtrac verify` (back to back,
fresh processes) and the dashboard (AppTest: Overview rerun, Audit's Verify ledger) hammering it, interleaved,
median of {rd["repeats"]}:

| | alone | with readers | slowdown |
|---|---|---|---|
| training loop | {rd["loop_plain_s"]:.2f} s | {rd["loop_readers_s"]:.2f} s | **{rd["slowdown_pct"]:+.0f}%** |
| loop + `close()` | {rd["e2e_plain_s"]:.2f} s | {rd["e2e_readers_s"]:.2f} s | {rd["e2e_slowdown_pct"]:+.0f}% |
| training thread's CPU time in the loop | {rd["cpu_plain_s"]:.2f} s | {rd["cpu_readers_s"]:.2f} s | {rd["cpu_slowdown_pct"]:+.0f}% |

Reader calls: info {rc["info"]["calls"]} ({rc["info"]["failed"]} failed, median {rc["info"]["median_s"]:.1f} s),
verify {rc["verify"]["calls"]} ({rc["verify"]["failed"]} failed, median {rc["verify"]["median_s"]:.1f} s; {r["verify_saw_recorder"]} found the
live database held by the recorder), dashboard {rc["app"]["calls"]} ({rc["app"]["failed"]} failed).
"""


def _failed(r: dict[str, Any]) -> str:
    if not r["failures"]:
        return ""
    return "\n\nKills that did not recover:\n\n" + "\n".join(f"- {f}" for f in r["failures"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.crash_concurrency")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--markdown", action="store_true", help="also print the BENCHMARKS.md section")
    args = p.parse_args(argv)
    res = measure(args.kills, args.repeats, args.seed)
    print(report(res))
    if args.markdown:
        print()
        print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
