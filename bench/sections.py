"""The benchmarks `python -m bench` runs, in BENCHMARKS.md's order: how each is measured and how its figures read.

Every section is one `Section`: `measure(quick)` returns its figures (a JSON-able dict, kept in bench/results.json
under its key) and `render(figures)` its Markdown, starting with the section's heading.  `report_file` puts the
rendered text into BENCHMARKS.md as a dated block (`update`, stamped by `measured`).
"""

from __future__ import annotations

import json
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cleanlab
import duckdb
import sklearn
import torch

from bench import (
    crash_concurrency,
    dashboard_scale,
    dashboard_speed,
    faithfulness,
    influence_scale,
    influence_speed,
    mislabel,
    peers_dattri,
    ray_scaling,
    recorder_overhead,
    report_file,
    run_faithfulness,
    stage_faithfulness,
    verify_throughput,
)


@dataclass(frozen=True)
class Section:
    key: str  # its key in results.json and its block's name in BENCHMARKS.md
    measure: Callable[[bool], dict[str, Any]]  # quick -> figures
    report: Callable[[dict[str, Any]], str]  # what the run prints
    render: Callable[[dict[str, Any]], str]  # the Markdown, from its "## " heading on
    in_quick: bool = True  # False: builds large runs of its own, left out of `--quick`


def _recorder_overhead(ro: dict[str, Any]) -> str:
    return f"""## Recorder overhead

The sample pipeline's training loop (digits CNN, 3 stages, {ro["steps"]} steps, 16 checkpoints, ~{ro["train_plain_s"]:.1f} s)
timed with the real recorder and with a `NullRun` (identical loop, no recording), back to back in each of
{ro["repeats"]} repeats (the arm that runs first alternates). Seconds are each arm's median; an overhead is the median
of the repeats' overheads, each against the plain loop of its own repeat, with the 95% bootstrap interval of that
median: a goal is met when the interval's upper end is within it.

| | seconds | vs. not recorded |
|---|---|---|
| training loop, not recorded | {ro["train_plain_s"]:.3f} | |
| training loop, recorded | {ro["train_recorded_s"]:.3f} | **{ro["overhead_pct"]:+.1f}%** ({recorder_overhead.goal_text(ro, "loop")}) |
| training loop with only the optimizer step hooks (hyperparameters, gradient identity and version check, gradient copies while the loop modifies gradients, parameter fingerprint) | {ro.get("train_hooks_s", float("nan")):.3f} | **{ro.get("hooks_overhead_pct", float("nan")):+.1f}%** |
| optimizer step hooks, paired step by step (two identical models on the same batches and schedules, steps alternating, the hooks crossed over between them every epoch; the first step after attaching, which copies the gradients once, counted once per stage as the recorder attaches them): {recorder_overhead.paired_summary(ro)} | | **goal <= {ro.get("hooks_goal_pct", 2.0):.0f}% of the sample loop's time: {"met" if ro.get("hooks_goal_met") else "not met"}** |
| + `close()` (drains the background writer: everything committed, signed, snapshot published) | {ro["end_to_end_s"]:.3f} | **{ro["end_to_end_overhead_pct"]:+.1f}%** ({recorder_overhead.goal_text(ro, "end_to_end")}) |
| ingest before training (hashing, thumbnails, insert of 1,797 samples, until committed: `flush()`) | {ro["ingest_s"]:.3f} | |
| the writer thread's CPU time over loop and `close()` (`Run.background_cpu_s`) | {ro.get("writer_cpu_s", float("nan")):.3f} | {ro.get("writer_cpu_pct", float("nan")):.1f}% of the plain loop's time |
{_pair_rows(ro)}

The whole-loop figures move by several percent between repeats on this 2-core machine (the hooks-only arm per
repeat: {recorder_overhead._span(ro.get("hooks_overhead_paired_pct", []))}), so the hooks' cost is measured step by step:
every step of a hooked model is timed beside the same step of an identical unhooked one (zero_grad, forward,
backward, optimizer step), and the {recorder_overhead.TRIM:.0%}-trimmed mean of those differences, with its bootstrap 95%
interval, is set against the whole sample loop's time per step (data loading, scheduler and evaluation included:
the goal's "sample loop's time"); the goal counts as met when the interval's upper end is within it. Trimmed,
because a step the scheduler preempts costs milliseconds in either arm at random: the plain mean (given beside it)
wanders by +-15 us between runs minutes apart while the hooks do the same work at every step. The share of the
bare step, the smallest denominator the loop has, is given too, and an A/A run (the same pairing, no hooks
anywhere) shows the measurement's own noise.
The training thread only validates, buffers and enqueues; checkpoint serialisation, fsync, DuckDB commits,
ledger entries, a signed tree head per checkpoint and the snapshot run on a writer thread at the lowest CPU
priority (nice 19), with the GIL's switch interval shortened while it lives (`fgtrac_core/tracking/_switch_interval.py`:
torch releases the GIL around each operator, and a writer holding it kept the training thread waiting). This loop
keeps both cores busy with torch's threads, so the writer gets little CPU while it runs and finishes its backlog in
`close()`: that deferred work is the end-to-end figure. With `Run.create(..., writer="process")` the writer is a
child process that holds the database, the ledger and the signing key (`fgtrac_core/tracking/_writer_process.py`);
the training process keeps one nice-19 thread that serialises checkpoints and builds the Arrow rows, and no longer
shares the GIL with the rest. It pays where training leaves a core free (torch on one thread here, a GPU loop's
host) and not where torch keeps every core busy. On a machine with a GPU the section also times both writers with
the loop on it (an H100 host's figures: [docs/scale.md](docs/scale.md#recording-on-a-gpu-measured)). Where the
recorder's time goes, and what was measured about it: [docs/scale.md](docs/scale.md#what-recording-costs-measured).
"""


