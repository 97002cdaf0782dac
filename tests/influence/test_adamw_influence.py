"""AdamW-influence (arXiv 2605.18814) along the replayed trajectory.

(a) It equals the brute-force reference — autograd through the unrolled Adam/AdamW steps with every step's
    loss gradient held at its recorded value (`unrolled_influence`, written out independently of the method's
    tangent recursion) — to 1e-6 relative in float64: weight decay coupled and decoupled, bias correction, ε,
    fresh and carried optimizer state, per-group hyperparameters, a schedule, clipping (norm and value), a
    sample twice in a batch, head-only and all parameters, and per-interval contributions.
(b) Its distance from the full unrolled derivative (curvature included) — the first-order error — is printed.
(c) On SGD-only runs it equals step-exact TracIn; in a mixed run its SGD part is exact's and its Adam part the
    reference's, propagated through the later SGD steps' momentum and decay.
(d) Through `run_influence` on a recorded two-stage run (SGD, then AdamW).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgtrac_core import RunStore
from fgtrac_core.errors import FgtracError
from fgtrac_core.influence.adamw_influence import (
    _group_of,
    adamw_influence,
    adamw_influence_review,
    compare,
    first_order_gap,
    unrolled_influence,
)
from fgtrac_core.influence.exact import exact_pass, exact_review
from fgtrac_core.influence.run_influence import run_influence
from fgtrac_core.stages._records import load_training
from fgtrac_core.stages.replay import deterministic
from fgtrac_core.stages.training import Stage, Training
from fgtrac_core.tracking.optimizer_hooks import optimizer_params
from tests.influence import _tiny

N, N_TRAIN, D_IN, N_CLASSES = 40, 30, 4, 3
ALL = ["body.weight", "body.bias", "head.weight", "head.bias"]
TOL = 1e-6


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(D_IN, 5)
        self.head = nn.Linear(5, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


class Head(nn.Module):
    """Linear 4→3: the head is the whole model."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(D_IN, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


@dataclass
class Spec:
    name: str
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None  # None: carry the previous one
    n_steps: int = 6
    clip: dict[str, Any] | None = None
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    repeat: bool = False  # batches drawn with replacement (a sample can be twice in a batch)
    frozen: tuple[str, ...] = ()  # parameters that do not require grad in this stage
    reset: bool = False  # the loop re-initialises the head before this stage (a new head)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    return x, torch.randint(0, N_CLASSES, (N,), generator=g)


def _clip(params: list[nn.Parameter], clip: dict[str, Any] | None) -> None:
    if clip and clip["rule"] == "norm":
        torch.nn.utils.clip_grad_norm_(params, clip["max_norm"], norm_type=clip["norm_type"])
    elif clip:
        torch.nn.utils.clip_grad_value_(params, clip["clip_value"])


