"""Runs recorded with ordinary loops (README loop, schedulers in either order, clipping, one optimizer carried
across stages, several epochs without step=) replay bit for bit: against the trained model, against an
independent replay written here from the run's tables, through `replay_full` and through `fgtrac stages`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fgtrac_core.errors import FgtracError
from fgtrac_core.influence.adamw_influence import adamw_influence, check_supported
from fgtrac_core.pipeline import Pipeline
from fgtrac_core.stages import analyze
from fgtrac_core.stages._records import load_training
from fgtrac_core.stages.errors import ReplayMismatchError, StageAnalysisError
from fgtrac_core.stages.estimators import hvp_at
from fgtrac_core.stages.replay import Cursor, deterministic, replay_full, replay_without
from fgtrac_core.stages.training import Training
from fgtrac_core.store import RunStore
from fgtrac_core.tracking import Run
from tests.conftest import run_cli
from tests.stages._loops import (
    INPUTS_REF,
    MLP,
    MODEL_REF,
    N_TRAIN,
    BranchMLP,
    StageCfg,
    dataset,
    edit_step_lr,
    pipeline,
    record,
    reference_replay,
    same_state,
)
from tests.stages._loops import inputs as _inputs

sched = torch.optim.lr_scheduler


def _sgd(lr: float = 0.1, **kw: float):
    return lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3, **kw)


def _adam(lr: float = 0.01):
    return lambda m: torch.optim.Adam(m.parameters(), lr=lr)


def _clip_norm(model: torch.nn.Module, step: int) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.3)


def _clip_value(model: torch.nn.Module, step: int) -> None:
    torch.nn.utils.clip_grad_value_(model.parameters(), clip_value=0.05)


def _step_lr(opt, n):
    return sched.StepLR(opt, step_size=4, gamma=0.7)


def _own_order(cls: type[torch.optim.Optimizer], lr: float, decay: float, **kw: float):
    """Param groups in the loop's own order (weights, then biases without weight decay at half the rate), not
    model.parameters() order: body.weight, head.weight | body.bias, head.bias."""

    def make(m: torch.nn.Module) -> torch.optim.Optimizer:
        weights = [p for n, p in m.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in m.named_parameters() if n.endswith("bias")]
        groups = [{"params": weights, "weight_decay": decay}, {"params": biases, "weight_decay": 0.0, "lr": lr / 2}]
        return cls(groups, lr=lr, **kw)

    return make


def _frozen_body(m: torch.nn.Module) -> torch.optim.Optimizer:
    """The body frozen, the optimizer still over model.parameters() (it skips the frozen ones: their gradient is
    None); momentum and weight decay would move them if it did not."""
    m.body.requires_grad_(False)
    return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)


def _head_only(m: torch.nn.Module) -> torch.optim.Optimizer:
    """A head-only finetune: the body frozen, a new Adam over the head's parameters alone."""
    m.body.requires_grad_(False)
    return torch.optim.Adam(m.head.parameters(), lr=0.02)


# sample id -> the target stage "b" trains on (differs from the registered label)
RELABELLED = {i: (int(dataset()[1][i]) + 1) % 3 for i in (0, 5, 9)}
WITH_TARGETS = {
    "relabelled_later_stage",
    "head_only_finetune",
    "readme_literal_sched_then_log",
    "readme_literal_log_then_sched",
}


def _readme_stage(order: str) -> list[StageCfg]:
    """README.md's "Instrument your own loop", as printed: SGD with momentum and weight decay, OneCycleLR,
    clip_grad_norm_(max_norm=1.0), several epochs, log_batch without step= or lr=, with targets=y."""
    return [
        StageCfg(
            "pretrain",
            lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
            lambda o, n: sched.OneCycleLR(o, max_lr=0.1, total_steps=n),
            epochs=3,
            order=order,
            clip=lambda model, step: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0),
        )
    ]


