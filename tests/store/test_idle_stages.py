"""A stage that applied learning rate 0 at every step (the silent pitfall of a fresh scheduler on an optimizer
whose rate an earlier stage annealed to 0) is named by `fgtrac info` and its `--json`, by every dashboard page,
and on stderr by `fgtrac influence` and `fgtrac stages`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fgtrac_core.store import RunStore
from fgtrac_core.tracking import Run
from tests.app._support import open_page, plain
from tests.conftest import run_cli

PIPELINE = ("--model", "tests.store.test_idle_stages:model", "--inputs", "tests.store.test_idle_stages:inputs",
            "--head-layer", "0")  # fmt: skip


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)


def model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 3))


def inputs(config: dict, ids: np.ndarray) -> torch.Tensor:
    return _data()[0][torch.as_tensor(np.asarray(ids, dtype=np.int64))]


def _record(run_dir: Path, *, restart_lr: bool) -> list[float]:
    """Two stages carrying one SGD optimizer, each with a new CosineAnnealingLR; with `restart_lr` the loop
    resets the rate before the second scheduler (the fix).  Returns the lr of the second stage's steps, read
    from the optimizer by hand (the independent reference)."""
    torch.manual_seed(0)
    x, y = _data()
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    run = Run.create(run_dir, name="idle", config={"torch_threads": torch.get_num_threads()})
    second: list[float] = []
    try:
        run.register_samples(np.arange(24), split="train", labels=y[:24].numpy(), raw=x[:24].numpy())
        run.register_samples(np.arange(24, 30), split="test", labels=y[24:].numpy(), raw=x[24:].numpy())
        for name in ("warmup", "main"):
            if name == "main" and restart_lr:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"]
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
            with run.stage(name, optimizer=opt, scheduler=sched, model=net):
                for step in range(6):
                    ids = np.arange(4 * step, 4 * step + 4)
                    if name == "main":
                        second.append(opt.param_groups[0]["lr"])
                    opt.zero_grad()
                    F.cross_entropy(net(x[ids]), y[ids]).backward()
                    opt.step()
                    run.log_batch(ids)
                    sched.step()
    finally:
        run.close()
    return second


@pytest.mark.parametrize("restart_lr", [False, True])
def test_a_stage_trained_at_lr_0_is_named(tmp_path: Path, restart_lr: bool) -> None:
    run_dir = tmp_path / "run"
    second = _record(run_dir, restart_lr=restart_lr)
    assert (max(second) == 0.0) != restart_lr  # torch's behaviour the check is about
    with RunStore(run_dir) as store:
        ranges = store.applied_lr_ranges()
        stages = dict(zip(store.stages()["name"], store.stages()["stage_id"], strict=True))
        idle = store.idle_stages()
    assert ranges[int(stages["main"])] == pytest.approx((min(second), max(second)))
    assert ranges[int(stages["warmup"])][1] == pytest.approx(0.1)
    assert idle == ([] if restart_lr else [("main", 6)])

    out = json.loads(run_cli("info", str(run_dir), "--json", check=True).stdout)
    assert {s["name"]: s["idle"] for s in out["stages"]} == {"warmup": False, "main": not restart_lr}
    text = run_cli("info", str(run_dir), check=True).stdout
    warned = [line for line in text.splitlines() if line.startswith("warning")]
    if restart_lr:
        assert not warned
    else:
        assert len(warned) == 1 and "'main' applied lr 0 at every step" in warned[0]
        assert "annealed to 0" in warned[0]


def test_every_page_names_the_idle_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    _record(run_dir, restart_lr=False)
    for page in ("views/overview.py", "views/audit.py"):
        at = open_page(run_dir, page, monkeypatch)
        warnings = [plain(w.value) for w in at.warning]
        assert any("Stage main applied learning rate 0 at all 6 of its steps" in w for w in warnings), warnings


def test_analyses_name_the_idle_stage_on_stderr(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _record(run_dir, restart_lr=False)
    for command in (["influence", "--k", "3"], ["stages", "--force"]):
        proc = run_cli(command[0], str(run_dir), *command[1:], *PIPELINE)
        assert proc.returncode == 0, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if "warning" in line]
        assert lines == [lines[0]] and "stage 'main' applied lr 0 at all 6 of its steps" in lines[0], proc.stderr