def train(
    make_model: Callable[[], nn.Module], specs: list[Spec], *, batch: int = 8, seed: int = 0
) -> Training:
    """Train `specs` on samples 0..N_TRAIN-1 (float64, cross-entropy, torch's optimizers and clipping) and
    describe it as a `Training` with every step's applied hyperparameters and clipping rule."""
    torch.manual_seed(seed)
    model = make_model().double()
    x, y = _data()
    rng = np.random.default_rng(seed)
    stages, opt, step = [], None, 0
    for j, spec in enumerate(specs):
        if spec.reset:
            model.head.reset_parameters()
        for name, p in model.named_parameters():
            p.requires_grad_(name not in spec.frozen)
        if spec.optimizer is not None:
            opt = spec.optimizer(list(model.parameters()))
        assert opt is not None
        sched = spec.scheduler(opt) if spec.scheduler else None
        start_model, start_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        batches, lrs, hparams = [], [], []
        for _ in range(spec.n_steps):
            b = np.sort(rng.choice(N_TRAIN, size=batch, replace=spec.repeat))
            if spec.repeat:
                b[1] = b[0]  # surely twice
            batches.append(b)
            lrs.append(float(opt.param_groups[0]["lr"]))
            hparams.append([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            _clip([p for g in opt.param_groups for p in g["params"] if p.grad is not None], spec.clip)
            opt.step()
            if sched is not None:
                sched.step()
        stages.append(
            Stage(
                stage_id=j, name=spec.name, optimizer=type(opt).__name__, start_model=start_model,
                start_optimizer=start_opt if spec.optimizer is None else {**start_opt, "state": {}},
                end_model=copy.deepcopy(model.state_dict()), end_optimizer=copy.deepcopy(opt.state_dict()),
                steps=list(range(step, step + spec.n_steps)), lrs=lrs, batches=batches, hparams=hparams,
                clips=[spec.clip] * spec.n_steps, params=optimizer_params(opt, model),
                frozen=list(spec.frozen), frozen_end=list(spec.frozen),
            )
        )  # fmt: skip
        step += spec.n_steps
    return Training(
        stages=stages, model_factory=lambda: make_model().double(), load_batch=lambda ids: (x[ids], y[ids]),
        test_ids=np.arange(N_TRAIN, N),
    )  # fmt: skip


def _test() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _data()
    return x[N_TRAIN:], y[N_TRAIN:]


IDS = np.arange(N_TRAIN)


def adam(lr: float = 0.05, wd: float = 0.03, **kw: Any) -> Callable:
    return lambda p: torch.optim.Adam(p, lr=lr, weight_decay=wd, **kw)


def adamw(lr: float = 0.03, wd: float = 0.1, **kw: Any) -> Callable:
    return lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=wd, **kw)


def two_groups(p: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [{"params": p[:2]}, {"params": p[2:], "lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-3, "weight_decay": 0.3}],
        lr=0.04, weight_decay=0.05,
    )  # fmt: skip


CASES: dict[str, list[Spec]] = {
    "adam-then-adamw": [Spec("adam", adam()), Spec("adamw", adamw())],
    "carried-with-schedule": [
        Spec("a", adamw(betas=(0.7, 0.95)), scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5)),
        Spec("b", None),
    ],
    "groups-large-eps": [Spec("a", two_groups), Spec("b", None, n_steps=4)],
    "clip-norm": [
        Spec("a", adam(), clip={"rule": "norm", "max_norm": 0.3, "norm_type": 2.0}),
        Spec("b", adamw(), clip={"rule": "norm", "max_norm": 0.4, "norm_type": 3.0}),
    ],
    # optimizers over some of the parameters, groups of the loop's own order, a frozen body (the head, scored by
    # default, is stepped by every stage; scoring all parameters is refused, below)
    "head-only-finetune": [
        Spec("a", adam(), clip={"rule": "norm", "max_norm": 0.3, "norm_type": 2.0}),
        Spec(
            "b",
            lambda p: torch.optim.AdamW(p[2:], lr=0.03, weight_decay=0.1),  # the head's weight and bias
            clip={"rule": "norm", "max_norm": 0.2, "norm_type": 2.0},
        ),
    ],
    "own-order-groups": [
        Spec("a", lambda p: torch.optim.AdamW(  # biases without decay first, then the weights at another rate
            [{"params": [p[3], p[1]], "weight_decay": 0.0}, {"params": [p[2], p[0]], "lr": 0.02}],
            lr=0.04, weight_decay=0.1,
        )),  # fmt: skip
        Spec("b", None, n_steps=4),
    ],
    "frozen-body": [
        Spec("a", adamw()),
        Spec("b", adam(), frozen=("body.weight", "body.bias"), clip={"rule": "value", "clip_value": 0.05}),
    ],
    "new-head": [  # the loop re-initialises the head between the stages: no sample's doing, so no influence
        Spec("a", adamw(), n_steps=5),
        Spec("b", adam(), reset=True),
        Spec("c", None, n_steps=4),
    ],
    "clip-value-repeats": [
        Spec("a", adamw(), clip={"rule": "value", "clip_value": 0.05}, repeat=True),
        Spec("b", adam(amsgrad=False), repeat=True),
    ],
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, Training]:
    return request.param, train(MLP, CASES[request.param])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("params", [None, ALL], ids=["head", "all-parameters"])
def test_equals_the_held_gradient_reference(case: tuple[str, Training], params: list[str] | None) -> None:
    name, training = case
    if params == ALL and name in ("head-only-finetune", "frozen-body"):
        with pytest.raises(FgtracError, match="stage 'b' did not step body.weight, body.bias .* which AdamW-"):
            adamw_influence(training, "head", IDS, _test(), params=params)
        return
    if name.startswith("clip"):
        assert _clipped_steps(training), "the clipping cases must clip some steps"
    s = adamw_influence(training, "head", IDS, _test(), params=params)
    want = unrolled_influence(training, IDS, _test(), params=params or ["head.weight", "head.bias"])
    err = _rel(s.scores, want)
    print(f"{name} {'head' if params is None else 'all'}: max relative error {err:.2e}")
    assert err < TOL
    assert s.adam_steps == s.n_steps and s.sgd_steps == 0 and (s.tracin == 0).all()
    used = np.unique(np.concatenate([b for st in training.stages for b in st.batches]))
    unused = np.setdiff1d(IDS, used)
    assert (s.scores[:, unused] == 0).all()  # a sample no step used: exactly 0
    assert (s.scores.abs() <= (s.test_sq * s.train_sq[None]).sqrt() * (1 + 1e-9)).all()  # cosine in [-1, 1]


@pytest.mark.parametrize(
    ("name", "groups"),
    [
        ("own-order-groups", [[1, 0, 1, 0], [1, 0, 1, 0]]),  # body.weight, body.bias, head.weight, head.bias
        ("head-only-finetune", [[0, 0, 0, 0], [None, None, 0, 0]]),
        ("frozen-body", [[0, 0, 0, 0], [None, None, 0, 0]]),
    ],
)
def test_each_parameter_steps_in_the_group_its_optimizer_held_it_in(name: str, groups: list) -> None:
    """The param group every stage stepped each parameter in (None: not stepped), as the cases' optimizers were
    built (independent of the mapping that both the method and its reference read)."""
    training = train(MLP, CASES[name])
    assert [_group_of(training, j, ALL) for j in range(training.n_stages)] == groups


def _clipped_steps(training: Training) -> list[torch.Tensor]:
    """The steps whose recorded clipping was active (norm above max_norm, or a value beyond clip_value)."""
    from fgtrac_core.stages.replay import Cursor

    cursor, out = Cursor(training, 0, training.stages[0].start_model), []
    while not cursor.done:
        stage, i = training.stages[cursor.stage_index], cursor.step_index
        x, y = cursor.batch()
        grads = torch.autograd.grad(F.cross_entropy(cursor.model(x), y), list(cursor.model.parameters()))
        flat = torch.cat([g.reshape(-1) for g in grads])
        clip = stage.clip(i) or {}
        norm = (
            clip.get("rule") == "norm"
            and torch.linalg.vector_norm(flat, clip["norm_type"]) > clip["max_norm"]
        )
        if norm or (clip.get("rule") == "value" and (flat.abs() > clip["clip_value"]).any()):
            out.append(flat)
        cursor.step()
    return out


def test_linear_model_equals_the_reference() -> None:
    training = train(Head, CASES["adam-then-adamw"])
    s = adamw_influence(training, "head", IDS, _test())
    want = unrolled_influence(training, IDS, _test())  # every parameter is the head's
    assert _rel(s.scores, want) < TOL


def test_per_interval_contributions_equal_the_reference() -> None:
    """A run cut into intervals (within and across stages, one uncovered): each stored pair's contribution from
    interval c equals the reference with only interval c's uses weighted; covered ones sum to the score."""
    training = train(MLP, [Spec("a", adam()), Spec("b", adamw()), Spec("c", None, n_steps=4)])
    intervals = [(0, 0, 3), (0, 3, 6), (1, 6, 9), (None, 10, 16)]  # step 9 is in none
    rev = adamw_influence_review(training, "head", IDS, _test(), k=N_TRAIN, intervals=intervals)
    pairs = rev.candidates()
    rows = torch.arange(len(pairs))[:, None].expand_as(pairs)
    raw, cosine, parts = rev.pair_detail(rows, pairs)
    assert (cosine.abs() <= 1 + 1e-9).all()
    total = torch.zeros_like(raw)
    for c, (stage, lo, hi) in enumerate(intervals):

        def only(st: Stage, i: int, stage: Any = stage, lo: int = lo, hi: int = hi) -> bool:
            return (stage is None or st.stage_id == stage) and lo <= st.steps[i] < hi

        want = unrolled_influence(training, IDS, _test(), params=["head.weight", "head.bias"], weighted=only)
        assert _rel(parts[..., c], want[rows, pairs]) < TOL
        total += want[rows, pairs]
    assert _rel(parts.sum(-1), total) < TOL
    step9 = unrolled_influence(
        training, IDS, _test(), params=["head.weight", "head.bias"], weighted=lambda st, i: st.steps[i] == 9
    )
    assert _rel(raw - parts.sum(-1), step9[rows, pairs]) < TOL


def test_first_order_gap_is_reported() -> None:
    """(b) The distance from the full unrolled derivative (curvature included): the first-order error."""
    training = train(MLP, CASES["adam-then-adamw"])
    for params in (None, ALL):
        gap = first_order_gap(training, "head", IDS, _test(), params=params)
        print(
            f"first-order gap ({'head' if params is None else 'all parameters'}): vs held reference "
            f"{gap['held']['max_rel_error']:.1e}; vs full derivative: "
            + ", ".join(f"{k} {v:.3f}" for k, v in gap["full"].items())
        )
        assert gap["held"]["max_rel_error"] < TOL
        assert all(math.isfinite(v) for v in gap["full"].values())


# --------------------------------------------------------------------------------------------- (c) SGD steps


SGD_RUN = [
    Spec("sgd", lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=0.01)),
    Spec("sgd2", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, nesterov=True, dampening=0.0)),
]


