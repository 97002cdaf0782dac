"""The app's only door to a run: a cached read-only `RunStore` on the published snapshot, and cached queries.

No maths here: pages call `fgtrac_core.store` queries.  Every cached query result is keyed by the snapshot's
identity (device, inode, size, mtime in ns: the recorder publishes by renaming a fresh copy into place, so every
snapshot is a new inode), so a newly published snapshot is picked up on the next rerun and old results are never
served for it.

The process holds one open `RunStore` per run and closes it before opening the next snapshot.  That is not
tidiness: DuckDB keeps one database instance per file path in a process and hands it to every later
`duckdb.connect` of that path while any connection to it is open, so a second `RunStore` opened while the first
one lived read the *old*, renamed-away file forever (the dashboard showed the first snapshot it ever opened).
"""

from __future__ import annotations

import json
import os
import shlex
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import streamlit as st

from fgtrac_core.errors import FgtracError, UnknownSampleError
from fgtrac_core.store import RunLayout, RunStore

# page scripts, relative to app/main.py (st.switch_page and st.page_link take these paths)
EXPLORE = "views/explore.py"
LIFECYCLE = "views/lifecycle.py"


def run_dir() -> Path:
    """The run directory `fgtrac app` passed in FGTRAC_RUN (a message and a stop when there is none)."""
    value = os.environ.get("FGTRAC_RUN")
    if not value:
        st.error("No run given: start the dashboard with `fgtrac app RUN_DIR`.")
        st.stop()
    return Path(value)


@dataclass
class _Open:
    """The one open store of a run directory, the snapshot identity it was opened at, and its queries in flight."""

    ident: tuple[int, ...]
    store: RunStore
    users: int = 0


_LOCK = threading.Condition()
_OPEN: dict[str, _Open] = {}  # run directory -> its open store, shared by every session of this server
_MAX_OPEN = 4  # runs with an open store (a server shows one; a test process opens many)


def _identity(path: str | Path) -> tuple[int, ...]:
    """(device, inode, size, mtime ns) of the run's published snapshot: changes with every publish."""
    st_ = RunLayout.of(path).snapshot_db.stat()
    return st_.st_dev, st_.st_ino, st_.st_size, st_.st_mtime_ns


@contextmanager
def _using(path: str) -> Iterator[RunStore]:
    """The store on the run's current snapshot, held for one query.  A newer snapshot replaces the open store:
    the old one is closed once its queries in flight are done, and only then is the new one opened (see the
    module docstring for why the order matters)."""
    path = str(RunLayout.of(path).root)
    deadline = time.monotonic() + 30.0
    with _LOCK:
        while True:
            try:
                ident = _identity(path)
            except OSError:
                ident = ()  # RunStore names what is missing
            entry = _OPEN.get(path)
            if entry is not None and entry.ident == ident:
                break
            if entry is not None:
                if entry.users and time.monotonic() < deadline:
                    # queries take milliseconds: new ones wait here instead of joining the old store (and after
                    # 30 s, e.g. a long verification, they do join it rather than hang)
                    _LOCK.wait(timeout=1.0)
                    continue
                if entry.users:
                    break
                del _OPEN[path]
                entry.store.close()
            for other in [p for p, e in _OPEN.items() if not e.users][: max(0, len(_OPEN) + 1 - _MAX_OPEN)]:
                _OPEN.pop(other).store.close()
            entry = _OPEN[path] = _Open(ident, RunStore(path))
            break
        entry.users += 1
    try:
        yield entry.store
    finally:
        with _LOCK:
            entry.users -= 1
            _LOCK.notify_all()


@contextmanager
def holding_snapshot() -> Iterator[None]:
    """Hold the current snapshot's store while in-process code opens the run by itself (verification, proofs):
    their connection then shares the store's database, and no newer snapshot replaces it underneath them (a
    replacement opened while their connection lived would get their old database, see the module docstring)."""
    with _using(str(run_dir())):
        yield


def _key() -> tuple[str, tuple[int, ...]]:
    """(run directory, snapshot identity): the cache key of everything read from the current snapshot."""
    path = run_dir()
    try:
        return str(path), _identity(path)
    except OSError as exc:
        st.error(f"Cannot open run: {exc.strerror or exc} ({path}); no published snapshot there.")
        st.stop()


def snapshot_id() -> tuple[int, ...] | None:
    """The identity of the run's published snapshot right now (None while there is none): cheap, one stat."""
    try:
        return _identity(run_dir())
    except OSError:
        return None


@st.cache_data(max_entries=512, show_spinner=False)
def _cached(path: str, ident: tuple[int, ...], method: str, args: tuple[Any, ...]) -> Any:
    with _using(path) as store:
        return getattr(store, method)(*args)


def query(method: str, *args: Any) -> Any:
    """`RunStore.<method>(*args)` on the current snapshot, cached until a newer snapshot is published.

    Results are copies (st.cache_data pickles them), so callers may modify returned DataFrames.  A run that cannot
    be read becomes a one-line message and a stop; UnknownSampleError is left to the caller.
    """
    try:
        return _cached(*_key(), method, tuple(args))
    except UnknownSampleError:
        raise
    except FgtracError as exc:
        _cannot_open(exc)


def _cannot_open(exc: FgtracError) -> NoReturn:
    from app.ui import md  # app.ui imports this module

    st.error(f"Cannot open run: {md(exc)}")
    st.stop()


