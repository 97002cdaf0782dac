"""The recorder API on a tiny model: every record lands, is queryable, and bad calls fail clearly."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
import torch
from torch import nn

from fgtrac_core import RecorderStateError, Run, RunExistsError, RunStore, UnknownSampleError
from fgtrac_core.errors import FgtracError, RunLockedError, RunNotFoundError
from fgtrac_core.store.layout import RunLayout
from fgtrac_core.store.schema import create_schema
from tests.conftest import run_cli


def _tiny_run(
    run_dir: Path, *, flush_every: int = 100_000, writer: str | None = None
) -> tuple[Run, nn.Module, np.ndarray]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    raw = np.arange(40, dtype=np.uint8).reshape(10, 4)
    run = Run.create(run_dir, name="tiny", config={"seed": 0}, flush_every=flush_every, writer=writer)
    run.register_samples(
        np.arange(10),
        split="train",
        labels=np.arange(10) % 3,
        raw=raw,
        thumbnails=np.zeros((10, 2, 2), np.uint8),
    )
    return run, model, raw


def _train(run: Run, model: nn.Module, steps: int = 6) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with run.stage("only", optimizer=opt, scheduler=sched, model=model, note="x"):
        for step in range(steps):
            ids = torch.tensor([step % 10, (step + 3) % 10])
            loss = model(torch.randn(2, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log_batch(ids, step=step, epoch=step // 3, loss=loss)
            sched.step()
        run.checkpoint(model, opt, val_loss=torch.tensor(0.5), metrics={"acc": 1.0})


def test_records_samples_batches_stages_checkpoints(tmp_path: Path) -> None:
    run, model, raw = _tiny_run(tmp_path / "r")
    run.log_transform("scale", np.arange(10), divisor=2.0)
    _train(run, model)
    run.close()

    with RunStore(tmp_path / "r") as store:
        s = store.summary()
        assert s["samples"] == {"train": 10}
        assert s["n_steps"] == 6 and s["n_sample_uses"] == 12
        assert [st["name"] for st in s["stages"]] == ["only"]
        assert s["stages"][0]["start_step"] == 0 and s["stages"][0]["end_step"] == 5
        assert [c["kind"] for c in s["checkpoints"]] == ["stage_start", "periodic", "stage_end"]
        assert s["checkpoints"][1]["val_loss"] == pytest.approx(0.5)
        assert s["checkpoints"][1]["step"] == 6
        # the checkpoint records the lr that produced its parameters (last logged batch), not the next one
        assert s["checkpoints"][1]["lr"] == pytest.approx(0.1 * 0.5**2)

        info = store.sample(3)
        assert info["content_sha256"] == hashlib.sha256(raw[3].tobytes()).hexdigest()
        assert store.thumbnail(3).startswith(b"\x89PNG")
        usage = store.sample_usage(3)
        # sample 3 is in batches of steps 0 (position 1) and 3 (position 0)
        assert usage["step"].tolist() == [0, 3]
        assert usage["position"].tolist() == [1, 0]
        assert usage["epoch"].tolist() == [0, 1]
        assert usage["lr"].tolist() == pytest.approx([0.1, 0.05])
        assert store.sample_transforms(3)["name"].tolist() == ["scale"]
        hp = json.loads(store.stages()["hparams"][0])
        assert (
            hp["class"] == "SGD" and hp["param_groups"][0]["momentum"] == 0.9 and hp["user"] == {"note": "x"}
        )
        assert json.loads(store.stages()["lr_schedule"][0])["class"] == "StepLR"
        with pytest.raises(UnknownSampleError):
            store.sample_usage(99)


def test_checkpoint_files_hash_and_load_weights_only(tmp_path: Path) -> None:
    run, model, _ = _tiny_run(tmp_path / "r")
    _train(run, model)
    run.close()
    with RunStore(tmp_path / "r") as store:
        ckpts = store.checkpoints()
    for row in ckpts.itertuples():
        path = tmp_path / "r" / row.path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row.sha256
        state = torch.load(path, weights_only=True)
        assert state["format"] == "fgtrac-checkpoint/1"
        assert set(state["model"]) == {"0.weight", "0.bias"}
    final = torch.load(tmp_path / "r" / ckpts.path.iloc[-1], weights_only=True)
    assert torch.equal(final["model"]["0.weight"], model[0].weight.detach())
    assert "momentum_buffer" in final["optimizer"]["state"][0]


def test_flush_every_commits_while_recording(tmp_path: Path) -> None:
    # the writer thread, whose connection the test reads (the suite also runs with FGTRAC_WRITER=process)
    run, model, _ = _tiny_run(tmp_path / "r", flush_every=4, writer="thread")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with run.stage("s", optimizer=opt, model=model):
        for step in range(3):
            opt.step()  # batches belong to optimizer steps: each is committed once its step ran
            run.log_batch([1, 2], step=step)
        # the second batch reached 4 pending sample rows and was committed; the third is still buffered
        run._writer.drain()
        assert run._con.execute("SELECT count(*) FROM batch_samples").fetchone()[0] == 4
    run.close()


def test_an_interrupted_create_is_started_afresh_never_taken_for_a_run(tmp_path: Path) -> None:
    """What a Run.create interrupted before its first signed commit leaves (its marker and a database without
    ledger entries): Run.open refuses it in one line, Run.create starts it afresh — unless another process still
    holds that database (refused, nothing deleted).  A finished run is never discarded."""
    layout = RunLayout.of(tmp_path / "r")
    layout.root.mkdir()
    layout.creating_marker.write_bytes(b"")
    con = duckdb.connect(str(layout.live_db))
    create_schema(con)
    con.close()
    with pytest.raises(RunNotFoundError, match="its Run.create was interrupted before the first signed commit"):
        Run.open(layout.root)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(layout.live_db)!r}); print('held', "
         "flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match="is being created by another process"):
            Run.create(layout.root)
        assert layout.live_db.exists() and layout.creating_marker.exists()
    finally:
        holder.kill()
        holder.wait()
    Run.create(layout.root, name="afresh").close()
    assert not layout.creating_marker.exists()
    with RunStore(layout.root) as store:
        assert store.summary()["name"] == "afresh"
    with pytest.raises(RunExistsError):
        Run.create(layout.root)
    Run.open(layout.root).close()
    assert run_cli("verify", str(layout.root)).returncode == 0


def test_bad_calls_fail_clearly_and_record_nothing(tmp_path: Path) -> None:
    run, model, _ = _tiny_run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RecorderStateError):
        run.log_batch([1], step=0)
    with pytest.raises(FgtracError, match="already registered"):
        run.register_samples([3], split="train", raw=[b"x"])
    with pytest.raises(FgtracError, match="exactly one"):
        run.register_samples([50], split="train")
    run.register_samples([20], split="train", raw=[b"y"])  # ids 0-9 and 20: a gap between them
    with run.stage("s", optimizer=opt, model=model):
        with pytest.raises(UnknownSampleError, match="42"):
            run.log_batch([1, 42], step=0)
        for unknown in (-3, 15):  # below the smallest id, in the gap
            with pytest.raises(UnknownSampleError, match=f"sample id {unknown} was never"):
                run.log_batch(torch.tensor([20, unknown, 1]), step=0)
        run.log_batch([1], step=0)
        with pytest.raises(RecorderStateError, match="nest"), run.stage("t", optimizer=opt):
            pass
        run.log_batch([2], step=1)
        with pytest.raises(RecorderStateError, match="before"):
            run.log_batch([1], step=0)
    with pytest.raises(RecorderStateError, match="already exists"), run.stage("s", optimizer=opt):
        pass
    run.close()
    with RunStore(tmp_path / "r") as store:
        assert store.sample_usage(1)["step"].tolist() == [0]
        assert store.summary()["n_sample_uses"] == 2


def test_create_refuses_existing_run_and_writes_nothing(tmp_path: Path) -> None:
    run, model, _ = _tiny_run(tmp_path / "r")
    run.close()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*")}
    with pytest.raises(RunExistsError):
        Run.create(tmp_path / "r")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*")} == before


def test_failed_stage_is_marked_and_open_resumes(tmp_path: Path) -> None:
    run, model, _ = _tiny_run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ZeroDivisionError), run.stage("boom", optimizer=opt, model=model):
        run.log_batch([1, 2], step=0)
        _ = 1 / 0
    run.close()
    run = Run.open(tmp_path / "r")
    _train(run, model)
    run.close()
    with RunStore(tmp_path / "r") as store:
        stages = store.stages()
        assert stages["status"].tolist() == ["failed", "done"]
        assert stages["start_step"].tolist() == [0, 1]
        assert store.sample_usage(1)["step"].tolist()[0] == 0


def test_stage_needs_a_model(tmp_path: Path) -> None:
    run, model, _ = _tiny_run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RecorderStateError, match="model"), run.stage("s", optimizer=opt):
        pass
    run.close()


def test_sample_lists_uses_logged_without_epoch_or_loss(tmp_path: Path) -> None:
    """log_batch's epoch and loss are optional: `fgtrac sample` shows "-" for them, not "nan" or "4.0"."""
    run, model, _ = _tiny_run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with run.stage("only", optimizer=opt, model=model):
        for step in range(2):
            opt.zero_grad()
            model(torch.randn(2, 4)).pow(2).mean().backward()
            opt.step()
            run.log_batch([3, 4], epoch=step if step else None, loss=None)
    run.close()
    lines = run_cli("sample", str(tmp_path / "r"), "3", check=True).stdout.splitlines()
    uses = [ln.split() for ln in lines if ln.lstrip().startswith("step ")]
    assert uses == [["step", "0", "epoch", "-", "only", "lr", "0.1", "batch", "loss", "-"],
                    ["step", "1", "epoch", "1", "only", "lr", "0.1", "batch", "loss", "-"]]  # fmt: skip


