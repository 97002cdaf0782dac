"""End to end in a real browser (Debian chromium via playwright): cold `fgtrac app` servers on copies of the
sample run; a test example opened by URL with its proponent and opponent images and stage bars, the way to a
training sample's lifecycle, every page rendered without a traceback, and "Verify ledger" on an intact and on a
tampered run.  A screenshot of every page goes to test-artifacts/ (ignored by git)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pytest

from fgtrac_core.store import RunStore

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium not installed (.ci/run installs it)"
)
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server(run: Path) -> Iterator[str]:
    """`fgtrac app RUN` on a free port; its own process group, so that the Streamlit child goes down with it."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fgtrac_core.cli", "app", str(run), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        env={**os.environ, "STREAMLIT_CLIENT_TOOLBAR_MODE": "viewer"},  # no "Deploy" button in the screenshots
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"dashboard did not start: {proc.stderr.read().decode()[-2000:]}"
                    ) from None
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@contextmanager
def _browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1800})
        finally:
            browser.close()


def _settle(page: object, expect: str) -> None:
    """Wait until `expect` is shown, the script has finished and every image has loaded."""
    page.wait_for_selector(f"text={expect}", timeout=60_000)
    page.wait_for_selector(IDLE, timeout=60_000)
    # elements still loading show as skeletons; images count once decoded
    page.wait_for_function(
        """() => document.querySelectorAll("[data-testid^='stSkeleton']").length === 0
                 && [...document.images].every(i => i.complete && i.naturalWidth > 0)""",
        timeout=60_000,
    )
    assert "Traceback" not in page.content()


