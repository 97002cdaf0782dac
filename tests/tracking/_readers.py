"""Readers hammering a run while it is being recorded (tests/tracking/test_concurrent_readers.py and
bench/crash_concurrency.py): `fgtrac info` and `fgtrac verify` in fresh processes, back to back, each on its own
thread, and the dashboard (AppTest on app/main.py: the Overview page rerun, the Audit page's Verify ledger
button) on the calling thread.  Every call is logged with its outcome; a failure keeps its exact text.
"""

from __future__ import annotations

import os
import re
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.tracking import _campaign
from tests.tracking._campaign import Child

APP = str(_campaign.ROOT / "app" / "main.py")
HELD = "is held by a recorder"  # what `fgtrac verify` says of a live database it skipped


@dataclass
class ReaderLog:
    name: str
    calls: int = 0
    seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    saw_recorder: int = 0  # verify calls that found the live database held (so they ran during the recording)
    sizes: set[int] = field(default_factory=set)  # ledger sizes of the snapshots verify checked


def _info(proc) -> str | None:
    return (
        None
        if proc.returncode == 0
        else f"exit {proc.returncode}: {proc.stderr.strip() or proc.stdout[-500:]}"
    )


def _verify(proc) -> str | None:
    if proc.returncode == 0 and "Ledger intact" in proc.stdout:
        return None
    return f"exit {proc.returncode}: {proc.stdout[-1500:]} {proc.stderr.strip()}"


def _cli_loop(log: ReaderLog, args: list[str], check: Callable, stop: threading.Event) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            proc = _campaign.cli(*args, timeout=120)
        except Exception as exc:  # a hung reader is a failure too
            log.failures.append(f"{type(exc).__name__}: {exc}")
            continue
        log.seconds.append(time.perf_counter() - t0)
        log.calls += 1
        if (problem := check(proc)) is not None:
            log.failures.append(problem)
        if HELD in proc.stdout:
            log.saw_recorder += 1
        if m := re.search(r"(\d+) ledger entries", proc.stdout):
            log.sizes.add(int(m.group(1)))


def _app_loop(run_dir: Path, log: ReaderLog, done: Callable[[], bool]) -> None:
    """Until `done()`: rerun the Overview page, then click Verify ledger on the Audit page, each time checking that
    the app raised nothing and showed no error (the 'still being recorded' warning is expected)."""
    from streamlit.testing.v1 import AppTest

    page = 0
    at: AppTest | None = None
    while not done():
        t0 = time.perf_counter()
        try:
            if at is None:
                at = AppTest.from_file(APP, default_timeout=120)
                at.run()
            if page % 2 == 0:
                at.switch_page("views/overview.py")
                at.run()
                problem = _app_problem(at)
            else:
                at.switch_page("views/audit.py")
                at.run()
                at.button(key="verify_ledger").click()
                at.run()
                problem = _app_problem(at)
                if problem is None and not any("Ledger intact" in s.value for s in at.success):
                    problem = f"Verify ledger showed no 'Ledger intact': {[m.value for m in at.markdown][:5]}"
        except Exception as exc:
            problem, at = f"{type(exc).__name__}: {exc}", None
        log.seconds.append(time.perf_counter() - t0)
        log.calls += 1
        page += 1
        if problem is not None:
            log.failures.append(problem)


def _app_problem(at) -> str | None:
    if at.exception:
        return f"exception: {[e.value for e in at.exception]}"
    if at.error:
        return f"error: {[e.value for e in at.error]}"
    return None


def record(
    run_dir: Path, *, readers: bool, steps: int, every: int, app: bool = True
) -> tuple[float, float, float, dict[str, ReaderLog]]:
    """One recording (its loop seconds, loop + close seconds, the training thread's CPU seconds in the loop, as the
    child measured them) with or without readers
    hammering the run from the moment `Run.create` returned until the recorder exited."""
    logs = {n: ReaderLog(n) for n in ("info", "verify", "app")}
    child = Child(run_dir, steps=steps, every=every)
    stop = threading.Event()
    threads = []
    try:
        child.go()
        if readers:
            child.wait_marker("register")  # Run.create returned: the first snapshot is published
            for name, args, check in (
                ("info", ["info", str(run_dir)], _info),
                ("verify", ["verify", str(run_dir)], _verify),
            ):
                threads.append(
                    threading.Thread(target=_cli_loop, args=(logs[name], args, check, stop), daemon=True)
                )
            for t in threads:
                t.start()
            if app:
                before = os.environ.get("FGTRAC_RUN")
                os.environ["FGTRAC_RUN"] = str(run_dir)
                try:
                    _app_loop(run_dir, logs["app"], lambda: child.proc.poll() is not None)
                finally:
                    if before is None:
                        os.environ.pop("FGTRAC_RUN", None)
                    else:
                        os.environ["FGTRAC_RUN"] = before
        rc = child.finish()
    finally:
        stop.set()
        for t in threads:
            t.join(180)
        if child.proc.poll() is None:
            child.kill()
    assert rc == 0, f"recording failed ({rc}): {child.stderr()}"
    return child.value("loop"), _loop_close(child), child.value("loop_cpu"), logs


def _loop_close(child: Child) -> float:
    """Seconds from the first stage's entry to the end of close()."""
    m = child.markers()
    first_stage = next(t for name, t, _ in m if name == "stage")
    return next(t for name, t, _ in m if name == "closed") - first_stage


def slowdown(workdir: Path, *, repeats: int, steps: int, every: int, app: bool = True) -> dict:
    """Loop time of the same recording with and without readers, interleaved (ABBA...), median of `repeats` each;
    every reader's log of the runs with readers."""
    plain: list[float] = []
    loaded: list[float] = []
    plain_e2e: list[float] = []
    plain_cpu: list[float] = []
    loaded_cpu: list[float] = []
    loaded_e2e: list[float] = []
    logs: list[dict[str, ReaderLog]] = []
    reader_runs: list[Path] = []
    for i in range(repeats):
        for readers in (False, True) if i % 2 == 0 else (True, False):
            run_dir = workdir / f"{'readers' if readers else 'plain'}{i}"
            loop, e2e, cpu, log = record(run_dir, readers=readers, steps=steps, every=every, app=app)
            (loaded if readers else plain).append(loop)
            (loaded_e2e if readers else plain_e2e).append(e2e)
            (loaded_cpu if readers else plain_cpu).append(cpu)
            if readers:
                logs.append(log)
                reader_runs.append(run_dir)
    p, r = statistics.median(plain), statistics.median(loaded)
    pe, re_ = statistics.median(plain_e2e), statistics.median(loaded_e2e)
    return {
        "repeats": repeats,
        "loop_plain_s": p,
        "loop_readers_s": r,
        "slowdown_pct": 100.0 * (r - p) / p,
        "loop_plain_all": plain,
        "loop_readers_all": loaded,
        "cpu_plain_s": statistics.median(plain_cpu),
        "cpu_readers_s": statistics.median(loaded_cpu),
        "cpu_slowdown_pct": 100.0
        * (statistics.median(loaded_cpu) - statistics.median(plain_cpu))
        / statistics.median(plain_cpu),
        "e2e_plain_s": pe,
        "e2e_readers_s": re_,
        "e2e_slowdown_pct": 100.0 * (re_ - pe) / pe,
        "logs": logs,
        "reader_runs": reader_runs,
    }