def test_arrays_the_loop_reuses_are_recorded_as_they_were_when_logged(tmp_path: Path) -> None:
    """A loop that shuffles its permutation in place every epoch and logs views of it (batches are written by the
    writer later): every batch is recorded as it was at log_batch, as are ids and labels registered from arrays
    the caller changes afterwards."""
    run = Run.create(tmp_path / "r", name="reuse", config={})
    ids, labels = np.arange(20), np.arange(20) % 2
    run.register_samples(ids, split="train", labels=labels, raw=np.zeros((20, 1), np.uint8))
    ids[:] = 99
    labels[:] = 7
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    perm, targets, logged = np.arange(20), np.zeros(5, np.int64), []
    rng = np.random.default_rng(0)
    with run.stage("s", optimizer=opt, model=model):
        for epoch in range(3):
            rng.shuffle(perm)
            for start in range(0, 20, 5):
                batch = perm[start : start + 5]
                targets[:] = epoch  # one buffer, refilled per batch
                opt.zero_grad()
                model(torch.randn(5, 2)).sum().backward()
                opt.step()
                run.log_batch(batch, targets=targets)
                logged.append((batch.tolist(), [epoch] * 5))
    run.close()
    with RunStore(tmp_path / "r") as store:
        rows = store.df(
            """SELECT list(sample_id ORDER BY position) AS ids, list(target ORDER BY position) AS targets
               FROM batch_samples GROUP BY batch_id ORDER BY batch_id"""
        )
        assert [(list(a), list(t)) for a, t in zip(rows["ids"], rows["targets"], strict=True)] == logged
        samples = store.df("SELECT sample_id, label FROM samples ORDER BY sample_id")
    assert samples["sample_id"].tolist() == list(range(20)) and samples["label"].tolist() == [i % 2 for i in range(20)]