def test_sgd_only_equals_exact() -> None:
    training = train(MLP, SGD_RUN)
    s = adamw_influence(training, "head", IDS, _test())
    e = exact_pass(training, "head", IDS, _test())
    np.testing.assert_allclose(s.scores.numpy(), e.scores.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(s.self_influence.numpy(), e.self_influence.numpy(), rtol=1e-10, atol=1e-14)
    assert s.adam_steps == 0 and (s.propagated == 0).all()
    rev = adamw_influence_review(training, "head", IDS, _test(), k=5)
    ex = exact_review(training, "head", IDS, _test(), k=5)
    assert torch.equal(rev.top.proponent_indices, ex.top.proponent_indices)
    assert torch.equal(rev.top_cosine.proponent_indices, ex.top_cosine.proponent_indices)


def test_mixed_run_adam_part_propagates_through_sgd_momentum() -> None:
    """Adam, then SGD with momentum and coupled decay: the Adam uses' part equals the reference with only those
    uses weighted (carried through the SGD steps, held); the SGD uses' part is exact's terms of the SGD steps."""
    training = train(MLP, [Spec("adam", adamw()), *SGD_RUN])
    s = adamw_influence(training, "head", IDS, _test())
    want = unrolled_influence(
        training,
        IDS,
        _test(),
        params=["head.weight", "head.bias"],
        weighted=lambda st, i: st.optimizer != "SGD",
    )
    assert _rel(s.propagated, want) < TOL
    blocks: dict[int, torch.Tensor] = {}
    exact_pass(
        training, "head", IDS, _test(), interval_of_step=lambda stage, step: int(stage > 0),
        on_interval_end=lambda c, b: blocks.__setitem__(c, b.clone()),
    )  # fmt: skip
    np.testing.assert_allclose(s.tracin.numpy(), blocks[1].numpy(), rtol=1e-10, atol=1e-14)
    assert _rel(s.scores, s.propagated + s.tracin) < 1e-15


def test_trajectory_form_of_sgd_steps_equals_the_reference() -> None:
    """sgd_form="trajectory": SGD uses are followed to θ_T too (momentum first step, dampening, Nesterov,
    coupled decay, clipping at their step); the whole score is the held reference with every use weighted."""
    clip = {"rule": "norm", "max_norm": 0.3, "norm_type": 2.0}
    training = train(
        MLP,
        [
            Spec("sgd", lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, dampening=0.3, weight_decay=0.01)),
            Spec("adam", adamw(), clip=clip),
            Spec("nesterov", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, nesterov=True), clip=clip),
            Spec("plain", lambda p: torch.optim.SGD(p, lr=0.1), n_steps=3),
        ],
    )
    for params in (None, ALL):
        s = adamw_influence(training, "head", IDS, _test(), params=params, sgd_form="trajectory")
        want = unrolled_influence(training, IDS, _test(), params=params or ["head.weight", "head.bias"])
        assert _rel(s.scores, want) < TOL and (s.tracin == 0).all()
    with pytest.raises(FgtracError, match="sgd_form"):
        adamw_influence(training, "head", IDS, _test(), sgd_form="tracin")


