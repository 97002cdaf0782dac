"""The dashboard at scale: a run with 1,000,000 training samples (issue 15 item 4; goals: Explore first render on a
warm server <= 2 s, switching test example <= 0.5 s, in real chromium; the per-example queries read through an
index or the zone maps of sorted storage, never a whole million-row table).

The run: `sample_runs.digits_large`'s generated samples (1M augmented digits, 1,000 validation, 2,000 test)
registered with their PNG thumbnails through the real recorder, then its model trained one epoch per stage in
batches of 1,024 (the 50k benchmark's 3/2/1 epochs of 256 would make ~9,000 recorded steps; what is measured is
the dashboard, not the training), then `fgtrac influence --k 20` and `fgtrac verify`.  Its config names no
bundled pipeline, so verify checks the whole ledger but does not re-derive the 1M samples from the source
(digits_large's source hashes are those of its default 50k run).

    python -m bench.dashboard_scale [RUN_DIR] [--write]   # builds the 1M run (into RUN_DIR when it is not there)
                                                         # --write: into BENCHMARKS.md and bench/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import dashboard_speed
from fgtrac_core.store import RunStore
from fgtrac_core.store.plans import Scan, statements

N_TRAIN = 1_000_000
BATCH_SIZE = 1024
STAGES: dict[str, dict[str, Any]] = {
    "pretrain": {"epochs": 1, "fraction": 0.45, "checkpoint_every": 1},
    "finetune": {"epochs": 1, "fraction": 0.45, "checkpoint_every": 1},
    "adapt": {"epochs": 1, "fraction": 0.10, "checkpoint_every": 1},
}
ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Dashboard at 1,000,000 training samples (real headless chromium)"
GOALS = {"first_render_warm_s": 2.0, "switch_s": 0.5}


def build(out: Path, *, n_train: int = N_TRAIN, k: int = 20) -> dict[str, float]:
    """Record the 1M-sample run into `out`, compute its influence and verify it; seconds of each phase."""
    from fgtrac_core.influence.run_influence import run_influence
    from fgtrac_core.tracking import Run
    from fgtrac_core.verify import verify_run
    from sample_runs import digits, digits_large

    t0 = time.perf_counter()
    digits.configure_determinism()
    data = digits_large.load_data(0, n_train)
    config = {
        "pipeline": "bench.dashboard_scale",  # not a bundled source pipeline: see the module docstring
        "seed": 0,
        "n_train": n_train,
        "batch_size": BATCH_SIZE,
        "torch_threads": torch.get_num_threads(),
        "model": "sample_runs.digits:DigitsCNN",
        "inputs": "sample_runs.digits_large:model_inputs",
        "head_layer": "head",
    }
    with Run.create(out, name=f"digits-{n_train // 1000}k", config=config) as run:
        t1 = time.perf_counter()
        digits.record_dataset(run, data)
        t2 = time.perf_counter()
        digits.train(data, run, seed=0, stages=STAGES, batch_size=BATCH_SIZE)
        t3 = time.perf_counter()
    t4 = time.perf_counter()
    run_influence(out, k=k)
    t5 = time.perf_counter()
    report = verify_run(out)
    t6 = time.perf_counter()
    if not report.ok:
        raise RuntimeError(f"the built run does not verify: {report.first_failure}")
    return {"generate_s": t1 - t0, "register_s": t2 - t1, "train_s": t3 - t2, "close_s": t4 - t3,
            "influence_s": t5 - t4, "verify_s": t6 - t5, "total_s": t6 - t0}  # fmt: skip


def _queries(store: RunStore) -> list[tuple[str, str, tuple[Any, ...]]]:
    """(when it runs, RunStore method, arguments) of every query Explore and the pages it links to run, for a
    test example in the middle of the run and its first proponent."""
    aid = store.latest_analysis("influence")["analysis_id"]
    tests = store.influence_tests(aid)["sample_id"].tolist()
    test = int(tests[len(tests) // 2])
    top = store.influence_topk(aid, test, "raw")
    proponents = [int(i) for i in top.query("direction == 'proponent' and rank <= 10")["train_id"]]
    opponents = [int(i) for i in top.query("direction == 'opponent' and rank <= 10")["train_id"]]
    train = proponents[0]
    influenced = [int(t) for t in store.most_influenced(aid, train)["test_id"]]
    return [
        ("once", "analyses", ("influence",)),
        ("once", "analysis", (aid, "influence")),
        ("once", "incomplete_stages", ()),
        ("once", "idle_stages", ()),
        ("once", "marks", ()),
        ("once", "marked_ids", ("label_flipped",)),
        ("once", "influence_tests", (aid,)),
        ("switch", "thumbnails", ([test],)),
        ("switch", "influence_topk", (aid, test, "raw", "label_flipped")),
        ("switch", "thumbnails", (proponents,)),
        ("switch", "thumbnails", (opponents,)),
        ("switch", "stage_effects", (aid, test)),  # empty here: this run has no stage analysis
        ("contributions tab", "uses_in_steps", (train, [(0, 10**9)])),
        ("lifecycle", "sample", (train,)),
        ("lifecycle", "sample_usage", (train,)),
        ("lifecycle", "sample_transforms", (train,)),
        ("lifecycle", "self_influence_of", (aid, train)),
        ("lifecycle", "most_influenced", (aid, train, 10)),
        ("lifecycle", "labels_and_marks", (influenced, "label_flipped")),
        # the quality page's count and detection table depend only on the analysis and mark: once per snapshot
        ("once", "self_influence_count", (aid,)),
        ("once", "mislabel_detection", (aid, (0.05, 0.10, 0.20), "label_flipped")),
        ("quality", "self_influence", (aid, "label_flipped", 50)),
    ]


def _whole(scan: Scan) -> bool:
    """A scan that reads most of a table of several row groups (122,880 rows each) without an index: neither the
    primary key nor the zone maps of sorted storage narrowed it."""
    return scan.kind != "Index Scan" and scan.row_groups > 1 and scan.row_groups_scanned > scan.row_groups / 2


def profile_queries(run: Path, repeats: int = 3) -> list[dict[str, Any]]:
    """Each query's time (ms: its first call on a freshly opened store, and the median of `repeats` more) and its
    largest table scan."""
    out = []
    with RunStore(run) as store:
        queries = _queries(store)
    with RunStore(run) as store:  # a fresh one: the once-per-snapshot reads are measured cold
        for when, method, args in queries:
            t0 = time.perf_counter()
            getattr(store, method)(*args)
            first = time.perf_counter() - t0
            _, stmts = statements(store, method, *args)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                getattr(store, method)(*args)
                times.append(time.perf_counter() - t0)
            scans = [s for st in stmts for s in st.scans or ()]
            big = max(scans, key=lambda s: s.rows_scanned, default=None)
            unknown = any(st.scans is None for st in stmts)
            out.append({
                "when": when, "query": method, "first_ms": 1000 * first, "ms": 1000 * statistics.median(times),
                "largest_scan": None if big is None else {"table": big.table, "kind": big.kind,
                                                           "rows": big.rows_scanned, "row_groups": big.row_groups_scanned,
                                                           "of_row_groups": big.row_groups},
                "plan_unknown": unknown,
                "whole_table": big is not None and _whole(big),
            })  # fmt: skip
    return out


def measure(run_dir: str | Path | None = None, *, switches: int = 11) -> dict[str, Any]:
    """Build the 1M run (into a temporary directory when `run_dir` is None; into `run_dir` when it does not exist
    yet, keeping its build seconds beside it in RUN_DIR.build.json), profile its queries, time Explore in
    chromium."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("FGTRAC_KEY_DIR", str(Path(tmp) / "keys"))
        out: dict[str, Any] = {"goals": GOALS}
        run = Path(tmp) / "digits-1m" if run_dir is None else Path(run_dir)
        built = run.with_name(run.name + ".build.json")
        if not run.exists():
            out["build_s"] = build(run)
            if run_dir is not None:
                built.write_text(json.dumps(out["build_s"]) + "\n")
        elif built.exists():
            out["build_s"] = json.loads(built.read_text())
        out["queries"] = profile_queries(run)
        out["browser"] = dashboard_speed.measure(run, switches=switches)
        return out


