"""Gradient accumulation: a loop that logs several micro-batches per optimizer step replays bit for bit whichever
way it scales their losses (the rule is inferred from the recorded fingerprints), with clipping and an epoch's
shorter last step, and with each step's last micro-batch logged after the step; exact TracIn weighs each sample as
the loop's loss did (against a hand computation); a loop that logs several micro-batches after the step they belong
to is refused in one line; AdamW-influence equals its brute-force reference on such a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fgtrac_core.influence.adamw_influence import adamw_influence, unrolled_influence
from fgtrac_core.influence.exact import exact_pass
from fgtrac_core.pipeline import Pipeline
from fgtrac_core.stages._records import load_training
from fgtrac_core.stages.errors import ReplayMismatchError, StageAnalysisError
from fgtrac_core.stages.replay import deterministic, replay_full
from fgtrac_core.stages.training import _seeds
from fgtrac_core.store import RunStore
from tests.conftest import run_cli
from tests.stages._loops import (
    INPUTS_REF,
    MLP,
    MODEL_REF,
    N_TEST,
    N_TRAIN,
    create_run,
    dataset,
    inputs,
    same_state,
)

K, MICRO = 3, 5  # 48 samples in micro-batches of 5 (the last 3): steps of 3, 3, 3 and 1 micro-batches an epoch


def _scaled(rule: str, loss: torch.Tensor, n: int, total: int) -> torch.Tensor:
    return {"mean": lambda: loss / K, "sum": lambda: loss, "share": lambda: loss * n / total,
            "share_ratio": lambda: loss * (n / total)}[rule]()  # fmt: skip


def _record(
    run_dir: Path, rule: str, *, adam: bool = False, clip: bool = False, log_after_step: str | None = None
) -> tuple[torch.nn.Module, list[tuple[float, list[np.ndarray]]]]:
    """A user's accumulation loop (README calls only); returns the trained model and, per step, (lr, micro-batch
    ids) as the loop ran them.  Each micro-batch is logged after its backward; with `log_after_step` "last" the
    step's last micro-batch is logged after `opt.step()` instead (the loop's log_batch at the end of its body),
    with "all" every one of them."""
    torch.manual_seed(0)
    x, y = dataset()
    model = MLP()
    run = create_run(run_dir, "accumulate", {"model": MODEL_REF, "inputs": INPUTS_REF, "head_layer": "head"})
    opt = (
        torch.optim.Adam(model.parameters(), lr=0.01)
        if adam
        else torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    ids = torch.arange(N_TRAIN)
    loader = DataLoader(TensorDataset(ids, x[ids], y[ids]), batch_size=MICRO, shuffle=True,
                        generator=torch.Generator().manual_seed(3))  # fmt: skip
    ran: list[tuple[float, list[np.ndarray]]] = []
    try:
        with run.stage("train", optimizer=opt, scheduler=sched, model=model):
            for epoch in range(2):
                batches = list(loader)
                for at in range(0, len(batches), K):
                    group = batches[at : at + K]
                    total = sum(len(b[0]) for b in group)
                    opt.zero_grad()
                    for m, (b_ids, xb, yb) in enumerate(group):
                        loss = F.cross_entropy(model(xb), yb)
                        _scaled(rule, loss, len(b_ids), total).backward()
                        after = log_after_step == "all" or (log_after_step == "last" and m == len(group) - 1)
                        if not after:
                            run.log_batch(b_ids, epoch=epoch)
                    if clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
                    ran.append((opt.param_groups[0]["lr"], [b[0].numpy() for b in group]))
                    opt.step()
                    for b_ids, _, _ in group if log_after_step == "all" else group[-1:] if log_after_step else ():
                        run.log_batch(b_ids, epoch=epoch)
                    sched.step()
    finally:
        run.close()
    return model, ran


def _pipeline() -> Pipeline:
    return Pipeline(MLP, inputs, "head", {})


@pytest.mark.parametrize(
    ("rule", "adam", "clip"),
    [("mean", False, True), ("sum", True, False), ("share", False, False), ("share_ratio", True, True)],
)
def test_accumulating_loops_replay_bit_for_bit(tmp_path: Path, rule: str, adam: bool, clip: bool) -> None:
    with deterministic(1):
        trained, ran = _record(tmp_path / "run", rule, adam=adam, clip=clip)
    assert {len(parts) for _, parts in ran} == {1, 3}  # accumulated steps and each epoch's short last step
    with RunStore(tmp_path / "run") as store, deterministic(1):
        training = load_training(store, _pipeline()).training
        stage = training.stages[0]
        assert [len(p) for p in stage.micro or []] == [len(parts) for _, parts in ran]
        assert [b.tolist() for b in stage.batches] == [np.concatenate(parts).tolist() for _, parts in ran]
        inferred = training.accumulation_rule(0)
        # the loop's rule, or one that gives every micro-batch's backward the same gradient in every bit
        seeds = [(_seeds(inferred, tuple(p), K), _seeds(rule, tuple(p), K)) for p in stage.micro or []]
        assert inferred == rule or all(a == b for a, b in seeds)
        assert same_state(replay_full(training).model, trained.state_dict())


def test_each_rule_is_told_apart(tmp_path: Path) -> None:
    """Replaying under a rule that scales the loop's micro-batches otherwise diverges, at the first step where it
    does (so the inference has something to decide): ``mean`` from the short step ending the first epoch."""
    with deterministic(1):
        _record(tmp_path / "run", "share")
    with RunStore(tmp_path / "run") as store, deterministic(1):
        for wrong, step in (("mean", 3), ("sum", 0)):
            training = load_training(store, _pipeline()).training
            training._accumulation[0] = wrong
            diverges = rf"first diverges at step {step} .*gradients accumulated over \d logged batch"
            with pytest.raises(ReplayMismatchError, match=diverges):
                replay_full(training)


def test_stages_replay_through_the_cli(tmp_path: Path) -> None:
    with deterministic(1):
        _record(tmp_path / "run", "mean", clip=True)
    proc = run_cli(
        "stages", str(tmp_path / "run"), "--method", "replay", "--json", "--model", MODEL_REF, "--inputs", INPUTS_REF
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["method"] == "replay"
    (stage,) = json.loads(run_cli("info", str(tmp_path / "run"), "--json", check=True).stdout)["stages"]
    assert (stage["n_steps"], stage["n_batches"]) == (8, 20)  # 10 micro-batches an epoch in steps of 3, 3, 3, 1
    info = run_cli("info", str(tmp_path / "run"), check=True).stdout
    assert "(8 steps, 20 batches: gradient accumulation, 96 uses)" in info


@pytest.mark.parametrize("adam", [False, True])
def test_the_last_micro_batch_logged_after_the_step_is_that_steps(tmp_path: Path, adam: bool) -> None:
    """A loop whose log_batch sits at the end of its body logs each step's last micro-batch after `opt.step()`:
    the recorder sees that a backward ran before the step's first log and after its last, so that batch is the
    step's (not the next one's), and the run replays bit for bit."""
    with deterministic(1):
        trained, ran = _record(tmp_path / "run", "mean", adam=adam, clip=True, log_after_step="last")
    with RunStore(tmp_path / "run") as store, deterministic(1):
        training = load_training(store, _pipeline()).training
        stage = training.stages[0]
        assert [len(p) for p in stage.micro or []] == [len(parts) for _, parts in ran]
        assert [b.tolist() for b in stage.batches] == [np.concatenate(parts).tolist() for _, parts in ran]
        assert same_state(replay_full(training).model, trained.state_dict())


def test_every_micro_batch_logged_after_the_step_is_refused(tmp_path: Path) -> None:
    """Several batches logged after one step cannot be told from the next step's: refused in one line."""
    with deterministic(1):
        _record(tmp_path / "run", "mean", log_after_step="all")
    with RunStore(tmp_path / "run") as store, pytest.raises(StageAnalysisError, match="log each micro-batch right"):
        load_training(store, _pipeline())


