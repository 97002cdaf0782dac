"""The writer process (`Run.create(..., writer="process")`): the same records as the writer thread, failures in
it raised in the training process, and crash semantics on either side: the training process killed (the writer
process exits at once, the run reopens and verifies) or the writer process killed (the next recorder call says so,
what it committed is intact)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch

from fgtrac_core import FgtracError, Run, RunStore, verify_run
from fgtrac_core.tracking._writer import RecordingFailedError
from tests.tracking._killed import record_until_killed

_TABLES = (
    "samples", "transforms", "transform_samples", "stages", "batches", "batch_samples", "optimizer_steps",
    "checkpoints", "analyses", "influence_topk", "run_sessions", "usage_indexes",
)  # fmt: skip


def _topk(test_id: int) -> pa.Table:
    return pa.table(
        {
            "test_id": pa.array([test_id] * 2, pa.int64()),
            "view": pa.array(["all"] * 2),
            "direction": pa.array(["proponent", "opponent"]),
            "rank": pa.array([1, 1], pa.int32()),
            "train_id": pa.array([3, 4], pa.int64()),
            "score": pa.array([0.5, -0.25]),
            "cosine": pa.array([0.1, -0.1]),
            "contributions": pa.array(["[]", "[]"]),
        }
    )


def _record(run_dir: Path, writer: str) -> float:
    """Two stages (SGD, AdamW) of a small loop with a transform, checkpoints and two analyses; the closed run's
    background CPU seconds."""
    torch.manual_seed(0)
    x = torch.randn(120, 4)
    y = (x[:, 0] > 0).long()
    run = Run.create(run_dir, name="w", writer=writer)
    run.register_samples(np.arange(120), split="train", labels=y.numpy(), raw=x.numpy())
    run.log_transform("standardise", np.arange(120), mean=0.0)
    model = torch.nn.Linear(4, 2)
    for name, make in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
        opt = make(model.parameters(), lr=0.05)
        with run.stage(name, optimizer=opt, model=model):
            for epoch in range(2):
                for i in range(0, 120, 30):
                    ids = torch.arange(i, i + 30)
                    loss = torch.nn.functional.cross_entropy(model(x[ids]), y[ids])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    run.log_batch(ids, epoch=epoch, loss=loss)
                run.checkpoint(model, opt, val_loss=1.0 / (epoch + 1), epoch=epoch)
    for test_id in (7, 8):
        run.record_analysis("influence", "tracincp", {"k": 1}, [], {"influence_topk": _topk(test_id)})
    run.close()
    return run.background_cpu_s


def _rows(run_dir: Path) -> dict[str, list[tuple]]:
    """Every row of `_TABLES` in the published snapshot, without the columns that hold wall-clock times."""
    out = {}
    with duckdb.connect(str(run_dir / "snapshot.duckdb"), read_only=True) as con:
        for table in _TABLES:
            cols = [
                name
                for name, kind in con.execute(
                    "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
                    "ORDER BY ordinal_position",
                    [table],
                ).fetchall()
                if not kind.startswith("TIMESTAMP") and name not in ("sha256", "size_bytes")
            ]
            out[table] = con.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY ALL").fetchall()
    return out


def test_the_process_records_what_the_thread_records(tmp_path: Path) -> None:
    """Row for row (checkpoint files differ only by the run id they name), and both verify."""
    cpu = {w: _record(tmp_path / w, w) for w in ("thread", "process")}
    for writer in cpu:
        assert verify_run(tmp_path / writer).ok
        assert cpu[writer] > 0.0
    thread, process = _rows(tmp_path / "thread"), _rows(tmp_path / "process")
    assert all(thread[t] for t in _TABLES)
    assert thread == process
    with RunStore(tmp_path / "process") as store:
        assert len(store.analyses()) == 2


def test_the_environment_chooses_the_writer_and_a_bad_choice_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FGTRAC_WRITER", "process")
    run = Run.create(tmp_path / "env")
    assert type(run._writer).__name__ == "ProcessWriter"  # noqa: SLF001
    run.close()
    monkeypatch.setenv("FGTRAC_WRITER", "fork")
    with pytest.raises(FgtracError, match="FGTRAC_WRITER must be one of 'thread', 'process', not 'fork'"):
        Run.create(tmp_path / "bad")
    with pytest.raises(FgtracError, match="writer must be one of"):
        Run.open(tmp_path / "env", writer="threads")
    assert not (tmp_path / "bad").exists()
    assert verify_run(tmp_path / "env").ok


def _children(parent: int) -> set[int]:
    """The child processes of `parent` (started by any of its threads)."""
    return {
        int(c)
        for task in Path(f"/proc/{parent}/task").iterdir()
        for c in (task / "children").read_text().split()
    }


def _writer_pid(parent: int, before: frozenset[int] = frozenset()) -> int:
    """The one child process of `parent` not in `before`."""
    (pid,) = _children(parent) - before
    return pid


def test_a_killed_writer_process_is_reported_at_the_next_call_and_its_commits_stay(tmp_path: Path) -> None:
    before = frozenset(_children(os.getpid()))
    run = Run.create(tmp_path / "run", writer="process")
    run.register_samples(np.arange(10), split="train", raw=[bytes([i]) for i in range(10)])
    run.flush()
    os.kill(_writer_pid(os.getpid(), before), signal.SIGKILL)
    deadline = time.monotonic() + 10
    with pytest.raises(RecordingFailedError, match="writer process ended unexpectedly"):  # noqa: PT012
        while time.monotonic() < deadline:
            run.annotate_samples([1], "note", [True])
            time.sleep(0.05)
    with pytest.raises(RecordingFailedError, match="ended unexpectedly"):
        run.close()
    reopened = Run.open(tmp_path / "run")  # the killed writer's lock is gone with it
    reopened.close()
    with RunStore(tmp_path / "run") as store:
        assert len(store.samples()) == 10
    assert verify_run(tmp_path / "run").ok


def _ended(pid: int) -> bool:
    """Whether every thread of process `pid` has exited (a zombie awaiting its reaper counts)."""
    try:
        return [t.name for t in Path(f"/proc/{pid}/task").iterdir()] == [str(pid)] and (
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        )
    except FileNotFoundError:
        return True


_KILLED = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from fgtrac_core import Run
    run = Run.create(sys.argv[1], name="killed", writer="process")
    run.register_samples(np.arange(100), split="train", raw=[bytes([i]) for i in range(100)])
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with run.stage("train", optimizer=opt, model=model):
        for step in range(10_000_000):
            opt.step()
            run.log_batch(np.arange(step % 90, step % 90 + 10), loss=0.5)
            if step % 10 == 9:
                run.checkpoint(model, opt, val_loss=1.0 / (step + 1)) if step % 50 == 49 else run.flush()
                print(step + 1, flush=True)
    """
)