def report(res: dict[str, Any]) -> str:
    b = res["browser"]
    first, sw = b["first_render_warm_s"], b["switch_s"]
    met = lambda value, goal: "met" if value <= goal else "not met"  # noqa: E731
    lines = [
        f"Dashboard on {b['n_train']:,} training samples, {b['n_test']:,} test examples ({b['cpus']} CPUs, load "
        f"{b['load_avg_1min_before']:.1f} before, {b['load_avg_1min_after']:.1f} after):",
    ]
    if "build_s" in res:
        bs = res["build_s"]
        lines.append(
            f"  building the run took {bs['total_s'] / 60:.1f} min (register {bs['register_s']:.0f} s, train "
            f"{bs['train_s']:.0f} s, close {bs['close_s']:.0f} s, influence {bs['influence_s']:.0f} s, verify "
            f"{bs['verify_s']:.0f} s)"
        )
    lines += [
        f"  Explore first render on a warm server {first:.2f} s (goal <= {GOALS['first_render_warm_s']} s: "
        f"{met(first, GOALS['first_render_warm_s'])}); on a freshly started server {b['first_render_cold_server_s']:.2f} s",
        f"  switching test example median {sw['median']:.2f} s, worst {sw['max']:.2f} s of {len(sw['all'])} (goal <= "
        f"{GOALS['switch_s']} s: median {met(sw['median'], GOALS['switch_s'])}, worst {met(sw['max'], GOALS['switch_s'])})",
    ]
    if "images_fetched_per_switch" in b:
        lines.append(
            f"  images: {b['images_shown']} on the page, {max(b['images_fetched_per_switch'])} at most fetched per "
            "switch (the thumbnails shown, nothing else)"
        )
    whole = [q["query"] for q in res["queries"] if q["whole_table"] and q["when"] != "once"]
    lines.append(
        "  queries reading most of a large table (no index, zone maps pruned under half its row groups), besides "
        "the once-per-snapshot ones: "
        + (", ".join(sorted(set(whole))) if whole else "none")
    )
    return "\n".join(lines)