def fresh(method: str, *args: Any) -> Any:
    """`RunStore.<method>(*args)` uncached, for facts outside the snapshot (e.g. `is_stale`: the live file's age)."""
    try:
        with _using(_key()[0]) as store:
            return getattr(store, method)(*args)
    except FgtracError as exc:
        _cannot_open(exc)


@st.fragment(run_every=3.0)
def follow_snapshots(shown: tuple[int, ...] | None) -> None:
    """Rerun the app when the recorder publishes a snapshot newer than `shown` (the one this page was drawn
    from), so an open page follows a recording without a click.  Costs one stat every 3 s per open page."""
    if snapshot_id() != shown:
        st.rerun()


def thumbnails(sample_ids: list[int]) -> dict[int, bytes]:
    """PNG thumbnails of these samples, fetched in one cached query."""
    return query("thumbnails", [int(i) for i in sample_ids])


def snapshot_age() -> str:
    """How long ago the snapshot being shown was published, for people ("42 s", "7 min", "3.5 h")."""
    age = max(0.0, time.time() - _key()[1][3] / 1e9)
    return f"{age:.0f} s" if age < 90 else f"{age / 60:.0f} min" if age < 5400 else f"{age / 3600:.1f} h"


def show_command(text: str, command: str) -> None:
    """A friendly 'nothing here yet' message naming the command that produces it (quoted for a shell)."""
    st.info(text)
    # st.text, not st.code: the code block's syntax highlighter is a 1.5 MB script that cost the browser about a
    # second of CPU on first use, for one line of plain text
    st.text(command.format(run=shlex.quote(str(run_dir()))))


def influence() -> dict[str, Any]:
    """The influence analysis picked in the sidebar (the newest unless `?influence=ID`), or a message naming the
    command to compute one (stops the page)."""
    analysis = pick_analysis("influence")
    if analysis is None:
        if not query("split_counts").get("train"):
            show_command(
                "This run has no training samples recorded yet: record training with `fgtrac_core.tracking.Run` "
                "(see sample_runs/digits.py), then compute influence with",
                "fgtrac influence {run}",
            )
        else:
            show_command("No influence results in this run yet: compute them with", "fgtrac influence {run}")
        st.stop()
    return analysis


def stage_analysis() -> dict[str, Any] | None:
    """The stage-accountability analysis picked in the sidebar (newest unless `?stage_analysis=ID`), or None
    (callers say how to compute one: `no_stages`)."""
    return pick_analysis("stages")


# URL parameter of each kind's analysis picker
_PICKER_KEYS = {"influence": "influence", "stages": "stage_analysis"}


# the parameters a reviewer tells analyses apart by, in this order (the rest is on the Audit page's entry)
_SHOWN_PARAMS = ("weighting", "k", "damping", "gradients", "checkpoint_rule", "behaviours", "horizon", "readout",
                 "adam_preconditioner", "training_loss", "n_test")  # fmt: skip
_DEFAULT_LOSS = "mean cross-entropy"  # not shown: only a loop's own loss tells analyses apart


def _params_line(params: dict[str, Any]) -> str:
    """'weighting checkpoint, k 20, ..., LDS 0.45 (16 replays)': an analysis' distinguishing parameters."""
    from fgtrac_core._text import abbreviate

    parts = [f"{k} {abbreviate(params[k])}" for k in _SHOWN_PARAMS if params.get(k) not in (None, _DEFAULT_LOSS)]
    check = params.get("check")
    if isinstance(check, dict) and "lds" in check:
        parts.append(f"LDS {check['lds']:.2f} ({check.get('replays')} replays)")
    return ", ".join(parts) if parts else abbreviate(params)


def pick_analysis(kind: str) -> dict[str, Any] | None:
    """A sidebar picker over the run's analyses of `kind` (newest first; method, date and parameters shown),
    bound to the URL; the picked analysis, or None when the run has none."""
    from app.ui import md  # app.ui imports this module

    table = query("analyses", kind)
    if table.empty:
        return None
    rows = {int(r.analysis_id): r for r in table.itertuples(index=False)}

    # plain ids as options: a bound widget writes its displayed option text into the URL
    picked = st.sidebar.selectbox(
        f"{'Influence' if kind == 'influence' else 'Stage'} analysis (newest first)",
        sorted(rows, reverse=True),
        key=_PICKER_KEYS[kind],
        bind="query-params",
    )
    r = rows[picked]
    st.sidebar.caption(md(f"{r.method} · {r.created_at:%Y-%m-%d %H:%M} UTC · {_params_line(json.loads(r.params))}"))
    return query("analysis", picked, kind)


def mark() -> str:
    """The boolean annotation that marks a sample as suspect (⚠), picked in the sidebar and bound to the URL
    (`?mark=`); default `label_flipped`."""
    from fgtrac_core.store.reader import DEFAULT_MARK

    marks = query("marks")
    if not marks:
        return DEFAULT_MARK
    return st.sidebar.selectbox(
        "⚠ marks samples annotated", marks, key="mark", bind="query-params",
        help="a boolean annotation recorded with `Run.annotate_samples` (true = suspect)",
    )  # fmt: skip


def no_stages() -> None:
    show_command("No stage results yet: compute stage accountability with", "fgtrac stages {run}")


def usage_proof(sample_id: int) -> bytes:
    """The usage-proof bundle of one sample, byte for byte what `fgtrac prove RUN --sample ID` writes."""
    from fgtrac_core.proofs import build_usage_proof

    with holding_snapshot():
        return (json.dumps(build_usage_proof(run_dir(), sample_id), indent=1) + "\n").encode()