def _shoot(page: object, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def _verify(page: object, url: str, expect: str, shot: str) -> None:
    page.goto(url + "/audit", timeout=60_000)
    _settle(page, "Pin a public key")
    page.get_by_role("button", name="Verify ledger").click()
    page.wait_for_selector(f"text={expect}", timeout=120_000)
    page.wait_for_selector(IDLE, timeout=60_000)
    _shoot(page, shot)


def test_dashboard_in_chromium(staged_copy: Path, tmp_path: Path) -> None:
    with RunStore(staged_copy) as store:
        aid = store.latest_analysis("influence")["analysis_id"]
        tests = store.influence_tests(aid)
        test_id = int(tests[tests["misclassified"]]["sample_id"].iloc[0])
        ranked = store.influence_topk(aid, test_id, "raw")
    first = int(ranked[ranked["direction"] == "proponent"]["train_id"].iloc[0])
    tampered = tmp_path / "tampered"
    shutil.copytree(staged_copy, tampered)

    with _server(staged_copy) as url, _browser() as page:
        # Explore on a cold server, opened by URL: the example and its 10 proponents and 10 opponents
        page.goto(f"{url}/?test={test_id}", timeout=60_000)
        _settle(page, f"Test example #{test_id}")
        assert page.locator("[data-testid='stImage'] img").count() == 21
        assert page.get_by_text("Opponents", exact=True).count() == 1
        _shoot(page, "explore.png")
        # its stage bars, in their tab (bound to the URL)
        page.get_by_role("tab", name="Stage effects").click()
        _settle(page, "Effect = f(final model)")
        page.wait_for_selector("[data-testid='stPlotlyChart'] .main-svg", timeout=60_000)
        assert page.get_by_text("replay (ground truth)").count() >= 1
        assert "tab=Stage+effects" in page.url
        _shoot(page, "explore-stages.png")
        # the first proponent's lifecycle, opened from its id under the thumbnails
        page.get_by_role("tab", name="Proponents and opponents").click()
        _settle(page, "Opponents")
        page.get_by_role("radio", name=f"#{first}", exact=True).click()
        _settle(page, f"Sample #{first}")
        assert f"sample={first}" in page.url
        page.wait_for_selector("[data-testid='stPlotlyChart'] .main-svg", timeout=60_000)
        _shoot(page, "lifecycle.png")
        for path, expect, shot in (
            ("/stages?slice=misclassified", "Examples a stage most helped and hurt", "stages.png"),
            ("/quality", "Highest self-influence", "quality.png"),
            ("/overview", "Run digits-demo", "overview.png"),
        ):
            page.goto(url + path, timeout=60_000)
            _settle(page, expect)
            _shoot(page, shot)
        _verify(page, url, "Ledger intact", "audit.png")

    for db in ("snapshot.duckdb", "fgtrac.duckdb"):
        with duckdb.connect(str(tampered / db)) as con:
            con.execute("UPDATE influence_topk SET score = score + 1 WHERE row_id = 5")
    with _server(tampered) as url, _browser() as page:
        _verify(page, url, "influence_topk row row_id=5 field score", "audit-tampered.png")
        assert page.get_by_text("Ledger check failed").count() == 1


def _cells(page: object, ready: Callable[[list[str]], bool] = bool, timeout: float = 60.0) -> list[str]:
    """Text of every table cell on the page (st.dataframe draws on a canvas, with an accessible grid beside it),
    once `ready(cells)` holds: grids fill in one by one after the script finishes, so the first cell seen says
    nothing about the others.  Returns what is there at the timeout, for the caller's assertion to show."""
    page.wait_for_selector("[role='gridcell']", state="attached", timeout=60_000)
    deadline = time.monotonic() + timeout
    while True:
        cells = [c.strip() for c in page.locator("[role='gridcell']").all_text_contents()]
        if ready(cells) or time.monotonic() > deadline:
            return cells
        time.sleep(0.25)


def _ids(cells: list[str]) -> list[str]:
    return [c for c in cells if c.startswith("#")]


def test_tabular_dashboard_in_chromium(tabular_run: Path, tmp_path: Path) -> None:
    """The tabular sample run (no images): proponents and opponents with scores, labels, ⚠ marks and feature
    values; Stages' helped/hurt lists and Data quality with scores; the influence analysis switched by URL."""
    run = tmp_path / "run"
    shutil.copytree(tabular_run, run)
    with RunStore(run) as store:
        first = store.latest_analysis("influence")["analysis_id"]
        tests = store.influence_tests(first)
        for test_id in tests["sample_id"].astype(int):
            ranked = store.influence_topk(first, test_id, "raw")
            if (ranked["rank"].le(10) & ranked["flagged"]).any():
                break
        features = store.sample(test_id)["display"]
    from tests.conftest import run_cli

    run_cli("influence", str(run), "--k", "5", check=True)  # a second, newer analysis
    with RunStore(run) as store:
        newer = store.latest_analysis("influence")["analysis_id"]
    top = ranked[(ranked["direction"] == "proponent") & (ranked["rank"] <= 10)]
    with _server(run) as url, _browser() as page:
        page.goto(f"{url}/?test={test_id}&influence={first}", timeout=60_000)
        _settle(page, f"Test example #{test_id}")
        assert page.get_by_text(f"Influence analysis #{first} ").count() == 1
        assert page.locator("[data-testid='stImage'] img").count() == 0
        cells = _cells(page, lambda c: len(_ids(c)) >= 20)  # 10 proponents and 10 opponents
        assert all(f"{s:+.3g}" in cells for s in top["score"]), cells
        assert all(f"#{i}" in cells for i in top["train_id"])
        assert any(c.endswith("⚠") for c in cells)
        # the test example's own feature values: columns are ordered by distance from it and the grid renders only
        # the columns in view, so which features show depends on the data and the window, not on a fixed name
        own = {f"{v:.4g}" for v in features.values()}
        assert len(own.intersection(cells)) >= 3, (sorted(own), cells)
        _shoot(page, "explore-tabular.png")
        # the newer analysis (k 5) by URL: five per list
        page.goto(f"{url}/?test={test_id}&influence={newer}", timeout=60_000)
        _settle(page, f"Influence analysis #{newer} ")
        assert len(_ids(_cells(page, lambda c: len(_ids(c)) >= 10))) == 10
        page.goto(f"{url}/stages", timeout=60_000)
        _settle(page, "Examples a stage most helped and hurt")
        effects = lambda cells: sum(c[:1] in "+-" and c[1:2].isdigit() for c in cells)  # noqa: E731
        cells = _cells(page, lambda c: effects(c) >= 20)
        assert effects(cells) >= 20, cells  # 2 x 10 effects
        _shoot(page, "stages-tabular.png")
        page.goto(f"{url}/quality", timeout=60_000)
        _settle(page, "Highest self-influence")
        assert page.get_by_text("precision").count() >= 1
        assert len(_ids(_cells(page, lambda c: len(_ids(c)) >= 50))) == 50
