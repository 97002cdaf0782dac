"""The overview page and the app's messages for missing, empty and still-recording runs (AppTest)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from fgtrac_core.store import RunStore
from tests.app._support import APP, PAGES, open_page, plain


def test_overview_shows_the_run(digits_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(digits_run, "views/overview.py", monkeypatch)
    assert plain(at.title[0].value) == "Run digits-demo"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["train samples"] == "1257" and metrics["test samples"] == "360"
    assert int(metrics["checkpoints"]) >= 9
    with RunStore(digits_run) as store:
        influence = store.latest_analysis("influence")
        accuracy = store.influence_accuracy(influence["analysis_id"])["accuracy"]
        fingerprint = store.meta()["signer_fingerprint"]
    assert metrics["test accuracy"] == f"{accuracy:.1%}"
    stages = at.dataframe[0].value
    assert stages["name"].tolist() == ["pretrain", "finetune", "adapt"]
    assert (stages["n_batches"] == stages["n_steps"]).all()  # one batch a step: no gradient accumulation
    # the checkpoints chosen for influence are marked with the reason they were chosen
    ckpts = at.dataframe[1].value
    chosen = ckpts[ckpts["influence"] != ""]
    assert sorted(chosen["checkpoint_id"]) == sorted(c["checkpoint_id"] for c in influence["checkpoints"])
    assert chosen["influence"].str.startswith("✓").all()
    assert fingerprint in [c.value for c in at.text]


def test_missing_run_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FGTRAC_RUN", str(tmp_path / "nope"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "Cannot open run" in at.error[0].value


def test_no_run_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FGTRAC_RUN", raising=False)
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "fgtrac app RUN_DIR" in at.error[0].value


def test_empty_run_names_the_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run with nothing recorded: every page says what to run, none raises."""
    from fgtrac_core.tracking import Run

    Run.create(tmp_path / "empty", name="empty").close()
    monkeypatch.setenv("FGTRAC_RUN", str(tmp_path / "empty"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    for page in PAGES:
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
        assert not at.error, (page, [e.value for e in at.error])
    at.switch_page("views/overview.py").run()
    assert any("fgtrac demo" in c.value for c in at.text)
    at.switch_page("views/explore.py").run()
    assert "no training samples" in at.info[0].value
    at.switch_page("views/stages.py").run()
    assert any(c.value.startswith("fgtrac stages ") for c in at.text)


def test_run_without_influence_names_the_command(digits_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import duckdb

    with duckdb.connect(str(digits_copy / "snapshot.duckdb")) as con:
        con.execute("DELETE FROM analyses")
    for page in ("views/explore.py", "views/quality.py"):
        at = open_page(digits_copy, page, monkeypatch)
        assert "No influence results" in at.info[0].value
        assert any(c.value.startswith("fgtrac influence ") and str(digits_copy) in c.value for c in at.text)
    at = open_page(digits_copy, "views/lifecycle.py", monkeypatch, sample="5")
    assert "No influence results" in at.info[0].value


def test_recording_in_progress_shows_the_snapshot_age(
    digits_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.time()
    os.utime(digits_copy / "snapshot.duckdb", (now - 600, now - 600))
    os.utime(digits_copy / "fgtrac.duckdb", (now, now))
    at = open_page(digits_copy, "views/overview.py", monkeypatch)
    warning = at.warning[0].value
    assert "still being recorded" in warning and "10 min old" in warning
    assert plain(at.title[0].value) == "Run digits-demo"


def test_recorded_text_is_never_markup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run name written as a markdown link and HTML is shown literally, not as a link."""
    from fgtrac_core.tracking import Run

    name = "[click](http://example.invalid) <b>bold</b> $x$"
    Run.create(tmp_path / "run", name=name).close()
    at = open_page(tmp_path / "run", "views/overview.py", monkeypatch)
    title = at.title[0].value
    assert plain(title) == f"Run {name}"
    assert "[click](" not in title and "<b>" not in title and "$x$" not in title