@pytest.mark.parametrize(
    "form",
    [
        lambda v: torch.tensor(v),
        lambda v: torch.tensor(v, dtype=torch.int32),
        lambda v: torch.tensor(v, dtype=torch.uint8),
        lambda v: np.array(v),
        lambda v: np.array(v, np.uint64),
        lambda v: np.array(v, np.int16)[::-1][::-1],
        list,
        tuple,
    ],
    ids=["int64-tensor", "int32-tensor", "uint8-tensor", "int64-array", "uint64-array", "int16-view", "list", "tuple"],
)
def test_ids_and_targets_are_read_alike_in_every_form(tmp_path: Path, form: Any) -> None:
    """Sample ids and targets given as tensors, arrays (any integer dtype, views) or sequences are recorded alike,
    and checked alike against the registered ids — here one range (0-9), checked by its ends: an id just past
    either end is refused, the batch not recorded; a float, bool or 2-D one is a one-line error."""
    run, model, _ = _tiny_run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with run.stage("s", optimizer=opt, model=model):
        for unknown in (-1, 10):
            with pytest.raises(UnknownSampleError, match=f"sample id {unknown} was never"):
                run.log_batch(form([0, 9, unknown]) if unknown >= 0 else [0, unknown])
        for bad in (torch.tensor([1.0, 2.0]), torch.tensor([True, False]), torch.tensor([[1, 2]]), np.array([0.5])):
            with pytest.raises(FgtracError, match="sample ids must be a 1-D sequence of integers"):
                run.log_batch(bad)
        with pytest.raises(FgtracError, match="epoch must be an integer, not float 1.5"):
            run.log_batch([1], epoch=1.5)
        opt.step()
        run.log_batch(form([9, 0, 4, 4]), targets=form([2, 1, 0, 7]), epoch=np.int64(3))
        run.checkpoint(model, opt, epoch=torch.tensor(3))
    run.close()
    with RunStore(tmp_path / "r") as store:
        rows = store.df("SELECT sample_id, target FROM batch_samples ORDER BY position")
        assert rows["sample_id"].tolist() == [9, 0, 4, 4] and rows["target"].tolist() == [2, 1, 0, 7]
        assert store.df("SELECT epoch FROM batches")["epoch"].tolist() == [3]
        assert store.df("SELECT epoch FROM checkpoints WHERE kind = 'periodic'")["epoch"].tolist() == [3]