def _pair_rows(ro: dict[str, Any]) -> str:
    """The table rows of the other plain / recorded pairs: the writer in its own process, torch on one thread
    (which leaves the writer a core of its own), both, and on a machine with a GPU the loop on it."""
    rows = []
    for key, what in recorder_overhead.OTHER_PAIRS.items():
        pair = ro.get(key)
        if not pair:
            if key not in recorder_overhead.GPU_PAIRS:  # (a GPU's pairs are left out where none was measured)
                rows.append(f"| {what}: n/a | | |")
            continue
        rows += [
            f"| {what}: the plain loop beside it (not recorded) | {pair['train_plain_s']:.3f} | |",
            f"| {what}: recorded | {pair['train_recorded_s']:.3f} | **{pair['overhead_pct']:+.1f}%** "
            f"({recorder_overhead.goal_text(pair, 'loop')}) |",
            f"| {what}: + `close()` | {pair['end_to_end_s']:.3f} | **{pair['end_to_end_overhead_pct']:+.1f}%** "
            f"({recorder_overhead.goal_text(pair, 'end_to_end')}; writer CPU {pair['writer_cpu_s']:.3f} s) |",
        ]
    return "\n".join(rows)


def _verify_throughput(vt: dict[str, Any]) -> str:
    return f"""## Verify throughput

`verify_run`: every entry recomputed from its table row and compared, leaf and chain hashes, Merkle roots at every
signed head, signatures. Entries per second over those ledger checks (checkpoint-file and source-data re-hashing
excluded):

| run | entries | seconds | entries/s |
|---|---|---|---|
| sample run | {vt["sample_run"]["entries"]:,} | {vt["sample_run"]["ledger_seconds"]:.3f} | {vt["sample_run"]["entries_per_s"]:,.0f} |
| synthetic (sample registrations) | {vt["synthetic"]["entries"]:,} | {vt["synthetic"]["ledger_seconds"]:.2f} | {vt["synthetic"]["entries_per_s"]:,.0f} |

Seconds per check on the synthetic run: {vt["synthetic"]["checks"]}
"""


