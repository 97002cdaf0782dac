"""Step-exact TracIn: equals a hand computation (plain-torch replay, autograd per step) on a 3-step toy and on a
two-stage run (SGD then AdamW); stored through `fgtrac influence --mode exact` with per-interval contributions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fgtrac_core import RunStore
from fgtrac_core.influence.exact import ExactScores, exact_pass
from fgtrac_core.influence.run_influence import run_influence
from fgtrac_core.stages._records import load_training
from fgtrac_core.stages.replay import deterministic
from tests.conftest import run_cli
from tests.influence import _tiny


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("toy") / "run"
    _tiny.record(run, steps_a=3, stages=("a",))
    return run


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("two") / "run"
    _tiny.record(run)
    return run


def _exact(run: Path, bias: bool = True) -> ExactScores:
    x, y = _tiny.dataset()
    with RunStore(run) as store:
        records = load_training(store, _tiny.pipeline())
    with deterministic(records.config.get("torch_threads")):
        s = exact_pass(
            records.training, "head", np.arange(_tiny.N_TRAIN), (x[_tiny.N_TRAIN :], y[_tiny.N_TRAIN :]),
            include_bias=bias,
        )  # fmt: skip
    return s


@pytest.mark.parametrize("bias", [True, False])
def test_three_step_toy_equals_a_hand_computation(toy: Path, bias: bool) -> None:
    with RunStore(toy) as store:
        assert store.df("SELECT count(DISTINCT step) AS n FROM batches")["n"].iloc[0] == 3
    s = _exact(toy, bias)
    assert s.n_steps == 3 and s.uses == 15
    want = _tiny.hand_exact(toy, bias=bias)
    np.testing.assert_allclose(s.scores.numpy(), want.numpy(), rtol=1e-5, atol=1e-10)
    used = (want != 0).any(0)
    assert used.sum() == 15 and (s.scores[:, ~used] == 0).all()  # samples no step used: exactly 0


def test_two_stages_equal_a_hand_computation(two_stages: Path) -> None:
    s = _exact(two_stages)
    want = _tiny.hand_exact(two_stages)
    np.testing.assert_allclose(s.scores.numpy(), want.numpy(), rtol=1e-4, atol=1e-9)


def test_accumulated_steps_equal_a_hand_computation(tmp_path: Path) -> None:
    """Stage "a" logs two micro-batches per step, their losses scaled by size (the step's mean): each sample
    weighs lr / (samples of the step), as in the hand computation over the step's union."""
    _tiny.record(tmp_path / "run", accumulate=True)
    s = _exact(tmp_path / "run")
    want = _tiny.hand_exact(tmp_path / "run")
    np.testing.assert_allclose(s.scores.numpy(), want.numpy(), rtol=1e-4, atol=1e-9)


def test_stored_exact_analysis(two_stages: Path) -> None:
    summary = run_influence(
        two_stages, mode="exact", k=_tiny.N_TRAIN, checkpoints="all", model=_tiny.MODEL, inputs=_tiny.INPUTS,
        layer="head",
    )  # fmt: skip
    assert summary.method == "tracin/exact"
    want = _tiny.hand_exact(two_stages)
    with RunStore(two_stages) as store:
        a = store.latest_analysis("influence")
        assert a["params"]["steps_replayed"] == 16 and a["params"]["uncovered_steps"] == 0
        for t in range(_tiny.N_TRAIN, _tiny.N_TRAIN + _tiny.N_TEST):
            for view in ("raw", "cosine"):
                table = store.influence_topk(a["analysis_id"], t, view)
                pro = table[table.direction == "proponent"]
                parts = np.array([json.loads(p) for p in pro.contributions])
                assert parts.shape == (_tiny.N_TRAIN, len(a["checkpoints"]))
                np.testing.assert_allclose(parts.sum(1), pro.score, rtol=1e-9, atol=1e-12)
                np.testing.assert_allclose(
                    pro.score, want[t - _tiny.N_TRAIN, pro.train_id.to_numpy().copy()].numpy(), rtol=1e-4, atol=1e-9
                )
                assert (pro.cosine.abs() <= 1 + 1e-9).all()
                stages = np.array([c["stage"] for c in a["checkpoints"]])
                only_b = pro.train_id.isin(_tiny.ONLY_B).to_numpy()
                assert (parts[only_b][:, stages == "a"] == 0).all()


def test_exact_through_the_cli_refuses_checkpoint_weighting(two_stages: Path) -> None:
    proc = run_cli(
        "influence", str(two_stages), "--mode", "exact", "--weighting", "checkpoint",
        "--model", _tiny.MODEL, "--inputs", _tiny.INPUTS, "--head-layer", "head",
    )  # fmt: skip
    assert proc.returncode == 2 and "does not apply" in proc.stderr
    proc = run_cli(
        "influence", str(two_stages), "--mode", "exact", "--k", "2", "--json",
        "--model", _tiny.MODEL, "--inputs", _tiny.INPUTS, "--head-layer", "head",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["method"] == "tracin/exact"


def test_full_gradients_equal_a_hand_computation(two_stages: Path) -> None:
    """All parameters (66), projection of dimension ≥ P (orthonormal): the brute-force autograd loop's sums."""
    x, y = _tiny.dataset()
    with RunStore(two_stages) as store:
        records = load_training(store, _tiny.pipeline())
    want = _tiny.hand_exact(two_stages, full=True).numpy()
    for dim in (None, 80):  # the default min(P, 1024) = P, and a wider one
        with deterministic(records.config.get("torch_threads")):
            s = exact_pass(
                records.training, "head", np.arange(_tiny.N_TRAIN), (x[_tiny.N_TRAIN :], y[_tiny.N_TRAIN :]),
                gradients="full", projection_dim=dim,
            )  # fmt: skip
        assert s.projection_dim == (dim or 66)
        assert np.abs(s.scores.numpy() - want).max() <= 1e-6 * np.abs(want).max()
    head = _tiny.hand_exact(two_stages).numpy()
    assert np.abs(head - want).max() > 0.1 * np.abs(want).max()  # the body's gradients matter here


def test_full_gradients_through_the_cli(two_stages: Path) -> None:
    pipeline = ("--model", _tiny.MODEL, "--inputs", _tiny.INPUTS, "--head-layer", "head")
    proc = run_cli("influence", str(two_stages), "--gradients", "full", *pipeline)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "applies to --mode exact" in proc.stderr
    proc = run_cli(
        "influence", str(two_stages), "--mode", "exact", "--gradients", "full", "--k", "3", "--checkpoints", "all",
        "--json", *pipeline,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    want = _tiny.hand_exact(two_stages, full=True).numpy()
    with RunStore(two_stages) as store:
        a = store.latest_analysis("influence")
        assert a["params"]["gradients"] == "full" and a["params"]["projection_dim"] == 66
        table = store.influence_topk(a["analysis_id"], _tiny.N_TRAIN, "raw")
    assert a["analysis_id"] == json.loads(proc.stdout)["analysis_id"]
    got = table.score.to_numpy()
    ref = want[0, table.train_id.to_numpy().copy()]
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(want).max()
    parts = np.array([json.loads(c) for c in table.contributions])
    np.testing.assert_allclose(parts.sum(1), got, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["exact", "adamw_influence"])
def test_modes_that_replay_never_score_off_the_recorded_trajectory(tmp_path: Path, mode: str) -> None:
    """A recorded fact edited after the fact (step 3's lr): the replaying modes stop at that step with the
    diagnosis instead of storing scores from a trajectory the run never took; a run replay refuses outright (the
    loop scaled its gradients by hand) is refused before anything runs, naming the modes that still work."""
    import duckdb

    from fgtrac_core.stages.errors import ReplayMismatchError, StageAnalysisError

    run = tmp_path / "run"
    _tiny.record(run)
    with duckdb.connect(str(run / "snapshot.duckdb")) as con:
        (hp,) = con.execute("SELECT hparams FROM optimizer_steps WHERE step = 3").fetchone()
        groups = json.loads(hp)
        groups[0]["lr"] = 0.5
        con.execute("UPDATE optimizer_steps SET hparams = ? WHERE step = 3", [json.dumps(groups)])
        con.execute("UPDATE batches SET lr = 0.5 WHERE step = 3")
    args = {"model": _tiny.MODEL, "inputs": _tiny.INPUTS, "layer": "head", "mode": mode, "k": 3}
    with pytest.raises(ReplayMismatchError, match=r"first diverges at step 3 \(stage 'a'\).* lr 0\.5"):
        run_influence(run, **args)
    with duckdb.connect(str(run / "snapshot.duckdb")) as con:
        assert con.execute("SELECT count(*) FROM analyses").fetchone()[0] == 0
        con.execute("UPDATE optimizer_steps SET grads_altered = true WHERE step = 5")
    with pytest.raises(StageAnalysisError, match="altered the gradients .* at step 5 .*checkpoint modes still run"):
        run_influence(run, **args)


def _per_param_grads(model, x, y, names):
    """{name: (n, numel)} per-sample gradients by one autograd call per sample (zeros for a frozen parameter:
    the reference weighs it by a rate of 0 anyway)."""
    params = dict(model.named_parameters())
    live = [n for n in names if params[n].requires_grad]
    rows = {n: [] for n in live}
    for k in range(len(x)):
        loss = torch.nn.functional.cross_entropy(model(x[k : k + 1]), y[k : k + 1])
        for n, g in zip(live, torch.autograd.grad(loss, [params[n] for n in live]), strict=True):
            rows[n].append(g.reshape(-1).double())
    zero = {n: torch.zeros(len(x), params[n].numel(), dtype=torch.float64) for n in names if n not in rows}
    return {**{n: torch.stack(r) for n, r in rows.items()}, **zero}


def test_each_parameter_weighs_the_rate_of_its_own_group(tmp_path: Path) -> None:
    """Stage a trains the body at lr 0.01 and the head at 0.1, its bias at 0.05 (groups of the loop's own order:
    the body's first); stage b freezes the body and trains the head with AdamW.  The reference is summed inside
    the training loop itself, from the live optimizer's groups: Σ_p η_p ∇_p ℓ(test)·∇_p ℓ(z) / |B| at every step
    before it is taken (η_p = 0 for a parameter the step does not move), for the head and for all parameters."""
    from tests.stages._loops import MLP, N_TRAIN, create_run, dataset
    from tests.stages._loops import pipeline as loops_pipeline

    torch.manual_seed(0)
    x, y = dataset()
    model = MLP()
    run = create_run(tmp_path / "run", "rates")
    test = (x[N_TRAIN:], y[N_TRAIN:])
    head, every = ["head.weight", "head.bias"], [n for n, _ in model.named_parameters()]
    want = {"head": torch.zeros(len(test[0]), N_TRAIN, dtype=torch.float64), "all": None}
    want["all"] = want["head"].clone()
    first = want["head"].clone()  # the head's terms at the first group's rate: what the test must tell apart
    stages = [
        ("a", lambda: torch.optim.SGD(
            [{"params": model.body.parameters(), "lr": 0.01}, {"params": [model.head.weight], "lr": 0.1},
             {"params": [model.head.bias], "lr": 0.05}], lr=0.1, momentum=0.9,
        )),
        ("b", lambda: (model.body.requires_grad_(False), torch.optim.AdamW(model.head.parameters(), lr=0.02))[1]),
    ]  # fmt: skip
    g = torch.Generator().manual_seed(3)
    for name, make in stages:
        opt = make()
        with run.stage(name, optimizer=opt, model=model):
            for _ in range(2):
                for ids in torch.randperm(N_TRAIN, generator=g).split(8):
                    rate = {n: 0.0 for n in every}
                    held = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
                    for group in opt.param_groups:
                        for p in group["params"]:
                            if id(p) in held:
                                rate[held[id(p)]] = group["lr"]
                    g_te, g_b = _per_param_grads(model, *test, every), _per_param_grads(model, x[ids], y[ids], every)
                    for key, names in (("head", head), ("all", every)):
                        dots = sum(rate[n] * g_te[n] @ g_b[n].T for n in names) / len(ids)
                        want[key][:, ids] += dots
                    first[:, ids] += opt.param_groups[0]["lr"] * sum(g_te[n] @ g_b[n].T for n in head) / len(ids)
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
                    opt.step()
                    run.log_batch(ids)
    run.close()
    with RunStore(tmp_path / "run") as store:
        training = load_training(store, loops_pipeline()).training
    for key, options in (("head", {}), ("all", {"gradients": "full"})):
        with deterministic(1):
            s = exact_pass(training, "head", np.arange(N_TRAIN), test, **options)
        got, ref = s.scores.numpy(), want[key].numpy()
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), key
    ref = want["head"].numpy()
    assert np.abs(first.numpy() - ref).max() > 0.5 * np.abs(ref).max()  # the rates matter here