def test_losses_and_targets_are_checked_when_logged(tmp_path: Path) -> None:
    """A non-scalar loss or a loss that is not a number fails at log_batch (not later, in the writer), and the
    batch is not recorded; tensor losses are fetched together at flush with their values."""
    run, model, _ = _tiny_run(tmp_path / "r")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with run.stage("s", optimizer=opt, model=model):
        opt.step()
        with pytest.raises(FgtracError, match=r"loss must be a scalar, not a tensor of shape \(2,\)"):
            run.log_batch([1, 2], loss=torch.ones(2))
        with pytest.raises(FgtracError, match="expected a number, not str"):
            run.log_batch([1, 2], loss="low")
        with pytest.raises(FgtracError, match="targets must be a 1-D sequence of integers"):
            run.log_batch([1, 2], targets=[0.5, 1.5])
        run.log_batch([1, 2], loss=torch.tensor(0.25, dtype=torch.float64))
        opt.step()
        run.log_batch([3], loss=torch.tensor([[1.5]]))
        opt.step()
        run.log_batch([4], loss=2)
    run.close()
    with RunStore(tmp_path / "r") as store:
        assert store.df("SELECT loss FROM batches ORDER BY batch_id")["loss"].tolist() == [0.25, 1.5, 2.0]


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_wrapped_models_are_checkpointed_as_the_plain_model(tmp_path: Path, wrap: str) -> None:
    """torch.compile and DataParallel prefix every state-dict key (`_orig_mod.`, `module.`): checkpoints hold
    the plain model's keys, which the pipeline's model loads."""
    run, model, _ = _tiny_run(tmp_path / "r")
    wrapped = torch.compile(model, backend="eager") if wrap == "compile" else nn.DataParallel(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    with run.stage("s", optimizer=opt, model=wrapped):
        opt.zero_grad()
        wrapped(torch.randn(2, 4)).sum().backward()
        opt.step()
        run.log_batch([0, 1])
        record = run.checkpoint(wrapped, opt)
    run.close()
    saved = torch.load(tmp_path / "r" / record.path, weights_only=True)["model"]
    assert set(saved) == set(model.state_dict()) == {"0.weight", "0.bias"}
