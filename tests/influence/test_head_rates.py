"""The rate each step and checkpoint applied to the scored head, against the rates the training loop's own
optimizer applied (read live, while it trained): discriminative rates (the body's group first, the head at ten
times its rate, a schedule), then a stage training the body alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fgtrac_core import RunStore
from fgtrac_core.influence import tracin
from fgtrac_core.influence.head_rates import checkpoint_head_rate, head_rates
from fgtrac_core.influence.run_influence import run_influence
from fgtrac_core.influence.weighting import usage_weights
from fgtrac_core.stages.replay import deterministic
from tests.stages._loops import INPUTS_REF, MLP, MODEL_REF, N_TRAIN, create_run, dataset


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, float], dict[int, float]]:
    """The run, {step: the head's rate the loop's optimizer applied}, {checkpoint id: the head's rate of the step
    that produced it}."""
    torch.manual_seed(0)
    x, y = dataset()
    model = MLP()
    run_dir = tmp_path_factory.mktemp("rates") / "run"
    run = create_run(run_dir, "rates", {"model": MODEL_REF, "inputs": INPUTS_REF, "head_layer": "head"})
    applied: dict[int, float] = {}
    at_checkpoint: dict[int, float] = {}
    step = 0
    g = torch.Generator().manual_seed(1)
    stages = [
        ("a", lambda: torch.optim.SGD(
            [{"params": model.body.parameters(), "lr": 0.01}, {"params": model.head.parameters(), "lr": 0.1}],
            momentum=0.9,
        )),
        ("b", lambda: torch.optim.SGD(model.body.parameters(), lr=0.05)),
    ]  # fmt: skip
    for name, make in stages:
        opt = make()
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        with run.stage(name, optimizer=opt, model=model):
            for _ in range(2):
                for ids in torch.randperm(N_TRAIN, generator=g).split(8):
                    head = [grp["lr"] for grp in opt.param_groups if any(p is model.head.weight for p in grp["params"])]
                    applied[step] = head[0] if head else 0.0
                    opt.zero_grad()
                    F.cross_entropy(model(x[ids]), y[ids]).backward()
                    opt.step()
                    sched.step()
                    run.log_batch(ids)
                    step += 1
                at_checkpoint[run.checkpoint(model, opt).checkpoint_id] = applied[step - 1]
    run.close()
    return run_dir, applied, at_checkpoint


def test_head_rates_are_the_loops_own(recorded) -> None:
    run_dir, applied, at_checkpoint = recorded
    with RunStore(run_dir) as store:
        rates = head_rates(store, "head")
        ck = store.checkpoints()
        got = {
            int(c.checkpoint_id): checkpoint_head_rate(store, {"checkpoint_id": c.checkpoint_id, "lr": c.lr}, rates)
            for c in ck.itertuples()
            if int(c.checkpoint_id) in at_checkpoint
        }
    assert rates == applied  # every step: the head's group is not the first in a, and b does not train the head
    assert got == at_checkpoint
    assert ck.set_index("checkpoint_id").loc[1, "lr"] != at_checkpoint[1]  # the recorded column is the body's


def test_checkpoint_and_usage_weights_take_the_heads_rate(recorded) -> None:
    """TracInCP of the head: each checkpoint weighs the head's rate (stage b's, which did not train it, 0); usage
    weights sum, per checkpoint, the head's rates of the steps it stands for."""
    run_dir, applied, at_checkpoint = recorded
    summary = run_influence(
        run_dir, k=5, checkpoints="all", weighting="checkpoint", model=MODEL_REF, inputs=INPUTS_REF, layer="head"
    )
    with RunStore(run_dir) as store:
        top = store.df(
            "SELECT test_id, train_id, view, direction, rank, score FROM influence_topk WHERE analysis_id = ?",
            [summary.analysis_id],
        )
        usage = usage_weights(store, np.arange(N_TRAIN), [c["checkpoint_id"] for c in summary.checkpoints],
                              head_rates(store, "head"))  # fmt: skip
    # checkpoint 0 (stage a's start) weighs the head's initial rate, 0.1
    assert [c["lr"] for c in summary.checkpoints] == [at_checkpoint.get(c["checkpoint_id"], 0.1) for c in
                                                      summary.checkpoints]  # fmt: skip
    x, y = dataset()
    states = [(Path(run_dir) / c["path"], c["lr"]) for c in summary.checkpoints]
    with deterministic(1):
        scores = tracin(MLP(), "head", (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:]),
                        [(str(p), lr) for p, lr in states])  # fmt: skip
    raw = top[(top["view"] == "raw") & (top["direction"] == "proponent") & (top["rank"] == 1)]
    for row in raw.itertuples():
        assert row.score == pytest.approx(float(scores[int(row.test_id) - N_TRAIN, int(row.train_id)]), rel=1e-5)
    for col, iv in enumerate(usage.intervals):
        want = sum(applied[t] for t in range(iv["first_step"], iv["last_step"] + 1)) if iv["n_steps"] else 0.0
        assert usage.matrix[:, col].sum() == pytest.approx(want, rel=1e-9)