def markdown(res: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: the report and every query's time and largest scan."""
    rows = []
    for q in res["queries"]:
        s = q["largest_scan"]
        scan = "(DuckDB reports no plan)" if q.get("plan_unknown") and s is None else "—" if s is None else (
            f"{s['table']}: {s['kind'].lower()}, {s['rows']:,} rows ({s['row_groups']} of {s['of_row_groups']} row groups)"
        )  # fmt: skip
        rows.append(f"| {q['when']} | `{q['query']}` | {q['first_ms']:.1f} | {q['ms']:.1f} | {scan} |")
    return (
        HEADING
        + "\n\n"
        + report(res).replace("\n  ", "\n- ")
        + "\n\nEvery query the pages run, on a freshly opened store of that run, in this order (first call, then "
        "median of 3 more; `once`: per snapshot (for the analysis and mark shown), "
        "cached by the app; `switch`: when Explore shows another test example; `contributions tab`: when "
        "its per-checkpoint tab is open; `lifecycle`/`quality`: the pages Explore links to):\n\n"
        "| runs | query | first ms | again ms | largest table scan |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def write(res: dict[str, Any], stamp: dict[str, Any], markdown_path: Path, json_path: Path) -> None:
    """Put this section into BENCHMARKS.md and its figures into results.json, as `python -m bench --only
    dashboard_scale` does (every other section left as it was); `stamp`: `bench.sections.measured`'s, taken when
    the measurement began."""
    from bench.sections import update  # bench.sections imports this module

    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    results["dashboard_scale"] = {**res, "measured": stamp}
    update(results, ["dashboard_scale"], markdown_path, json_path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard_scale", description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="an already built run (default: build one)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md and bench/results.json")
    args = parser.parse_args(argv)
    from bench.sections import measured  # bench.sections imports this module

    stamp = measured(quick=False)
    res = measure(args.run)
    print(report(res))
    if args.write:
        write(res, stamp, ROOT / "BENCHMARKS.md", ROOT / "bench" / "results.json")


if __name__ == "__main__":
    main()