def test_exact_tracin_weighs_samples_as_the_loop_did(tmp_path: Path) -> None:
    """Step-exact TracIn on an accumulating SGD run (loss / K, an epoch's last step of one micro-batch) equals a
    hand computation: each step adds lr * ∇ℓ(test)·∇ℓ(z) / (K n) for z in a micro-batch of n (head gradients by
    autograd, the model stepped by plain torch)."""
    with deterministic(1):
        trained, ran = _record(tmp_path / "run", "mean")
    x, y = dataset()
    x_te, y_te = x[N_TRAIN:], y[N_TRAIN:]
    with RunStore(tmp_path / "run") as store:
        records = load_training(store, _pipeline())
        start = store.df("SELECT path FROM checkpoints WHERE kind = 'stage_start'")["path"].iloc[0]
    with deterministic(1):
        got = exact_pass(records.training, "head", np.arange(N_TRAIN), (x_te, y_te)).scores.numpy()
    model = MLP()
    model.load_state_dict(torch.load(tmp_path / "run" / start, weights_only=True)["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)

    def head_grad(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        out = []
        for xi, yi in zip(xs, ys, strict=True):
            model.zero_grad()
            F.cross_entropy(model(xi[None]), yi[None]).backward()
            out.append(torch.cat([model.head.weight.grad.flatten(), model.head.bias.grad]).double())
        return torch.stack(out)

    want = np.zeros((N_TEST, N_TRAIN))
    for lr, parts in ran:
        g_te = head_grad(x_te, y_te)
        for part in parts:
            t = torch.as_tensor(part)
            want[:, part] += (lr / (K * len(part)) * (g_te @ head_grad(x[t], y[t]).T)).numpy()
        opt.zero_grad()
        for part in parts:
            t = torch.as_tensor(part)
            (F.cross_entropy(model(x[t]), y[t]) / K).backward()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    assert same_state(model.state_dict(), trained.state_dict())  # the hand loop followed the recorded run
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)  # float32 gradients: ~1e-9 apart


@pytest.mark.parametrize(("adam", "clip"), [(True, True), (False, False)])
def test_adamw_influence_weighs_samples_as_the_loop_did(tmp_path: Path, adam: bool, clip: bool) -> None:
    """AdamW-influence on an accumulating run (loss / K; Adam with clipping, and SGD) equals its brute-force
    reference, autograd through the unrolled training with each sample weighted as the loop's loss weighed it
    (1/(K n)); SGD's step-exact form equals exact TracIn."""
    with deterministic(1):
        _record(tmp_path / "run", "mean", adam=adam, clip=clip)
    x, y = dataset()
    test = (x[N_TRAIN:], y[N_TRAIN:])
    with RunStore(tmp_path / "run") as store:
        training = load_training(store, _pipeline()).training
    with deterministic(1):
        assert training.accumulation_rule(0) == "mean"
        want = unrolled_influence(training, np.arange(N_TRAIN), test, params=["head.weight", "head.bias"])
        got = adamw_influence(training, "head", np.arange(N_TRAIN), test, sgd_form="trajectory").scores
        assert float((got - want).abs().max() / want.abs().max()) < 1e-6
        if not adam:  # SGD's step-exact TracIn form: exact TracIn's terms (tested above against a hand computation)
            tracin = adamw_influence(training, "head", np.arange(N_TRAIN), test).scores
            exact = exact_pass(training, "head", np.arange(N_TRAIN), test).scores
            np.testing.assert_allclose(tracin.numpy(), exact.numpy(), rtol=1e-5, atol=1e-8)  # float32 factors