def test_the_writer_process_exits_with_the_training_process_and_the_run_reopens(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    writers: list[int] = []
    committed = record_until_killed(_KILLED, run_dir, 120, lambda pid: writers.append(_writer_pid(pid)))
    writer = writers[0]
    # the kernel ends it with the training process (and so does the closed pipe)
    deadline = time.monotonic() + 5
    while not _ended(writer):
        assert time.monotonic() < deadline, "the writer process outlived the training process"
        time.sleep(0.01)
    run = Run.open(run_dir)
    run.close()
    assert verify_run(run_dir).ok
    with RunStore(run_dir) as store:
        summary = store.summary()
        assert summary["n_steps"] >= committed and summary["n_steps"] % 10 == 0
        assert summary["n_sample_uses"] == 10 * summary["n_steps"]
        assert summary["stages"][0]["status"] == "interrupted"


_INTERRUPTED = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from fgtrac_core import Run
    run = Run.create(sys.argv[1], name="interrupted", writer="process")
    run.register_samples(np.arange(100), split="train", raw=[bytes([i]) for i in range(100)])
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        with run.stage("train", optimizer=opt, model=model):
            for step in range(10_000_000):
                opt.step()
                run.log_batch(np.arange(step % 90, step % 90 + 10), loss=0.5)
                if step == 200:
                    print("training", flush=True)
    except KeyboardInterrupt:
        run.close()
        print("closed", flush=True)
    """
)


def test_ctrl_c_interrupts_the_loop_not_the_writer_process(tmp_path: Path) -> None:
    """SIGINT to the terminal's process group (what Ctrl-C sends) reaches the training loop only: the writer
    process still commits the interrupted stage and the close."""
    run_dir = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert child.stdout.readline() == "training\n"
        os.killpg(child.pid, signal.SIGINT)
        assert child.stdout.readline() == "closed\n"
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert verify_run(run_dir).ok
    with RunStore(run_dir) as store:
        summary = store.summary()
        assert summary["stages"][0]["status"] == "failed" and summary["n_steps"] > 200


def test_a_writer_process_that_cannot_start_is_a_one_line_error_and_the_creation_can_be_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(RecordingFailedError, match=r"^could not start the writer process: .*no-python"):
        Run.create(tmp_path / "run", writer="process")
    monkeypatch.undo()
    run = Run.create(tmp_path / "run", writer="process")  # the interrupted creation is started afresh
    run.close()
    assert verify_run(tmp_path / "run").ok


def test_the_writer_process_imports_neither_torch_nor_pandas() -> None:
    """What keeps its start-up at ~0.5 s (torch alone takes ~3 s to import here)."""
    code = (
        "import sys; from fgtrac_core.tracking._writer_process import main; "
        "print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
