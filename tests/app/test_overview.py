"""The overview page, driven by Streamlit's AppTest on the real sample run."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def test_overview_shows_the_run(digits_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FGTRAC_RUN", str(digits_run))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert at.title[0].value == "Run digits-demo"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["train samples"] == "1257" and metrics["test samples"] == "360"
    assert int(metrics["checkpoints"]) >= 9
    stages = at.dataframe[0].value
    assert stages["name"].tolist() == ["pretrain", "finetune", "adapt"]


def test_missing_run_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FGTRAC_RUN", str(tmp_path / "nope"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "Cannot open run" in at.error[0].value


def test_verify_ledger_button(digits_run: Path, digits_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FGTRAC_RUN", str(digits_run))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.button(key="verify_ledger").click().run()
    assert not at.exception
    assert at.success[0].value.startswith("Ledger intact")

    import duckdb

    with duckdb.connect(str(digits_copy / "snapshot.duckdb")) as con:
        con.execute("UPDATE samples SET label = label + 1 WHERE sample_id = 7")
    monkeypatch.setenv("FGTRAC_RUN", str(digits_copy))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.button(key="verify_ledger").click().run()
    assert not at.exception
    message = at.error[0].value
    assert "samples row sample_id=7 field label" in message