LOOPS: dict[str, list[StageCfg]] = {
    "readme_literal_sched_then_log": _readme_stage("step_sched_log"),
    "readme_literal_log_then_sched": _readme_stage("step_log_sched"),
    "readme_sched_then_log": [StageCfg("a", _sgd(), _step_lr, epochs=3, order="step_sched_log")],
    "readme_log_then_sched": [StageCfg("a", _sgd(), _step_lr, epochs=3, order="step_log_sched")],
    "log_before_step": [StageCfg("a", _sgd(), _step_lr, epochs=3, order="log_step_sched")],
    "onecycle_momentum": [
        StageCfg("a", _sgd(), lambda o, n: sched.OneCycleLR(o, max_lr=0.3, total_steps=n), epochs=2),
        StageCfg("b", _adam(), lambda o, n: sched.OneCycleLR(o, max_lr=0.02, total_steps=n), epochs=2),
    ],
    "cosine_warm_restarts": [
        StageCfg("a", _sgd(), lambda o, n: sched.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2), epochs=3)
    ],
    "clip_grad_norm": [StageCfg("a", _sgd(0.5), _step_lr, epochs=2, clip=_clip_norm)],
    "clip_grad_value": [StageCfg("a", _sgd(0.5), None, epochs=2, clip=_clip_value)],
    "relabelled_later_stage": [
        StageCfg("a", _sgd(), None, epochs=2),
        StageCfg("b", _adam(), None, epochs=2, labels=RELABELLED),
    ],
    "amsgrad_and_maximize": [  # torch's own optimizers replay them; the estimators do not model them
        StageCfg("a", lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, maximize=True), None),
        StageCfg("b", lambda m: torch.optim.Adam(m.parameters(), lr=0.01, amsgrad=True), _step_lr, epochs=2),
    ],
    "param_groups_own_order": [
        StageCfg("a", _own_order(torch.optim.SGD, 0.1, 1e-3, momentum=0.9), _step_lr, epochs=2),
        StageCfg("b", _own_order(torch.optim.AdamW, 0.01, 0.05), None, epochs=2),
    ],
    "frozen_body_all_params": [
        StageCfg("a", _sgd(), None, epochs=2),
        StageCfg("b", _frozen_body, _step_lr, epochs=2, clip=_clip_norm),  # the clip norm over the head alone
    ],
    "own_order_clipped": [  # clip_grad_norm_(model.parameters()) sums the norms in another order than the optimizer's
        StageCfg("a", _own_order(torch.optim.AdamW, 0.01, 0.05), _step_lr, epochs=2, clip=_clip_norm),
    ],
    "head_reinitialised": [  # a new head between the stages (transfer learning), then everything trained
        StageCfg("a", _sgd(), None, epochs=2),
        StageCfg("b", _adam(), _step_lr, epochs=2, reset=lambda m: m.head.reset_parameters()),
    ],
    "new_head_frozen_body": [  # a new head trained alone on the frozen body
        StageCfg("a", _sgd(), None, epochs=2),
        StageCfg("b", _frozen_body, None, epochs=2, reset=lambda m: m.head.reset_parameters()),
    ],
    "head_only_finetune": [
        StageCfg("a", _sgd(), None, epochs=2),
        StageCfg("b", _head_only, lambda o, n: sched.CosineAnnealingLR(o, T_max=n), epochs=2, labels=RELABELLED),
    ],
    "adam_carried": [
        StageCfg("a", _adam(), lambda o, n: sched.CosineAnnealingLR(o, T_max=n), epochs=2),
        StageCfg("b", None, None, epochs=2),
        StageCfg("c", None, lambda o, n: sched.StepLR(o, step_size=3, gamma=0.5), epochs=1),
    ],
    # torch.optim's other optimizers: exact replay steps them as the loop did; the estimators refuse by name.
    # Adagrad builds its state with the optimizer (a fresh one has state, at step 0), then is carried on
    "rmsprop_then_adagrad": [
        StageCfg("a", lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01, momentum=0.5, centered=True,
                                                     weight_decay=1e-3), _step_lr, epochs=2),
        StageCfg("b", lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, initial_accumulator_value=0.1),
                 None, epochs=1),
        StageCfg("c", None, _step_lr, epochs=1),
    ],
    "nadam_carried_clipped": [
        StageCfg("a", lambda m: torch.optim.NAdam(m.parameters(), lr=0.01, weight_decay=0.01,
                                                   decoupled_weight_decay=True), _step_lr, epochs=1, clip=_clip_norm),
        StageCfg("b", None, None, epochs=1, clip=_clip_norm),
    ],
    "other_torch_optimizers": [
        StageCfg("a", lambda m: torch.optim.RAdam(m.parameters(), lr=0.01, weight_decay=0.01), None, epochs=1),
        StageCfg("b", lambda m: torch.optim.Adamax(m.parameters(), lr=0.01), _step_lr, epochs=1),
        StageCfg("c", lambda m: torch.optim.Adadelta(m.parameters(), lr=0.5), None, epochs=1),
        StageCfg("d", lambda m: torch.optim.Rprop(m.parameters(), lr=0.005), None, epochs=1),
        StageCfg("e", lambda m: torch.optim.ASGD(m.parameters(), lr=0.05, t0=3), None, epochs=1),
    ],
}
OTHER_OPTIMIZERS = ("rmsprop_then_adagrad", "nadam_carried_clipped", "other_torch_optimizers")


@pytest.fixture(scope="module", params=sorted(LOOPS))
def recorded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    with deterministic(1):
        model = record(run_dir, LOOPS[request.param], targets=request.param in WITH_TARGETS)
    return request.param, run_dir, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_reference_replay_reproduces_the_trained_model(recorded) -> None:
    name, run_dir, trained = recorded
    with deterministic(1):
        assert same_state(reference_replay(run_dir), trained), name


def test_fgtrac_replay_is_bit_exact(recorded) -> None:
    name, run_dir, trained = recorded
    with RunStore(run_dir) as store, deterministic(1):
        training = load_training(store, pipeline()).training
        result = replay_full(training)
    assert same_state(result.model, trained), name


