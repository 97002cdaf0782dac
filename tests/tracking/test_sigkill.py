"""A recorder killed with SIGKILL leaves a run that opens, with everything committed before the kill intact."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

from fgtrac_core import Run, RunStore
from tests.tracking._killed import record_until_killed

_CHILD = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from torch import nn
    from fgtrac_core import Run
    run = Run.create(sys.argv[1], name="killed")
    run.register_samples(np.arange(100), split="train", raw=[bytes([i]) for i in range(100)])
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with run.stage("train", optimizer=opt, model=model):
        step = 0
        while True:
            opt.step()
            run.log_batch(np.arange(step % 90, step % 90 + 10), step=step, loss=0.5)
            step += 1
            if step % 10 == 0:
                if step % 50 == 0:
                    run.checkpoint(model, opt, val_loss=1.0 / step)
                else:
                    run.flush()
                print(step, flush=True)
    """
)


def test_sigkill_mid_recording_keeps_committed_records(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    committed = record_until_killed(_CHILD, run_dir, 120)

    # the last published snapshot is readable as is (it may lag the live file)
    with RunStore(run_dir) as store:
        assert store.summary()["n_steps"] >= 100

    run = Run.open(run_dir)  # replays DuckDB's WAL and publishes a fresh snapshot
    run.close()
    with RunStore(run_dir) as store:
        summary = store.summary()
        n = summary["n_steps"]
        assert n >= committed and n % 10 == 0  # exactly the committed flushes, no partial batch
        assert summary["n_sample_uses"] == 10 * n
        assert summary["stages"][0]["status"] == "interrupted"
        assert summary["stages"][0]["end_step"] == n - 1
        for c in summary["checkpoints"]:
            assert hashlib.sha256((run_dir / c["path"]).read_bytes()).hexdigest() == c["sha256"]
        assert len([c for c in summary["checkpoints"] if c["kind"] == "periodic"]) >= 2