def _influence_speed(inf: dict[str, Any]) -> str:
    return f"""## Influence speed (last-layer TracInCP vs Captum TracInCPFast)

Sample run, {inf["n_test"]} test x {inf["n_train"]} train digits, the {inf["checkpoints"]} FG-Trac-selected checkpoints,
bias gradient left out on both sides (Captum's convention), same process, interleaved, median of {inf["repeats"]}:

| job | fgtrac (s) | Captum (s) | speed-up |
|---|---|---|---|
| review: top-{inf["k"]} proponents + opponents per test example, self-influence of every training sample | {inf["ours_review_s"]:.3f} | {inf["captum_review_s"]:.3f} | {inf["review_speedup"]:.1f}x |
| full score matrix | {inf["ours_full_s"]:.3f} | {inf["captum_full_s"]:.3f} | {inf["full_speedup"]:.1f}x |

The bare matmuls of the full matrix take {inf["matmuls_s"]:.4f} s: at this size both tools spend their time in the
forward/backward passes that produce the per-checkpoint gradient factors, not in the products. fgtrac's scoring
phase alone (factors precomputed) takes {inf["ours_scoring_s"]:.4f} s = **{inf["scoring_vs_matmuls"]:.2f}x** the bare
matmuls (goal: within 1.5x).
"""


def _influence_scale(sc: dict[str, Any]) -> str:
    return f"""## Influence at scale

{sc["n_train"]:,} training x {sc["n_test"]:,} test samples x {sc["checkpoints"]} checkpoints (synthetic inputs, MLP
64 -> 128 -> 10, last layer), the review job (top-{sc["k"]} proponents and opponents of every test sample, streamed
over training chunks, plus every training sample's self-influence), in a fresh process on {sc["torch_threads"]} threads:
**{sc["seconds"]:.1f} s**, peak resident memory **{sc["peak_rss_gib"]:.2f} GiB** (the process held
{sc["rss_before_gib"]:.2f} GiB before the job; budget 24 GB).
"""


def _ray_scaling(r: dict[str, Any]) -> str:
    return (
        "## Influence sharded on Ray\n\n" + ray_scaling.report(r).replace("\n  ", "\n- ")
        + "\n\nHow to run it on a cluster, and what the projection leaves out: [docs/scale.md](docs/scale.md).\n"
    )


def _dashboard_speed(r: dict[str, Any]) -> str:
    return "## Dashboard speed (real headless chromium)\n\n" + dashboard_speed.report(r) + ".\n"


SECTIONS: tuple[Section, ...] = (
    Section(
        "recorder_overhead", lambda q: recorder_overhead.measure(repeats=2 if q else 7), recorder_overhead.report,
        _recorder_overhead,
    ),
    Section(
        "verify_throughput", lambda q: verify_throughput.measure(synthetic_entries=50_000 if q else 1_000_000),
        verify_throughput.report, _verify_throughput,
    ),
    Section(
        "influence_speed", lambda q: influence_speed.measure(repeats=2 if q else 5), influence_speed.report,
        _influence_speed,
    ),
    Section("influence_scale", lambda q: influence_scale.measure(quick=q), influence_scale.report, _influence_scale),
    Section("ray_scaling", lambda q: ray_scaling.measure(quick=q), ray_scaling.report, _ray_scaling),
    Section("dashboard_speed", lambda q: dashboard_speed.measure(), dashboard_speed.report, _dashboard_speed, False),
    Section(
        "dashboard_scale", lambda q: dashboard_scale.measure(), dashboard_scale.report, dashboard_scale.markdown, False
    ),
    Section("mislabel", lambda q: mislabel.measure(quick=q), mislabel.summarise, mislabel.summarise),
    Section("faithfulness", lambda q: faithfulness.measure(quick=q), faithfulness.summarise, faithfulness.summarise),
    Section(
        "run_faithfulness", lambda q: run_faithfulness.measure(quick=q), run_faithfulness.summarise,
        run_faithfulness.summarise,
    ),
    Section(
        "stage_faithfulness", lambda q: stage_faithfulness.measure(quick=q), stage_faithfulness.summarise,
        stage_faithfulness.summarise,
    ),
    Section(
        "crash_concurrency", lambda q: crash_concurrency.measure(), crash_concurrency.report,
        crash_concurrency.markdown, False,
    ),
)  # fmt: skip
BY_KEY: dict[str, Section] = {s.key: s for s in SECTIONS}
ORDER: list[str] = [s.key for s in SECTIONS]

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