def test_recorded_facts(recorded) -> None:
    """Steps are numbered by the recorder from 0 without gaps, every step has one batch whose lr is the applied
    one, clipping is recorded where the loop clipped and nothing was marked altered."""
    name, run_dir, _ = recorded
    with duckdb.connect(str(run_dir / "snapshot.duckdb"), read_only=True) as con:
        steps = con.execute(
            "SELECT step, hparams, clip, grads_altered FROM optimizer_steps ORDER BY step"
        ).fetchall()
        batches = con.execute("SELECT step, lr FROM batches ORDER BY batch_id").fetchall()
    assert [s[0] for s in steps] == list(range(len(steps))) == [b[0] for b in batches]
    assert not any(s[3] for s in steps)
    clips = [json.loads(s[2]) for s in steps if s[2]]
    if name in ("clip_grad_norm", "frozen_body_all_params", "own_order_clipped", "nadam_carried_clipped") or (
        name.startswith("readme_literal") and clips
    ):
        rule = {"rule": "norm", "max_norm": 1.0 if name.startswith("readme_literal") else 0.3, "norm_type": 2.0}
        # the loop clips model.parameters(): where the optimizer holds them in another order, a step whose bits
        # only the model's order reproduces says so (either order, when both reproduce it)
        allowed = [rule, {**rule, "order": "model"}] if name == "own_order_clipped" else [rule]
        assert clips and all(c in allowed for c in clips)  # the model's order is forced in test_optimizer_hooks
    elif name == "clip_grad_value":
        assert clips and all(c == {"rule": "value", "clip_value": 0.05} for c in clips)
    else:
        assert not clips
    if name == "onecycle_momentum":  # momentum cycles: recorded as a changed key, step after step
        assert sum("momentum" in json.loads(s[1])[0] for s in steps[1:]) > 5
        assert sum("betas" in json.loads(s[1])[0] for s in steps[1:]) > 5