def test_refuses_what_it_cannot_follow() -> None:
    training = train(MLP, [Spec("a", adam(amsgrad=True), n_steps=2)])
    with pytest.raises(FgtracError, match="amsgrad"):
        adamw_influence(training, "head", IDS, _test())
    training = train(MLP, [Spec("a", lambda p: torch.optim.RMSprop(p, lr=0.01), n_steps=2)])
    with pytest.raises(FgtracError, match="RMSprop"):
        adamw_influence(training, "head", IDS, _test())


# ----------------------------------------------------------------------------------------- (d) a recorded run


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("adamw-influence") / "run"
    _tiny.record(run)
    return run


def test_recorded_run_through_run_influence(recorded: Path) -> None:
    summary = run_influence(
        recorded, mode="adamw_influence", k=_tiny.N_TRAIN, checkpoints="all", model=_tiny.MODEL,
        inputs=_tiny.INPUTS, layer="head",
    )  # fmt: skip
    assert summary.method == "adamw_influence"
    x, y = _tiny.dataset()
    test = (x[_tiny.N_TRAIN :], y[_tiny.N_TRAIN :])
    with RunStore(recorded) as store:
        records = load_training(store, _tiny.pipeline())
        a = store.latest_analysis("influence")
        with deterministic(records.config.get("torch_threads")):
            s = adamw_influence(records.training, "head", np.arange(_tiny.N_TRAIN), test)
            exact = exact_pass(records.training, "head", np.arange(_tiny.N_TRAIN), test)
        held = unrolled_influence(
            records.training, np.arange(_tiny.N_TRAIN), test, params=["head.weight", "head.bias"],
            weighted=lambda st, i: st.optimizer != "SGD",
        )  # fmt: skip
        p = a["params"]
        assert (
            p["propagated_uses"] == s.propagated_uses > 0
            and p["tracin_uses"] == s.uses - s.propagated_uses > 0
        )
        assert p["mode"] == "adamw_influence" and p["steps_replayed"] == 16 and p["uncovered_steps"] == 0
        assert p["adam_steps"] == 8 and p["sgd_steps"] == 8
        only_a, only_b = np.array(_tiny.ONLY_A), np.array(_tiny.ONLY_B)
        # used only at SGD steps: step-exact TracIn; only at AdamW steps: the held reference (float32 replay)
        np.testing.assert_allclose(s.scores[:, only_a].numpy(), exact.scores[:, only_a].numpy(), rtol=1e-5)
        assert _rel(s.scores[:, only_b], held[:, only_b]) < 1e-4
        stages = np.array([c["stage"] for c in a["checkpoints"]])
        for t in range(_tiny.N_TRAIN, _tiny.N_TRAIN + _tiny.N_TEST):
            for view in ("raw", "cosine"):
                table = store.influence_topk(a["analysis_id"], t, view)
                for direction in ("proponent", "opponent"):
                    rows = table[table.direction == direction]
                    parts = np.array([json.loads(c) for c in rows.contributions])
                    assert parts.shape == (_tiny.N_TRAIN, len(a["checkpoints"]))
                    np.testing.assert_allclose(parts.sum(1), rows.score, rtol=1e-9, atol=1e-12)
                    ids = rows.train_id.to_numpy().copy()
                    np.testing.assert_allclose(
                        rows.score, s.scores[t - _tiny.N_TRAIN, ids].numpy(), rtol=1e-9
                    )
                    assert (rows.cosine.abs() <= 1 + 1e-9).all()
                    assert (parts[np.isin(ids, only_b)][:, stages == "a"] == 0).all()
                    assert (parts[np.isin(ids, only_a)][:, stages == "b"] == 0).all()
        si = store.df("SELECT sample_id, value FROM self_influence WHERE analysis_id = ?", [a["analysis_id"]])
        np.testing.assert_allclose(si.sort_values("sample_id").value, s.self_influence.numpy(), rtol=1e-9)


def test_recorded_run_refuses_checkpoint_weighting(recorded: Path) -> None:
    with pytest.raises(FgtracError, match="does not apply"):
        run_influence(
            recorded, mode="adamw_influence", weighting="checkpoint", model=_tiny.MODEL, inputs=_tiny.INPUTS,
            layer="head",
        )  # fmt: skip


def test_compare_figures() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    c = compare(a, a)
    assert c["max_rel_error"] == 0 and c["pearson"] == pytest.approx(1) and c["spearman"] == pytest.approx(1)
    assert compare(-a, a)["spearman"] == pytest.approx(-1)
