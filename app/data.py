"""The app's only door to a run: a cached read-only `RunStore` on the published snapshot, and cached queries.

No maths here: pages call `fgtrac_core.store` queries.  The store and every cached query result are keyed by the
snapshot's modification time, so a newly published snapshot is picked up on the next rerun and old results are
never served for it.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

import streamlit as st

from fgtrac_core.errors import FgtracError
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


@st.cache_resource(max_entries=4)
def _open(path: str, snapshot_mtime: float) -> RunStore:
    return RunStore(path)


def _key() -> tuple[str, float]:
    """(run directory, snapshot mtime): the cache key of everything read from the current snapshot."""
    path = run_dir()
    try:
        return str(path), RunLayout.of(path).snapshot_db.stat().st_mtime
    except OSError as exc:
        st.error(f"Cannot open run: {exc.strerror or exc} ({path}); no published snapshot there.")
        st.stop()


def store() -> RunStore:
    """The run's store, reopened when the recorder has published a newer snapshot."""
    try:
        return _open(*_key())
    except FgtracError as exc:
        st.error(f"Cannot open run: {exc}")
        st.stop()


@st.cache_data(max_entries=512, show_spinner=False)
def _cached(path: str, snapshot_mtime: float, method: str, args: tuple[Any, ...]) -> Any:
    return getattr(_open(path, snapshot_mtime), method)(*args)


def query(method: str, *args: Any) -> Any:
    """`RunStore.<method>(*args)` on the current snapshot, cached until a newer snapshot is published.

    Results are copies (st.cache_data pickles them), so callers may modify returned DataFrames.
    """
    store()  # a one-line message, not a traceback, when the run cannot be opened
    try:
        return _cached(*_key(), method, tuple(args))
    except FgtracError as exc:
        st.error(f"Cannot read run: {exc}")
        st.stop()


def thumbnails(sample_ids: list[int]) -> dict[int, bytes]:
    """PNG thumbnails of these samples, fetched in one cached query."""
    return query("thumbnails", [int(i) for i in sample_ids])


def snapshot_age() -> str:
    """How long ago the snapshot being shown was published, for people ("42 s", "7 min", "3.5 h")."""
    age = max(0.0, time.time() - _key()[1])
    return f"{age:.0f} s" if age < 90 else f"{age / 60:.0f} min" if age < 5400 else f"{age / 3600:.1f} h"


def show_command(text: str, command: str) -> None:
    """A friendly 'nothing here yet' message naming the command that produces it (quoted for a shell)."""
    st.info(text)
    # st.text, not st.code: the code block's syntax highlighter is a 1.5 MB script that cost the browser about a
    # second of CPU on first use, for one line of plain text
    st.text(command.format(run=shlex.quote(str(run_dir()))))


def influence() -> dict[str, Any]:
    """The latest influence analysis, or a message naming the command to compute one (stops the page)."""
    analysis = query("latest_analysis", "influence")
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
    """The latest stage-accountability analysis, or None (callers say how to compute one: `no_stages`)."""
    return query("latest_analysis", "stages")


def no_stages() -> None:
    show_command("No stage results yet: compute stage accountability with", "fgtrac stages {run}")


def usage_proof(sample_id: int) -> bytes:
    """The usage-proof bundle of one sample, byte for byte what `fgtrac prove RUN --sample ID` writes."""
    from fgtrac_core.proofs import build_usage_proof

    return (json.dumps(build_usage_proof(run_dir(), sample_id), indent=1) + "\n").encode()