@pytest.mark.parametrize(
    "loop",
    [
        "readme_literal_sched_then_log",
        "log_before_step",
        "clip_grad_norm",
        "adam_carried",
        "amsgrad_and_maximize",
        "param_groups_own_order",
        "head_only_finetune",
        "frozen_body_all_params",
        "head_reinitialised",
        "own_order_clipped",
        *OTHER_OPTIMIZERS,
    ],
)
def test_cli_stages_replay_succeeds(tmp_path: Path, loop: str) -> None:
    run_dir = tmp_path / "run"
    with deterministic(1):
        record(run_dir, LOOPS[loop], targets=loop in WITH_TARGETS)
    proc = run_cli("stages", str(run_dir), "--method", "replay", "--model", MODEL_REF, "--inputs", INPUTS_REF)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_relabelled_targets_are_lifecycle_events(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with deterministic(1):
        record(run_dir, LOOPS["relabelled_later_stage"], targets=True)
    with duckdb.connect(str(run_dir / "snapshot.duckdb"), read_only=True) as con:
        (first_b,) = con.execute("SELECT start_step FROM stages WHERE name = 'b'").fetchone()
        uses = con.execute(
            "SELECT min(b.step) FROM batch_samples bs JOIN batches b USING (batch_id) "
            "WHERE bs.sample_id = 5 AND b.step >= ?",
            [first_b],
        ).fetchone()
    with RunStore(run_dir) as store:
        label = store.sample(5)["label"]
        assert store.sample_relabels(5) == [
            {"step": uses[0], "stage": "b", "from": label, "to": RELABELLED[5]}
        ]
        assert store.sample_relabels(1) == []
    proc = run_cli("sample", str(run_dir), "5")
    assert proc.returncode == 0, proc.stderr
    assert f"relabelled: {label} → {RELABELLED[5]} from step {uses[0]} (stage b)" in proc.stdout, proc.stdout


def test_hand_scaled_gradients_are_refused_naming_the_first_altered_step(tmp_path: Path) -> None:
    def scale(model: torch.nn.Module, step: int) -> None:
        if step >= 3:
            for p in model.parameters():
                p.grad.mul_(0.9)

    run_dir = tmp_path / "run"
    with deterministic(1):
        record(run_dir, [StageCfg("a", _sgd(), None, epochs=1, clip=scale)])
    with duckdb.connect(str(run_dir / "snapshot.duckdb"), read_only=True) as con:
        altered = [
            s
            for (s,) in con.execute(
                "SELECT step FROM optimizer_steps WHERE grads_altered ORDER BY step"
            ).fetchall()
        ]
    assert altered == list(range(3, 6))
    with RunStore(run_dir) as store:
        training = load_training(store, pipeline()).training
    with pytest.raises(StageAnalysisError, match=r"at step 3 \(stage 'a'\)"):
        replay_full(training)
    with pytest.raises(StageAnalysisError, match=r"at step 3 \(stage 'a'\)"):
        analyze(run_dir, method="replay", pipeline=pipeline(), progress=False)
    # an estimator still runs, and says it cannot be checked, and why
    with deterministic(1):
        result = analyze(run_dir, method="fast", pipeline=pipeline(), progress=False)
    assert result.params["verified"] is False
    assert "exact replay is refused" in result.params["verified_reason"]
    assert "at step 3 (stage 'a')" in result.params["verified_reason"]
    assert not result.effects.empty


def test_clipping_that_starts_later_in_a_stage_is_refused_at_its_first_step(tmp_path: Path) -> None:
    """The recorder drops its gradient copies after a step that leaves gradients alone, so the first step that
    clips after such steps has no copy to infer the rule from: recorded as rule 'unknown', replay refuses naming it;
    from that step on copies are kept again and the rule is inferred."""

    def clip_from_step_3(model: torch.nn.Module, step: int) -> None:
        if step >= 3:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.3)

    run_dir = tmp_path / "run"
    with deterministic(1):
        record(run_dir, [StageCfg("a", _sgd(), None, epochs=1, clip=clip_from_step_3)])
    with duckdb.connect(str(run_dir / "snapshot.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT step, clip, grads_altered FROM optimizer_steps ORDER BY step").fetchall()
    assert [(s, a) for s, _, a in rows][:4] == [(0, False), (1, False), (2, False), (3, True)]
    assert json.loads(rows[3][1]) == {"rule": "unknown"}
    assert all(json.loads(c) == {"rule": "norm", "max_norm": 0.3, "norm_type": 2.0} and not a for _, c, a in rows[4:])
    with RunStore(run_dir) as store:
        training = load_training(store, pipeline()).training
    with pytest.raises(StageAnalysisError, match=r"at step 3 \(stage 'a'\) after earlier steps of the stage"):
        replay_full(training)


def test_zeroed_gradients_backward_did_not_reach_replay(tmp_path: Path) -> None:
    """A model whose auxiliary head some steps leave out: with zero_grad()'s default the head has no gradient at
    those steps; with zero_grad(set_to_none=False) the optimizer steps on its zeroed gradient (momentum and weight
    decay still move it).  The recorder lists those parameters per step ("zeros") and both runs replay bit for bit
    against the trained model (replay used to refuse the second); AdamW-influence, which does not follow such
    steps, refuses by name."""
    branch = Pipeline(model_factory=BranchMLP, load_inputs=_inputs, head_layer="head", config={})
    x = dataset()[0]
    for set_to_none in (True, False):
        run_dir = tmp_path / f"run_{set_to_none}"
        with deterministic(1):
            trained = record(
                run_dir, [StageCfg("a", _sgd(), None, epochs=2, set_to_none=set_to_none)], model_factory=BranchMLP
            )
            with RunStore(run_dir) as store:
                training = load_training(store, branch).training
            stage = training.stages[0]
            uses_aux = [bool(x[int(ids[0]), 0] > 0) for ids in stage.batches]
            aux = [training.param_names.index(n) for n in ("aux.weight", "aux.bias")]
            first_used = uses_aux.index(True)
            # before the head's first gradient there is nothing to zero; after it, every step that leaves it out
            expected = [
                aux if not used and i > first_used and not set_to_none else [] for i, used in enumerate(uses_aux)
            ]
            assert [stage.zeros(i) for i in range(stage.n_steps)] == expected
            assert any(expected) != set_to_none and not any(stage.altered or [])
            assert training.replay_refusal() is None
            assert same_state(replay_full(training).model, trained.state_dict())
            if not set_to_none:
                with pytest.raises(FgtracError, match=r"stage 'a' stepped on zeroed gradients .* at step \d+ "):
                    check_supported(training)
                z = next(i for i, e in enumerate(expected) if e)
                saved = stage.clips[z]
                stage.clips[z] = None  # as if the zeros were not recorded: the head would not have moved there
                with pytest.raises(ReplayMismatchError, match=rf"first diverges at step {stage.steps[z]} "):
                    replay_full(training)
                stage.clips[z] = saved
                saved_lr, stage.hparams[z][0]["lr"] = stage.hparams[z][0]["lr"], 0.125
                with pytest.raises(ReplayMismatchError) as err:
                    replay_full(training)
                assert "lr 0.125" in str(err.value)
                assert "zero gradients stepped on for aux.weight, aux.bias" in str(err.value), str(err.value)
                stage.hparams[z][0]["lr"] = saved_lr
                _assert_hvp_at_a_step_leaving_out(training, first_unused=uses_aux.index(False, first_used), aux=aux)
                analyze(run_dir, method="propagated", pipeline=branch, progress=False)  # used to raise: unused aux


def test_zeroed_gradients_with_clipping_and_adam_replay(tmp_path: Path) -> None:
    """The same auxiliary head with zero_grad(set_to_none=False), clip_grad_norm_ (which the zeroed gradients
    leave unchanged: their norm is 0) and an Adam stage after SGD: every step that leaves the head out records the
    clipping rule with the zeroed parameters, and the run replays bit for bit against the trained model."""
    branch = Pipeline(model_factory=BranchMLP, load_inputs=_inputs, head_layer="head", config={})
    stages = [
        StageCfg("a", _sgd(), None, epochs=1, clip=_clip_norm, set_to_none=False),
        StageCfg("b", _adam(), None, epochs=1, clip=_clip_norm, set_to_none=False),
    ]
    with deterministic(1):
        trained = record(tmp_path / "run", stages, model_factory=BranchMLP)
        with RunStore(tmp_path / "run") as store:
            training = load_training(store, branch).training
        clips = [c for stage in training.stages for c in stage.clips or []]
        both = [c for c in clips if c and c.get("zeros") and c["rule"] == "norm"]
        assert both and all(c["zeros"] == [4, 5] and c["max_norm"] == 0.3 for c in both)  # aux.weight, aux.bias
        assert training.replay_refusal() is None
        assert same_state(replay_full(training).model, trained.state_dict())


def _assert_hvp_at_a_step_leaving_out(training: Training, first_unused: int, aux: list[int]) -> None:
    """The propagated estimator's Hessian-vector product at a step whose batch skips the auxiliary head equals
    torch.autograd.functional.hvp over the flattened parameters (zero on the head), for one vector and a batch."""
    cursor = Cursor(training, 0, training.stages[0].start_model, None)
    for _ in range(first_unused):
        cursor.step()
    params, names = cursor.params, training.param_names
    x, y = cursor.batch()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, [p.numel() for p in params])
        state = {n: t.reshape(p.shape) for n, t, p in zip(names, parts, params, strict=True)}
        return training.loss_fn(functional_call(cursor.model, state, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    g = torch.Generator().manual_seed(0)
    u = [torch.randn((2, *p.shape), generator=g) for p in params]
    hvp = hvp_at(cursor)
    for got, rows in ((hvp([v[0] for v in u]), [0]), (hvp(u), [0, 1])):
        for r in rows:
            mine = [h if len(rows) == 1 else h[r] for h in got]
            _, ref = torch.autograd.functional.hvp(loss, flat, torch.cat([v[r].reshape(-1) for v in u]))
            assert torch.allclose(torch.cat([h.reshape(-1) for h in mine]), ref, atol=1e-6, rtol=1e-5)
            assert all(not mine[k].any() for k in aux)


def test_a_step_without_its_own_backward_is_refused_by_name(tmp_path: Path) -> None:
    """optimizer.step() twice after one backward: the second steps on the first's gradients, which no backward of
    it produced and which are not zeros; replay refuses naming that step and the parameters."""
    torch.manual_seed(0)
    x, y = dataset()
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = Run.create(tmp_path / "run", name="twice")
    run.register_samples(np.arange(N_TRAIN), split="train", labels=y[:N_TRAIN].numpy(), raw=x[:N_TRAIN].numpy())
    test = np.arange(N_TRAIN, N_TRAIN + 4)
    run.register_samples(test, split="test", labels=y[test].numpy(), raw=x[test].numpy())
    with run.stage("a", optimizer=opt, model=model):
        for k in range(4):
            ids = np.arange(8 * k, 8 * k + 8)
            opt.zero_grad()
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            run.log_batch(ids)
            if k == 2:
                opt.step()  # no backward of its own
                run.log_batch(ids)
    run.close()
    with RunStore(tmp_path / "run") as store:
        training = load_training(store, pipeline()).training
    refusal = training.replay_refusal()
    assert refusal is not None and refusal.startswith(
        "the optimizer stepped on gradients that no backward of the step produced at step 3 (stage 'a') "
        "(body.weight, body.bias, head.weight, head.bias), and not zeros"
    ), refusal


@pytest.mark.parametrize(
    ("loop", "unmodelled"),
    [
        ("amsgrad_and_maximize", "maximize=True, which the estimators do not model"),
        (
            "rmsprop_then_adagrad",
            "RMSprop, which the estimators do not model (they linearise SGD, Adam and AdamW steps)",
        ),
    ],
)
def test_estimators_refuse_what_they_do_not_model_and_replay_runs_it(
    tmp_path: Path, loop: str, unmodelled: str
) -> None:
    """amsgrad and maximize, or another torch.optim optimizer: torch steps them, so exact replay runs (bit for
    bit, above); the estimators linearise plain SGD and Adam descent and refuse by name, pointing at --method
    replay (--compare too: it measures the estimators)."""
    run_dir = tmp_path / "run"
    with deterministic(1):
        record(run_dir, LOOPS[loop])
    for method in ("fast", "propagated", "partial-replay", "compare"):
        how = ["--compare"] if method == "compare" else ["--method", method]
        proc = run_cli("stages", str(run_dir), *how, "--model", MODEL_REF, "--inputs", INPUTS_REF)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"fgtrac: error: stage 'a' uses {unmodelled}; --method replay (exact replay) supports it"
        ]


def test_influence_modes_that_model_the_optimizer_refuse_others_by_name(tmp_path: Path) -> None:
    """adamw (each checkpoint's optimizer preconditioner) weighs an RMSprop then Adagrad run and refuses a NAdam
    one, naming it; adamw_influence (Adam's dynamics) refuses RMSprop; exact (TracIn at every step's own
    parameters, by replay) runs."""
    rmsprop, nadam = tmp_path / "rmsprop", tmp_path / "nadam"
    with deterministic(1):
        record(rmsprop, LOOPS["rmsprop_then_adagrad"])
        record(nadam, LOOPS["nadam_carried_clipped"])
    pipe = ["--model", MODEL_REF, "--inputs", INPUTS_REF, "--head-layer", "head"]
    proc = run_cli("influence", str(rmsprop), *pipe, "--mode", "adamw", "--checkpoints", "all", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["method"] == "tracin/adamw"
    proc = run_cli("influence", str(nadam), *pipe, "--mode", "adamw", "--checkpoints", "all")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.fullmatch(
        r"fgtrac: error: checkpoint \d+ \(stage 'a'\) was trained with NAdam: --mode adamw weighs gradients by "
        r"SGD, Adam, AdamW, RMSprop, Adagrad updates only; use --mode last_layer or full",
        proc.stderr.strip(),
    ), proc.stderr
    proc = run_cli("influence", str(rmsprop), *pipe, "--mode", "adamw_influence")
    assert proc.returncode == 2 and "uses RMSprop; AdamW-influence follows Adam and AdamW steps" in proc.stderr
    proc = run_cli("influence", str(rmsprop), *pipe, "--mode", "exact")
    assert proc.returncode == 0, proc.stdout + proc.stderr


class SignDescent(torch.optim.Optimizer):
    """A loop's own optimizer (not torch.optim's): steps by the sign of the gradient."""

    def __init__(self, params: Any, lr: float = 0.01) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def test_an_optimizer_outside_torch_optim_is_refused_by_name_and_checkpoint_influence_runs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with deterministic(1):
        record(run_dir, [StageCfg("a", _sgd(), None, epochs=1), StageCfg("b", lambda m: SignDescent(m.parameters()), None, epochs=1)])
    refusal = (
        "fgtrac: error: stage 'b' uses SignDescent, which is not one of torch.optim's optimizers: replay rebuilds "
        "each stage's optimizer from torch.optim by its class name (fgtrac influence's checkpoint modes still run)"
    )
    pipe = ["--model", MODEL_REF, "--inputs", INPUTS_REF]
    for args in (["stages", str(run_dir)], ["influence", str(run_dir), "--mode", "exact", "--head-layer", "head"]):
        proc = run_cli(*args, *pipe)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines() == [refusal]
    proc = run_cli("influence", str(run_dir), *pipe, "--head-layer", "head", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["method"] == "tracin/last_layer"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("LBFGS", "steps through a closure that evaluates the loss several times per step"),
        ("SparseAdam", "steps sparse gradients only"),
        ("RMSprop", None),
    ],
)
def test_torch_optimizers_replay_cannot_step_are_named(name: str, why: str | None) -> None:
    from fgtrac_core.stages.training import _unreplayable_optimizer

    reason = _unreplayable_optimizer(name)
    assert reason == (None if why is None else f"{why}: replay runs one backward and one step per recorded batch")


@pytest.mark.parametrize("loop", ["param_groups_own_order", "head_only_finetune", "frozen_body_all_params"])
def test_estimators_and_adamw_influence_follow_an_optimizer_over_other_parameters(tmp_path: Path, loop: str) -> None:
    """A stage whose optimizer held a subset, groups of the loop's own order, or frozen parameters: every
    estimator runs through `stages --compare` and AdamW-influence through `influence` (each parameter with the
    hyperparameters and state of the group its optimizer held it in; one a stage did not step stays put: their
    exactness is tested in test_estimators.py and test_adamw_influence.py); scoring a parameter some stage did
    not step is refused in one line."""
    run_dir = tmp_path / "run"
    with deterministic(1):
        record(run_dir, LOOPS[loop], targets=loop in WITH_TARGETS)
    proc = run_cli("stages", str(run_dir), "--compare", "--json", "--model", MODEL_REF, "--inputs", INPUTS_REF)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    methods = {m["method"].split(":")[0] for m in json.loads(proc.stdout)["faithfulness"]}
    assert {"fast", "propagated", "partial-replay", "replay"} <= methods
    pipe = ["--model", MODEL_REF, "--inputs", INPUTS_REF, "--head-layer", "head"]
    proc = run_cli("influence", str(run_dir), "--mode", "adamw_influence", "--k", "3", *pipe)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if loop != "param_groups_own_order":  # stage b did not step the body
        with RunStore(run_dir) as store:
            training = load_training(store, pipeline()).training
        with pytest.raises(FgtracError, match=re.escape("stage 'b' did not step body.weight (its optimizer")):
            adamw_influence(training, "head", np.arange(N_TRAIN), training.test_set(), params=["body.weight"])


def _replay_refused_with(run_dir: Path, line: str) -> None:
    """`fgtrac stages --method replay` on the run exits 2 with exactly this one-line error."""
    proc = run_cli("stages", str(run_dir), "--method", "replay", "--model", MODEL_REF, "--inputs", INPUTS_REF)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [line]


@pytest.mark.parametrize("change", ["unfreeze", "freeze"])
def test_freezing_or_unfreezing_within_a_stage_is_refused_by_name(tmp_path: Path, change: str) -> None:
    """Replay keeps a parameter's requires_grad for a whole stage (as the stage's start checkpoint records it): a
    body unfrozen (or frozen) halfway through stage 'b' is refused in one line naming the parameters."""

    def toggle(model: torch.nn.Module, step: int) -> None:
        if step == 15:  # stage b runs steps 12..23
            model.body.requires_grad_(change == "unfreeze")

    start = _frozen_body if change == "unfreeze" else _sgd()
    run_dir = tmp_path / "run"
    with deterministic(1):
        record(run_dir, [StageCfg("a", _sgd(), None, epochs=2), StageCfg("b", start, None, epochs=2, clip=toggle)])
    what = (
        "did not require grad at its start but changed during it (unfrozen within the stage)"
        if change == "unfreeze"
        else "required grad at its start but not at its end (frozen within the stage)"
    )
    _replay_refused_with(
        run_dir,
        f"fgtrac: error: stage 'b': body.weight, body.bias {what}; replay freezes a parameter for a whole stage or "
        "not at all, so freeze or unfreeze parameters between stages (a new run.stage), not within one",
    )


def test_a_param_group_added_within_a_stage_is_refused_by_name(tmp_path: Path) -> None:
    """A head-only optimizer that gains the body as a second param group halfway through stage 'b'
    (optimizer.add_param_group, gradual unfreezing): refused in one line naming the first step that stepped it."""
    made: list[torch.optim.Optimizer] = []

    def head_only(m: torch.nn.Module) -> torch.optim.Optimizer:
        made.append(torch.optim.SGD(m.head.parameters(), lr=0.1))
        return made[-1]

    def add_body(model: torch.nn.Module, step: int) -> None:
        if step == 15:
            made[-1].add_param_group({"params": list(model.body.parameters()), "lr": 0.05})

    run_dir = tmp_path / "run"
    with deterministic(1):
        record(run_dir, [StageCfg("a", _sgd(), None), StageCfg("b", head_only, None, clip=add_body)])
    _replay_refused_with(
        run_dir,
        "fgtrac: error: stage 'b': its optimizer stepped 2 param group(s) at step 15 but held 1 at the stage's "
        "start (optimizer.add_param_group within the stage); replay builds a stage's optimizer from its start "
        "checkpoint, so add parameters between stages (a new run.stage), not within one",
    )


def test_a_second_optimizer_in_a_stage_is_refused_by_name(tmp_path: Path) -> None:
    """Stage 'b' is recorded with a head-only optimizer while a second one, which fgtrac never sees, steps the
    body: the body's parameters changed without the stage's optimizer holding them, refused by name."""

    def two_optimizers(m: torch.nn.Module) -> torch.optim.Optimizer:
        body = torch.optim.SGD(m.body.parameters(), lr=0.05)
        bodies.append(body)
        return torch.optim.SGD(m.head.parameters(), lr=0.1)

    bodies: list[torch.optim.Optimizer] = []
    run_dir = tmp_path / "run"
    with deterministic(1):
        record(
            run_dir,
            [
                StageCfg("a", _sgd(), None),
                StageCfg("b", two_optimizers, None, clip=lambda m, step: bodies[-1].step()),
            ],
        )
    _replay_refused_with(
        run_dir,
        "fgtrac: error: stage 'b': body.weight, body.bias changed during the stage, though the stage's optimizer did "
        "not hold them (a second optimizer, or an update outside optimizer.step()); replay steps the stage's "
        "optimizer alone: train with one optimizer per stage (param groups for different rates)",
    )


def test_without_a_stage_a_head_the_loop_replaced_keeps_its_recorded_values(tmp_path: Path) -> None:
    """Stage b trains a new head (re-initialised by the loop after stage a) on the frozen body.  Without stage a,
    the body is the one stage a started from and the head the one the loop put there: written out here with
    plain torch (SGD with the recorded batches and rates), against `replay_without`."""
    run_dir = tmp_path / "run"
    with deterministic(1):
        record(run_dir, LOOPS["new_head_frozen_body"])
    with RunStore(run_dir) as store:
        training = load_training(store, pipeline()).training
    a, b = training.stages
    assert training.replaced(1) == ["head.weight", "head.bias"]
    model = MLP()
    model.load_state_dict({**a.start_model, **{n: b.start_model[n] for n in ("head.weight", "head.bias")}})
    model.body.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x, y = dataset()
    with deterministic(1):
        for ids in b.batches:
            opt.zero_grad()
            F.cross_entropy(model(x[torch.as_tensor(ids)]), y[torch.as_tensor(ids)]).backward()
            opt.step()
        without_a = replay_without(training, 0).model
    assert same_state(without_a, model.state_dict())
    assert not torch.equal(without_a["head.weight"], training.final_model["head.weight"])  # stage a mattered


def test_estimates_of_a_replayable_run_are_marked_as_estimates(tmp_path: Path) -> None:
    """fast on a replayable run: verified false, 'not replayed'; replay: verified true."""
    run_dir = tmp_path / "run"
    with deterministic(1):
        record(run_dir, [StageCfg("a", _sgd(), None, epochs=1), StageCfg("b", _adam(), None, epochs=1)])
        fast = analyze(run_dir, method="fast", pipeline=pipeline(), progress=False)
        exact = analyze(run_dir, method="replay", pipeline=pipeline(), progress=False)
    assert fast.params["verified"] is False and "exact replay was not run" in fast.params["verified_reason"]
    assert exact.params["verified"] is True and exact.params["verified_reason"] is None


def test_changed_lr_is_diagnosed_at_the_first_diverging_step(tmp_path: Path) -> None:
    """An lr edited after the fact in optimizer_steps: the mismatch names that step and its recorded lr."""
    run_dir = tmp_path / "run"
    with deterministic(1):
        record(run_dir, [StageCfg("a", _sgd(), None, epochs=2), StageCfg("b", _adam(), None, epochs=1)])
    edit_step_lr(run_dir, 7, 0.125)
    with RunStore(run_dir) as store, deterministic(1):
        training = load_training(store, pipeline()).training
        bar = _StepCounter()
        with pytest.raises(ReplayMismatchError) as err:
            replay_full(training, bar)
    message = str(err.value)
    assert "first diverges at step 7 (stage 'a')" in message and "lr 0.125" in message, message
    assert "thread count" not in message and "\n" not in message
    assert bar.n == 8 < sum(s.n_steps for s in training.stages)  # stopped right after step 7 (steps 0..7 ran)


class _StepCounter:
    """Stands in for a tqdm bar: counts the replayed steps."""

    n = 0

    def update(self, k: int) -> None:
        self.n += k


def test_stage_trained_on_another_device_is_refused_by_name(tmp_path: Path) -> None:
    """The recorder notes where each stage trained; replay (CPU) refuses a GPU-trained stage before running, and
    estimators run but are marked unverified with that reason."""
    run_dir = tmp_path / "run"
    with deterministic(1):
        record(run_dir, [StageCfg("a", _sgd(), None, epochs=1), StageCfg("b", _adam(), None, epochs=1)])
    with duckdb.connect(str(run_dir / "snapshot.duckdb")) as con:
        hparams = [json.loads(h) for (h,) in con.execute("SELECT hparams FROM stages ORDER BY stage_id").fetchall()]
        assert [h["device"] for h in hparams] == ["cpu", "cpu"]
        hparams[1]["device"] = "cuda:0 (NVIDIA H200)"
        con.execute("UPDATE stages SET hparams = ? WHERE stage_id = 1", [json.dumps(hparams[1])])
    with RunStore(run_dir) as store:
        training = load_training(store, pipeline()).training
    bar = _StepCounter()
    with pytest.raises(StageAnalysisError, match=r"stage 'b' trained on cuda:0 \(NVIDIA H200\); exact replay runs on the CPU"):
        replay_full(training, bar)
    assert bar.n == 0
    with deterministic(1):
        fast = analyze(run_dir, method="fast", pipeline=pipeline(), progress=False)
    assert fast.params["verified"] is False and "trained on cuda:0" in fast.params["verified_reason"]
    info = run_cli("info", str(run_dir), check=True).stdout
    assert "on cuda:0 (NVIDIA H200)" in info and info.count(" on cpu") == 0


def _bn_pipeline():
    from tests.stages._loops import BatchNormMLP

    return Pipeline(model_factory=BatchNormMLP, load_inputs=_inputs, head_layer="head", config={})


def test_batchnorm_replays_and_its_effects_are_taken_in_eval_mode(tmp_path: Path) -> None:
    """BatchNorm's running statistics replay bit for bit when the loop validates in eval mode, and the stage
    effects are test-time values: the last stage's equals f(final) − f(its start) in eval mode, by hand."""
    from tests.stages._loops import BatchNormMLP

    run_dir = tmp_path / "run"
    with deterministic(1):
        record(run_dir, [StageCfg("a", _sgd(), None), StageCfg("b", _adam(), None)], model_factory=BatchNormMLP,
               validate="eval")  # fmt: skip
        res = analyze(run_dir, method="replay", pipeline=_bn_pipeline(), progress=False)
    assert res.params["verified"] is True
    x, y = dataset()
    model = BatchNormMLP().eval()
    with RunStore(run_dir) as store:
        ck = store.checkpoints()
        paths = [ck.loc[(ck["stage"] == "b") & (ck["kind"] == kind), "path"].iloc[0] for kind in ("stage_end", "stage_start")]
    losses = []
    for path in paths:
        model.load_state_dict(torch.load(run_dir / path, weights_only=True)["model"])
        with torch.no_grad():
            losses.append(F.cross_entropy(model(x[N_TRAIN:]), y[N_TRAIN:], reduction="none").double().numpy())
    e = res.effects
    stored = e[(e["stage_id"] == 1) & (e["behaviour"] == "loss")].sort_values("test_id")["value"].to_numpy()
    np.testing.assert_allclose(stored, losses[0] - losses[1], rtol=1e-6, atol=1e-9)


def test_batchnorm_validated_in_train_mode_is_named(tmp_path: Path) -> None:
    """A validation forward in training mode moves the running statistics outside the recorded steps: the
    mismatch says that only buffers differ, and which."""
    from tests.stages._loops import BatchNormMLP

    run_dir = tmp_path / "run"
    with deterministic(1):
        record(run_dir, [StageCfg("a", _sgd(), None)], model_factory=BatchNormMLP, validate="train")
        with pytest.raises(ReplayMismatchError) as err, RunStore(run_dir) as store:
            replay_full(load_training(store, _bn_pipeline()).training)
    message = str(err.value)
    assert "every parameter of stage 'a' replayed bit for bit; only the model's buffers differ (norm.running_mean, norm.running_var, norm.num_batches_tracked)" in message, message
    assert "model.eval()" in message


