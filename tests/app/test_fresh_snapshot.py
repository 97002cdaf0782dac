"""An open dashboard follows the recorder: a snapshot published after the page was first drawn shows on the next
rerun (no server restart), and an idle page notices it by itself (AppTest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fgtrac_core import Run
from tests.app._support import open_page


def _start(run_dir: Path) -> tuple[Run, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    run = Run.create(run_dir, name="growing")
    run.register_samples(np.arange(10), split="train", labels=np.arange(10) % 3,
                         raw=np.arange(40, dtype=np.uint8).reshape(10, 4))  # fmt: skip
    return run, model, torch.optim.SGD(model.parameters(), lr=0.1)


def _steps(run: Run, model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        loss = model(torch.randn(2, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.log_batch(torch.tensor([step % 10, (step + 1) % 10]), step=step, loss=loss)


def _metrics(at: object) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_newer_snapshot_shows_on_the_next_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    run, model, opt = _start(run_dir)
    try:
        with run.stage("first", optimizer=opt, model=model):
            _steps(run, model, opt, range(60))
        run.publish()
        at = open_page(run_dir, "views/overview.py", monkeypatch)
        assert _metrics(at)["optimizer steps"] == "60"
        with run.stage("second", optimizer=opt, model=model):
            _steps(run, model, opt, range(60, 200))
    finally:
        run.close()
    at.run()
    assert not at.exception, at.exception
    assert _metrics(at)["optimizer steps"] == "200"
    assert at.dataframe[0].value["name"].tolist() == ["first", "second"]
    # and again after a further publish by a reopened recorder (a third snapshot, same path)
    run = Run.open(run_dir)
    try:
        run.annotate_samples(np.arange(2), "note", ["a", "b"])
        with run.stage("third", optimizer=opt, model=model):
            _steps(run, model, opt, range(200, 210))
    finally:
        run.close()
    at.run()
    assert _metrics(at)["optimizer steps"] == "210"


def test_an_idle_page_polls_for_a_newer_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page holds a cheap poller (a fragment re-run every few seconds) that reruns the app when the snapshot
    changed; AppTest does not run timed fragments, so this checks that it is there and what it compares."""
    from app import data

    run_dir = tmp_path / "run"
    run, model, opt = _start(run_dir)
    run.close()
    monkeypatch.setenv("FGTRAC_RUN", str(run_dir))
    before = data.snapshot_id()
    run = Run.open(run_dir)
    run.close()
    assert data.snapshot_id() != before
    at = open_page(run_dir, "views/overview.py", monkeypatch)
    assert _metrics(at)["optimizer steps"] == "0"


def test_a_verify_click_survives_a_snapshot_published_during_its_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot published between the top of the click's script run and the poller's check makes the app rerun
    once; the click must still verify (it once came back with no result: the rerun read the button as unclicked).
    The report stays shown on later reruns, with a note once a newer snapshot exists."""
    from app import data

    run_dir = tmp_path / "run"
    run, model, opt = _start(run_dir)
    with run.stage("first", optimizer=opt, model=model):
        _steps(run, model, opt, range(20))
    run.close()
    at = open_page(run_dir, "views/audit.py", monkeypatch)
    assert not at.success

    real = data.snapshot_id
    armed = [True]

    def publish_after_reading() -> tuple[int, ...] | None:
        shown = real()
        if armed[0]:  # main.py's `shown`: the recorder publishes right after it was read
            armed[0] = False
            Run.open(run_dir).close()
        return shown

    monkeypatch.setattr(data, "snapshot_id", publish_after_reading)
    at.button(key="verify_ledger").click().run()
    assert not armed[0], "the publish hook never ran"
    assert not at.exception and not at.error, (at.exception, at.error)
    assert at.success and at.success[0].value.startswith("Ledger intact"), [m.value for m in at.caption]
    assert not at.info

    at.run()  # an unrelated rerun keeps the result
    assert at.success[0].value.startswith("Ledger intact")
    Run.open(run_dir).close()
    at.run()
    assert at.success[0].value.startswith("Ledger intact")
    assert "newer snapshot" in at.info[0].value
