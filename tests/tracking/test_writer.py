"""The background writer's snapshot publishing: spaced at least `PUBLISH_INTERVAL_S` apart when checkpoints come
in quick succession, a deferred publish done once the interval has passed (with no further job to wake the
writer), and never deferred when someone waits for it or at the end."""

from __future__ import annotations

import time

import duckdb

from fgtrac_core.tracking import _writer
from fgtrac_core.tracking._writer import Writer


def test_publishes_are_spaced_deferred_and_never_lost(monkeypatch) -> None:
    monkeypatch.setattr(_writer, "PUBLISH_INTERVAL_S", 0.5)
    published: list[float] = []
    jobs: list[int] = []
    con = duckdb.connect()
    writer = Writer(con, lambda: published.append(time.monotonic()))
    try:
        def wait_for(n: int) -> None:
            deadline = time.monotonic() + 10
            while len(published) < n and time.monotonic() < deadline:
                time.sleep(0.02)

        writer.submit(lambda con: jobs.append(0), publish=True)  # the first checkpoint: published when caught up
        wait_for(1)
        for i in range(1, 5):  # four more in quick succession: one snapshot for all, when the interval is up
            writer.submit(lambda con, i=i: jobs.append(i), publish=True)
        wait_for(2)
        assert jobs == [0, 1, 2, 3, 4]
        assert len(published) == 2, published
        assert published[1] - published[0] >= 0.5
        # a publish someone waits for is done at once, even inside the interval
        writer.submit(lambda con: None, publish=True, wait=True)
        assert len(published) == 3 and published[2] - published[1] < 0.5
        time.sleep(0.7)
        assert len(published) == 3  # nothing was due since
        writer.submit(lambda con: None, publish=True)  # published (the interval has passed) ...
        wait_for(4)
        writer.submit(lambda con: None, publish=True)  # ... and this one, inside the next interval, deferred ...
    finally:
        writer.stop()  # ... to the end, where it is done without waiting out the interval
        con.close()
    assert len(published) == 5 and published[4] - published[3] < 0.5
