"""In real chromium (see test_browser.py): recorded text never becomes a link on any page, and an open page
follows a recording (a newer snapshot shows without a click or a server restart)."""

from __future__ import annotations

import shutil
import urllib.parse
from pathlib import Path

import pytest

from tests.app.test_browser import CHROMIUM, IDLE, _browser, _server, _settle, _shoot
from tests.app.test_fresh_snapshot import _start, _steps
from tests.app.test_recorded_links import PAYLOADS, inject_payloads

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium not installed (.ci/run installs it)"
)

# every element whose href (HTML, or SVG's xlink:href as plotly writes it) points at the payloads' host
_EVIL_LINKS = """() => [...document.querySelectorAll('*')].map(e => [e.tagName, e.getAttribute('href'),
    e.getAttributeNS('http://www.w3.org/1999/xlink', 'href')]).filter(([, h, x]) => `${h} ${x}`.includes('evil'))"""


def _no_links(page: object, where: str) -> None:
    assert page.evaluate(_EVIL_LINKS) == [], where
    assert page.locator("a[href*='evil']").count() == 0, where


def test_no_recorded_text_is_a_link_in_chromium(staged_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "hostile"
    shutil.copytree(staged_run, run)
    ids = inject_payloads(run)
    q = urllib.parse.quote
    visits = [
        (f"/?test={ids['test']}", f"Test example #{ids['test']}"),
        (f"/?test={ids['test']}&tab=Stage+effects", "Effect = f(final model)"),
        (f"/?test={ids['test']}&tab=Per-checkpoint+contributions", "Proponent id"),
        ("/overview", "Checkpoints"),
        ("/stages", "Examples a stage most helped and hurt"),
        (f"/stages?behaviour={q(PAYLOADS[0])}&slice={q(PAYLOADS[4])}", "Examples a stage most helped and hurt"),
        (f"/lifecycle?sample={ids['sample']}", "Uses in training"),
        (f"/lifecycle?sample={ids['test']}", "Uses in training"),
        ("/quality", "Highest self-influence"),
        ("/audit", "Pin a public key"),
    ]
    with _server(run) as url, _browser() as page:
        for path, expect in visits:
            page.goto(url + path, timeout=60_000)
            _settle(page, expect)
            _no_links(page, path)
        page.goto(url + "/overview", timeout=60_000)
        _settle(page, "Checkpoints")
        # the payload is shown, as written (the word joiners that break autolinks are invisible)
        title = page.locator("h1").first.inner_text().replace("\u2060", "")
        assert title == f"Run {PAYLOADS[0]}"
        page.goto(f"{url}/lifecycle?sample={ids['sample']}", timeout=60_000)
        _settle(page, "Uses in training")
        assert f"source: {PAYLOADS[ids['sample'] % 5]}" in page.content().replace("\u2060", "").replace(
            "&lt;", "<"
        ).replace("&gt;", ">").replace("&amp;", "&")
        _shoot(page, "hostile-lifecycle.png")
        page.goto(url + "/audit", timeout=60_000)
        _settle(page, "Pin a public key")
        page.get_by_role("button", name="Verify ledger").click()
        page.wait_for_selector("text=Ledger check failed", timeout=120_000)
        page.wait_for_selector(IDLE, timeout=60_000)
        _no_links(page, "audit after verify")


def _metric(page: object, label: str) -> str:
    return page.evaluate(
        """(label) => { for (const m of document.querySelectorAll("[data-testid='stMetric']")) {
             if (m.querySelector("[data-testid='stMetricLabel']").innerText.trim() === label)
               return m.querySelector("[data-testid='stMetricValue']").innerText.trim(); } return null; }""",
        label,
    )


def test_an_open_page_follows_the_recording(tmp_path: Path) -> None:
    """Reported: Overview kept showing 60 steps while `fgtrac info` said 200 after the recorder closed."""
    run_dir = tmp_path / "run"
    run, model, opt = _start(run_dir)
    try:
        with run.stage("first", optimizer=opt, model=model):
            _steps(run, model, opt, range(60))
        run.publish()
        with _server(run_dir) as url, _browser() as page:
            page.goto(url + "/overview", timeout=60_000)
            _settle(page, "Checkpoints")
            assert _metric(page, "optimizer steps") == "60"
            with run.stage("second", optimizer=opt, model=model):
                _steps(run, model, opt, range(60, 200))
            run.close()
            # no click, no reload: the page's poller sees the new snapshot and reruns
            page.wait_for_function(
                """() => [...document.querySelectorAll("[data-testid='stMetricValue']")]
                         .some(v => v.innerText.trim() === '200')""",
                timeout=30_000,
            )
            page.wait_for_selector(IDLE, timeout=60_000)
            assert _metric(page, "optimizer steps") == "200"
            # and a reload (a new session on the same server) shows it too
            page.reload()
            _settle(page, "Checkpoints")
            assert _metric(page, "optimizer steps") == "200"
    finally:
        run.close()
