"""The app's only door to a run: a cached read-only `RunStore` on the published snapshot.

No maths here: pages call `fgtrac_core.store` queries.  The store is rebuilt when a newer snapshot is published.
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from fgtrac_core.errors import FgtracError
from fgtrac_core.store import RunLayout, RunStore


def run_dir() -> Path:
    value = os.environ.get("FGTRAC_RUN")
    if not value:
        st.error("No run given: start the dashboard with `fgtrac app RUN_DIR`.")
        st.stop()
    return Path(value)


@st.cache_resource(max_entries=4)
def _open(path: str, snapshot_mtime: float) -> RunStore:
    return RunStore(path)


def store() -> RunStore:
    """The run's store, reopened when the recorder has published a newer snapshot."""
    path = run_dir()
    try:
        mtime = RunLayout.of(path).snapshot_db.stat().st_mtime
        return _open(str(path), mtime)
    except (FgtracError, OSError) as exc:
        st.error(f"Cannot open run: {exc}")
        st.stop()
