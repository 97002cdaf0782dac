"""Dashboard speed in a real browser on a run with 50,000 training samples (issue targets: Explore first render
<= 2 s, switching test example <= 0.5 s).

A cold `fgtrac app` server (fresh process, empty caches) on the scaled run of `sample_runs.digits_large`, and
headless Debian chromium driven by playwright.  A render counts as done when the page shows the requested test
example, Streamlit reports the script finished, the first proponent's id is the stored one and every image has
loaded.  Figures:
  * first render on a freshly started server, by a browser that has loaded Streamlit before (the headline);
  * the same with the browser's cache cold too (the first visit ever: it also fetches Streamlit's scripts);
  * first render of another session on the warm server (a reviewer opening a shared link);
  * switching test example in the picker (type an id, Enter), median and worst of several switches.

    python -m bench.dashboard_speed [RUN_DIR]   # builds the 50k run into a temporary directory when none given
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fgtrac_core.store import RunStore

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
TARGETS = {"first_render_s": 2.0, "switch_s": 0.5}


def build_large_run(out: Path, n_train: int = 50_000, k: int = 20) -> Path:
    """The scaled sample run plus its influence analysis (top-k lists of `k`)."""
    from fgtrac_core.influence.run_influence import run_influence
    from sample_runs import digits_large

    digits_large.build(out, n_train=n_train)
    run_influence(out, k=k)
    return out


@contextmanager
def _server(run: Path) -> Iterator[tuple[str, float]]:
    """A cold `fgtrac app` server on a free port; yields its URL and how long it took to answer /health."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fgtrac_core.cli", "app", str(run), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 120:
                    raise RuntimeError("the dashboard did not start") from None
                time.sleep(0.05)
        yield url, time.perf_counter() - t0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the CLI's Streamlit child is in the same process group
        proc.wait(timeout=30)


def _rendered(page: Any, test_id: int, first_proponent: int) -> None:
    """Wait until Explore shows `test_id` completely: script finished, grid updated, every image loaded."""
    page.wait_for_selector(f"text=Test example #{test_id}", timeout=120_000)
    page.wait_for_function(
        """([idle, first]) => document.querySelector(idle) !== null
               && document.querySelector("[data-testid='stImageCaption']")?.innerText.split("\\n")[0].trim() === first
               && [...document.images].length >= 21
               && [...document.images].every(i => i.complete && i.naturalWidth > 0)""",
        arg=[IDLE, f"#{first_proponent}"],
        timeout=120_000,
        polling=20,
    )


def measure(run_dir: str | Path | None = None, *, switches: int = 7) -> dict[str, Any]:
    """Time Explore in chromium on `run_dir` (built when None); returns the figures and the run's size."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("FGTRAC_KEY_DIR", str(Path(tmp) / "keys"))
        run = Path(run_dir) if run_dir is not None else build_large_run(Path(tmp) / "digits-large")
        with RunStore(run) as store:
            aid = store.latest_analysis("influence")["analysis_id"]
            tests = store.influence_tests(aid)["sample_id"].tolist()
            n_train = store.split_counts().get("train", 0)
            picks = tests[:: max(1, len(tests) // (switches + 3))][: switches + 3]
            first = {
                t: int(
                    store.influence_topk(aid, t, "raw").query("direction == 'proponent'")["train_id"].iloc[0]
                )
                for t in picks
            }
        args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]  # fmt: skip
        out: dict[str, Any] = {"n_train": n_train, "n_test": len(tests), "targets": TARGETS,
                               "load_avg_1min_before": os.getloadavg()[0]}  # fmt: skip
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
            context = browser.new_context(viewport={"width": 1400, "height": 1800})

            def first_render(url: str, test_id: int) -> float:
                page = context.new_page()
                t0 = time.perf_counter()
                page.goto(f"{url}/?test={test_id}", timeout=120_000)
                _rendered(page, test_id, first[test_id])
                return time.perf_counter() - t0

            with _server(run) as (url, _):
                out["first_render_cold_browser_s"] = first_render(url, picks[0])
            # the headline: a freshly started server, visited by a browser that has loaded Streamlit before
            with _server(run) as (url, start_s):
                out["server_start_s"] = start_s
                out["first_render_cold_server_s"] = first_render(url, picks[1])
                out["first_render_warm_s"] = first_render(url, picks[2])  # another session, caches warm
                page = context.pages[-1]
                # images the browser fetches per switch: only the thumbnails shown (lazily, on demand)
                media: list[str] = []
                page.on("request", lambda r: media.append(r.url) if "/media/" in r.url else None)
                times, fetched = [], []
                for test_id in picks[3:]:
                    picker = page.locator("[data-testid='stSelectbox']").filter(has_text="Test example id")
                    picker.locator("input").click()
                    page.keyboard.type(str(test_id))
                    media.clear()
                    t0 = time.perf_counter()
                    page.keyboard.press("Enter")
                    _rendered(page, test_id, first[test_id])
                    times.append(time.perf_counter() - t0)
                    fetched.append(len(media))
                out["images_shown"] = page.evaluate("document.images.length")
                out["images_fetched_per_switch"] = fetched
            browser.close()
        out["switch_s"] = {"median": statistics.median(times), "max": max(times), "all": times}
        out["cpus"] = os.cpu_count()
        out["load_avg_1min_after"] = os.getloadavg()[0]
        return out


def report(res: dict[str, Any]) -> str:
    sw = res["switch_s"]
    return (
        f"Dashboard on {res['n_train']:,} training samples, {res['n_test']:,} test examples ({res['cpus']} CPUs, "
        f"load {res['load_avg_1min_before']:.1f}): server up in {res['server_start_s']:.2f} s; Explore first "
        f"render {res['first_render_cold_server_s']:.2f} s on a cold server (target <= {TARGETS['first_render_s']} "
        f"s; {res['first_render_cold_browser_s']:.2f} s with the browser's cache cold too, "
        f"{res['first_render_warm_s']:.2f} s for another session); switching test example median "
        f"{sw['median']:.2f} s, worst {sw['max']:.2f} s (target <= {TARGETS['switch_s']} s)"
    )


if __name__ == "__main__":
    print(report(measure(sys.argv[1] if len(sys.argv) > 1 else None)))
