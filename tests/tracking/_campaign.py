"""Machinery of the crash and concurrency campaign (tests/tracking/test_crash_campaign.py,
test_concurrent_readers.py, bench/crash_concurrency.py): run `tests.tracking._recording` as a child process, follow
its phase markers, SIGKILL it at a chosen moment, then recover the run through the public API and check it.

Only public entry points touch the run: `Run.open`/`close`, `verify_run`, `RunStore` and the `fgtrac` CLI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.tracking import _recording

ROOT = Path(__file__).resolve().parents[2]
STEPS = 150  # per stage: 300 optimizer steps in all
EVERY = 50  # a checkpoint every 50 steps (plus the recorder's own at each stage start and end)
CHECKPOINTS = "checkpoints"

# where a kill lands, by the last marker the child printed before it
PHASE_OF_MARKER = {
    "ready": "before create",
    "create": "create",
    "register": "register",
    "stage": "mid-stage",
    "resume": "mid-stage",
    "stage_end": "stage end",
    "checkpoint": "checkpoint",
    "close": "close",
    "closed": "finished",
}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`fgtrac ARGS` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "fgtrac_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def stale_temporaries(run_dir: Path) -> list[str]:
    """Temporaries a publish or checkpoint write left in the run (`snapshot.duckdb.tmp*`, `*.tmp*`)."""
    if not run_dir.exists():
        return []
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if ".tmp" in p.name)


class Child:
    """The recording script as a child process; a thread collects its marker lines with their arrival times."""

    def __init__(
        self, run_dir: Path, *, steps: int = STEPS, every: int = EVERY, wait_go: bool = True
    ) -> None:
        self.run_dir = run_dir
        cmd = [sys.executable, "-W", "ignore", "-m", "tests.tracking._recording", str(run_dir)]
        cmd += ["--steps", str(steps), "--every", str(every)] + (["--wait-go"] if wait_go else [])
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[tuple[float, list[str]]] = []  # (arrival time, fields)
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append((time.perf_counter(), line.split()))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_marker(self, name: str, occurrence: int = 0, timeout: float = 120.0) -> float:
        """Arrival time of the `occurrence`-th marker `name` (AssertionError if the child ends without it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                seen = [t for t, f in self.lines if f and f[0] == name]
                if len(seen) > occurrence:
                    return seen[occurrence]
                if self._eof:
                    raise AssertionError(
                        f"recording ended without marker {name}#{occurrence}: {self.stderr()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no marker {name}#{occurrence} within {timeout} s")
                self._cond.wait(left)

    def go(self) -> float:
        self.wait_marker("ready")
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return time.perf_counter()

    def kill(self) -> None:
        # a kill aimed just after the last marker can come after the recording has already exited (and been
        # reaped): then there is nothing to kill, and recovering a completed run is checked like any other
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.finish()

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        return rc

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()[-2000:]

    def markers(self) -> list[tuple[str, float, int]]:
        """(name, seconds since create, batches logged) of every phase marker printed."""
        return [(f[0], float(f[1]), int(f[2])) for _, f in self.lines if len(f) == 3]

    def value(self, name: str) -> float:
        return next(float(f[1]) for _, f in self.lines if len(f) == 2 and f[0] == name)

    def last_marker(self) -> tuple[str, int]:
        """The last phase marker printed and the batches logged by then ('ready', 0 if none)."""
        m = self.markers()
        return (m[-1][0], m[-1][2]) if m else ("ready", 0)


# ------------------------------------------------------------------------------------------- kill schedule


@dataclass(frozen=True)
class Kill:
    phase: str  # the phase aimed at
    marker: str  # the child is killed `offset` seconds after this marker's `occurrence`-th appearance ...
    occurrence: int
    offset: float
    # ... or, when set, `offset` seconds after a temporary whose name starts with this appears in the run directory
    # after that marker: the background writer is then writing a checkpoint file or publishing a snapshot
    temporary: str | None = None


SHARES = {"register": 3, "mid-stage": 5, "checkpoint": 4, "publish": 4, "close": 4}  # of 20 kills


def phase_windows(markers: list[tuple[str, float, int]]) -> dict[str, list[tuple[str, int, float]]]:
    """From a complete recording's markers: for each phase aimed at, the (marker, occurrence, window seconds)
    spans in which a kill lands in that phase."""
    count: dict[str, int] = {}
    spans: dict[str, list[tuple[str, int, float]]] = {p: [] for p in SHARES}
    for (name, t, _), nxt in zip(markers, markers[1:] + [("", markers[-1][1], 0)], strict=True):
        occ = count.get(name, 0)
        count[name] = occ + 1
        gap = nxt[1] - t
        if name == "register":
            spans["register"].append((name, occ, gap))
        elif name in ("stage", "resume"):
            spans["mid-stage"].append((name, occ, gap))
        elif name == "checkpoint":
            # the call returns at once; the writer thread then serialises the checkpoint, writes it through a
            # temporary, commits, signs and publishes (a snapshot temporary): kills follow those temporaries
            spans["checkpoint"].append((name, occ, 0.003))
            spans["publish"].append((name, occ, 0.003))
        elif name == "close":
            spans["close"].append((name, occ, 0.9 * gap))
    return spans


def schedule(markers: list[tuple[str, float, int]], n: int, seed: int) -> list[Kill]:
    """`n` kills spread over the phases (registration, mid-stage, checkpoint file write, snapshot publish, close),
    each at a random moment of a randomly chosen span of its phase (seeded)."""
    rng = np.random.default_rng(seed)
    spans = phase_windows(markers)
    phases: list[str] = []
    for name, share in SHARES.items():
        phases += [name] * max(1, round(share * n / sum(SHARES.values())))
    phases = phases[:n] + ["mid-stage"] * (n - len(phases))
    rng.shuffle(phases)
    kills = []
    for phase in phases:
        marker, occ, window = spans[phase][rng.integers(len(spans[phase]))]
        temporary = {"checkpoint": f"{CHECKPOINTS}/", "publish": "snapshot.duckdb.tmp"}.get(phase)
        kills.append(Kill(phase, marker, occ, float(rng.uniform(0.0, max(window, 0.0))), temporary))
    return kills


def wait_temporary(child: Child, prefix: str, timeout: float = 20.0) -> bool:
    """Poll the child's run directory (every ~1 ms) until a temporary named `prefix`* exists; False if the child
    ended or `timeout` passed first."""
    sub, _, start = prefix.rpartition("/")
    where = child.run_dir / sub
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.proc.poll() is None:
        try:
            with os.scandir(where) as it:
                if any(e.name.startswith(start) and ".tmp" in e.name for e in it):
                    return True
        except FileNotFoundError:
            pass
        time.sleep(0.001)
    return False


def landed_phase(child: Child, temporaries: list[str]) -> str:
    """Where the kill landed: a publish or checkpoint write it interrupted (its temporary is still there),
    else the phase of the child's last marker."""
    if any(t.startswith("snapshot.duckdb.tmp") for t in temporaries):
        return "publish"
    if any(t.startswith(f"{CHECKPOINTS}/") for t in temporaries):
        return "checkpoint"
    name, _ = child.last_marker()
    return PHASE_OF_MARKER.get(name, name)


# ------------------------------------------------------------------------------------------- recovery checks


@dataclass
class Recovery:
    temporaries_after_kill: list[str]
    temporaries_after_open: list[str]
    recovery_s: float  # Run.open: ledger check of the live database and snapshot, WAL replay, stage fix-up
    close_s: float
    verify_s: float
    verify_ok: bool
    verify_failure: str | None
    n_batches: int
    stage_status: list[str]
    problems: list[str] = field(default_factory=list)  # prefix / consistency problems found


def recover_and_check(run_dir: Path, plan: list[tuple[int, int, np.ndarray]], logged_bound: int) -> Recovery:
    """Reopen a killed run (`Run.open`), close it, verify it, and compare its batches with the script's plan:
    they must be exactly its first n batches (no gap, nothing reordered), n <= `logged_bound`."""
    from fgtrac_core import Run, RunStore, verify_run

    before = stale_temporaries(run_dir)
    t0 = time.perf_counter()
    run = Run.open(run_dir)
    recovery_s = time.perf_counter() - t0
    after = stale_temporaries(run_dir)
    t0 = time.perf_counter()
    run.close()
    close_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = verify_run(run_dir)
    verify_s = time.perf_counter() - t0
    problems: list[str] = []
    with RunStore(run_dir) as store:
        rows = store.df(
            """SELECT b.batch_id, b.step, s.name AS stage, b.epoch,
                      list(bs.sample_id ORDER BY bs.position) AS ids
               FROM batches b JOIN stages s USING (stage_id) JOIN batch_samples bs USING (batch_id)
               GROUP BY ALL ORDER BY b.batch_id"""
        )
        status = [r["status"] for r in store.summary()["stages"]]
    n = len(rows)
    if n > logged_bound:
        problems.append(f"{n} batches recorded, but the script had logged at most {logged_bound}")
    if n > len(plan):
        problems.append(f"{n} batches recorded, the script logs {len(plan)}")
    for i, r in enumerate(rows.itertuples()):
        if i >= len(plan):
            break
        stage, epoch, ids = plan[i]
        got = (int(r.batch_id), int(r.step), r.stage, int(r.epoch), list(map(int, r.ids)))
        want = (i, i, _recording.STAGES[stage], epoch, ids.tolist())
        if got != want:
            problems.append(
                f"batch #{i}: recorded {got[:4]} ids {got[4][:4]}..., logged {want[:4]} ids {want[4][:4]}..."
            )
            break
    if "running" in status:
        problems.append(f"a stage is still 'running' after recovery and close: {status}")
    return Recovery(
        before,
        after,
        recovery_s,
        close_s,
        verify_s,
        report.ok,
        None if report.ok else str(report.first_failure),
        n,
        status,
        problems,
    )


@dataclass
class KillResult:
    run_dir: Path
    kill: Kill
    landed: str  # the phase the child was in (its last marker)
    logged: int  # batches logged by the last marker
    recovery: Recovery | None
    error: str | None  # Run.open / check exception, exact text


def campaign(workdir: Path, n_kills: int, seed: int, on_result=None) -> tuple[list[KillResult], Child]:
    """Calibrate with one complete recording, then kill `n_kills` recordings at scheduled moments and recover
    each.  The next child is started (and imports torch) while the previous run is being recovered."""
    calib = Child(workdir / "calibration")
    calib.go()
    rc = calib.finish()
    assert rc == 0, f"calibration recording failed ({rc}): {calib.stderr()}"
    kills = schedule(calib.markers(), n_kills, seed)
    plan = _recording.batch_plan(0, STEPS)
    results: list[KillResult] = []
    nxt = Child(workdir / "kill00")
    try:
        for i, kill in enumerate(kills):
            child = nxt
            child.go()
            child.wait_marker(kill.marker, kill.occurrence)
            if kill.temporary is not None:
                wait_temporary(child, kill.temporary)
            time.sleep(kill.offset)
            child.kill()
            if i + 1 < len(kills):
                nxt = Child(workdir / f"kill{i + 1:02d}")
            _, logged = child.last_marker()
            landed = landed_phase(child, stale_temporaries(child.run_dir))
            try:
                rec, err = recover_and_check(child.run_dir, plan, logged), None
            except Exception as exc:  # reported, with its exact text, by the caller
                rec, err = None, f"{type(exc).__name__}: {exc}"
            results.append(KillResult(child.run_dir, kill, landed, logged, rec, err))
            if on_result is not None:
                on_result(i, results[-1])
    finally:
        if nxt.proc.poll() is None:
            nxt.kill()
    return results, calib


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
