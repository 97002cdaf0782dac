"""Usage-aware TracInCP: weights equal a hand count of uses from the recorded rows, a sample never used in a stage
gets exactly 0 from that stage's checkpoints, and scores equal a brute-force autograd computation."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fgtrac_core import RunStore
from fgtrac_core.influence import tracin
from fgtrac_core.influence.adamw import momentum_factor
from fgtrac_core.influence.run_influence import run_influence
from fgtrac_core.influence.weighting import checkpoint_intervals, usage_weights
from tests.conftest import run_cli
from tests.influence import _tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("tiny") / "run"
    _tiny.record(run)
    return run


@pytest.fixture(scope="module")
def tiny_accumulated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("tiny_acc") / "run"
    _tiny.record(run, accumulate=True)
    return run


def _load(run: Path, path: str) -> dict:
    return torch.load(io.BytesIO((run / path).read_bytes()), weights_only=True)


def test_intervals_split_each_stage_among_its_checkpoints() -> None:
    lo, hi = -(1 << 62), 1 << 62
    assert checkpoint_intervals([2, 6, 12, 16], [0, 0, 1, 1]) == [(0, lo, 2), (0, 2, hi), (1, lo, 12), (1, 12, hi)]
    assert checkpoint_intervals([4, 9], [None, 1]) == [(None, lo, 4), (None, 4, hi)]  # a stage-less checkpoint


@pytest.mark.parametrize("accumulated", [False, True])
@pytest.mark.parametrize("ids", [[1, 3, 8], [0, 1, 2, 4, 7, 8, 9, 10]])
def test_usage_weights_equal_a_hand_count(
    tiny: Path, tiny_accumulated: Path, accumulated: bool, ids: list[int]
) -> None:
    run = tiny_accumulated if accumulated else tiny
    with RunStore(run) as store:
        ids = [i for i in ids if i in set(store.checkpoints().checkpoint_id)]
        train = store.samples("train").sample_id.to_numpy()[::-1].copy()  # rows in any order
        got = usage_weights(store, train, ids)
    want, uses = _tiny.hand_usage(run, ids)
    np.testing.assert_allclose(got.matrix.numpy(), want[train], rtol=1e-13, atol=0)
    assert (got.uses == uses[train]).all() and uses.sum() > 0
    assert got.uncovered_steps == 0
    assert sum(iv["n_uses"] for iv in got.intervals) == uses.sum()
    if accumulated:  # |B_t| counts both micro-batches of a step: a stage-"a" use weighs lr / 8, not lr / 5
        with RunStore(run) as store:
            b = store.batches()
        first = b[b.step == 0]
        assert len(first) == 2 and first.n_samples.sum() == 8


def test_unused_in_a_stage_gets_zero_from_its_checkpoints(tiny: Path) -> None:
    summary = run_influence(
        tiny, k=_tiny.N_TRAIN, checkpoints="all", model=_tiny.MODEL, inputs=_tiny.INPUTS, layer="head",
        weighting="usage",
    )
    assert summary.weighting == "usage"
    with RunStore(tiny) as store:
        a = store.latest_analysis("influence")
        assert a["params"]["weighting"] == "usage" and a["params"]["uncovered_steps"] == 0
        stages = [c["stage"] for c in a["checkpoints"]]
        w = usage_weights(store, np.arange(_tiny.N_TRAIN), [c["checkpoint_id"] for c in a["checkpoints"]]).matrix
        rows = [store.influence_topk(a["analysis_id"], t) for t in range(_tiny.N_TRAIN, _tiny.N_TRAIN + _tiny.N_TEST)]
    in_a = np.array([s == "a" for s in stages])
    assert in_a.any() and (~in_a).any()
    assert (w[_tiny.ONLY_B][:, in_a] == 0).all() and (w[_tiny.ONLY_A][:, ~in_a] == 0).all()
    assert (w[_tiny.BOTH][:, in_a].sum(1) > 0).all() and (w[_tiny.BOTH][:, ~in_a].sum(1) > 0).all()
    for table in rows:
        pro = table[table.direction == "proponent"]
        assert len(pro) == _tiny.N_TRAIN
        for train_id, parts in zip(pro.train_id, pro.contributions, strict=True):
            parts = np.array(json.loads(parts))
            if train_id in _tiny.ONLY_B:
                assert (parts[in_a] == 0.0).all() and (parts[~in_a] != 0).any()
            if train_id in _tiny.ONLY_A:
                assert (parts[~in_a] == 0.0).all() and (parts[in_a] != 0).any()
        assert np.allclose([sum(json.loads(p)) for p in pro.contributions], pro.score, rtol=1e-6, atol=1e-12)


def test_stored_scores_equal_brute_force_autograd(tiny: Path) -> None:
    """last_layer, usage weighting: score(t, z) = Σ_c W[z, c] ∇_head ℓ(t, θ_c)·∇_head ℓ(z, θ_c), W by hand, the
    gradients by autograd; also every stored contribution, the self-influence and the cosine."""
    run_influence(
        tiny, k=_tiny.N_TRAIN, checkpoints="all", model=_tiny.MODEL, inputs=_tiny.INPUTS, layer="head",
        weighting="usage",
    )
    with RunStore(tiny) as store:
        a = store.latest_analysis("influence")
        stored = {t: store.influence_topk(a["analysis_id"], t) for t in range(_tiny.N_TRAIN, _tiny.N_TRAIN + 6)}
        cosine = store.influence_topk(a["analysis_id"], _tiny.N_TRAIN + 2, "cosine")
        si = store.self_influence(a["analysis_id"]).set_index("sample_id")["value"]
    ids = [c["checkpoint_id"] for c in a["checkpoints"]]
    w, _ = _tiny.hand_usage(tiny, ids)
    x, y = _tiny.dataset()
    model = _tiny.MLP()
    head = ["head.weight", "head.bias"]
    n = _tiny.N_TRAIN + _tiny.N_TEST
    grads = []  # per checkpoint: (n, P) head gradients of every sample
    for c in a["checkpoints"]:
        model.load_state_dict(_load(tiny, c["path"])["model"])
        grads.append(torch.stack([_tiny.grad_vector(model, x[i], y[i], head) for i in range(n)]))
    parts = torch.stack([g[_tiny.N_TRAIN :] @ g[: _tiny.N_TRAIN].T * torch.as_tensor(w[:, c]) for c, g in enumerate(grads)], -1)
    score = parts.sum(-1)  # (n_test, n_train)
    self_inf = sum(torch.as_tensor(w[:, c]) * (g[: _tiny.N_TRAIN] ** 2).sum(1) for c, g in enumerate(grads))
    for t, table in stored.items():
        pro = table[table.direction == "proponent"]
        row = t - _tiny.N_TRAIN
        np.testing.assert_allclose(pro.score, score[row, pro.train_id.to_numpy().copy()].numpy(), rtol=1e-5, atol=1e-9)
        got = np.array([json.loads(p) for p in pro.contributions])
        np.testing.assert_allclose(got, parts[row, pro.train_id.to_numpy().copy()].numpy(), rtol=1e-5, atol=1e-9)
        assert list(pro.train_id) == score[row].argsort(descending=True).tolist()
    np.testing.assert_allclose(si.loc[np.arange(_tiny.N_TRAIN)].to_numpy(), self_inf.numpy(), rtol=1e-5, atol=1e-12)
    # cosine: divided by √(Σ_c W_zc ‖g_t,c‖² · Σ_c W_zc ‖g_z,c‖²), the pair's own weights
    row = 2
    test_sq = sum(torch.as_tensor(w[:, c]) * (g[_tiny.N_TRAIN + row] ** 2).sum() for c, g in enumerate(grads))
    want = score[row] / (test_sq * self_inf).sqrt()
    pro = cosine[cosine.direction == "proponent"]
    np.testing.assert_allclose(pro.cosine, want[pro.train_id.to_numpy().copy()].numpy(), rtol=1e-5, atol=1e-9)
    assert (want.abs() <= 1 + 1e-9).all()


@pytest.mark.parametrize("mode", ["full", "adamw"])
def test_full_and_adamw_modes_equal_brute_force(tiny: Path, mode: str) -> None:
    """full (every parameter, projection dimension ≥ P: exact) and adamw (the Adam checkpoints' gradients
    preconditioned by the recorded second moment, times κ) under usage weights, against autograd."""
    with RunStore(tiny) as store:
        ck = store.checkpoints().drop_duplicates("step")
    ck = ck[ck.kind == "periodic"]
    ids = ck.checkpoint_id.tolist()
    w, _ = _tiny.hand_usage(tiny, ids)
    x, y = _tiny.dataset()
    tr, te = (x[: _tiny.N_TRAIN], y[: _tiny.N_TRAIN]), (x[_tiny.N_TRAIN :], y[_tiny.N_TRAIN :])
    ckpts = [(str(tiny / p), lr) for p, lr in zip(ck.path, ck.lr, strict=True)]
    model = _tiny.MLP()
    n_params = sum(p.numel() for p in model.parameters())
    names = None if mode == "full" else ["head.weight", "head.bias"]
    got = tracin(model, "head", tr, te, ckpts, mode=mode, projection_dim=n_params, sample_weights=w)
    want = torch.zeros(_tiny.N_TEST, _tiny.N_TRAIN, dtype=torch.float64)
    for c, (path, lr) in enumerate(zip(ck.path, ck.lr, strict=True)):
        state = _load(tiny, path)
        model.load_state_dict(state["model"])
        g = torch.stack([_tiny.grad_vector(model, x[i], y[i], names) for i in range(len(x))])
        kappa, precond = 1.0, torch.ones(g.shape[1], dtype=torch.float64)
        opt = state["optimizer"]
        if mode == "adamw" and any("exp_avg_sq" in s for s in opt["state"].values()):
            group = opt["param_groups"][0]
            parts = []
            for i, (name, _) in enumerate(model.named_parameters()):
                if name in names:  # type: ignore[operator]
                    s = opt["state"][i]
                    t = int(float(s["step"]))
                    v_hat = s["exp_avg_sq"].double() / (1 - group["betas"][1] ** t)
                    parts.append((1 / (v_hat.sqrt() + group["eps"])).reshape(-1))
            precond = torch.cat(parts)
            kappa = momentum_factor(group["betas"][0], t, lr, group["weight_decay"])
        dots = (g[_tiny.N_TRAIN :] * precond) @ g[: _tiny.N_TRAIN].T
        want += kappa * dots * torch.as_tensor(w[:, c])
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=2e-4, atol=1e-7)
    assert (got[:, _tiny.ONLY_A].abs().sum() > 0) and (got[:, _tiny.ONLY_B].abs().sum() > 0)


def test_checkpoint_weighting_is_the_default_and_still_shows_the_uses(tiny: Path) -> None:
    """Checkpoint weighting (the default) scores with one lr per checkpoint, and a run with batch records still
    stores every checkpoint's interval, so the uses behind each term can be shown; usage weighting on request."""
    proc = run_cli(
        "influence", str(tiny), "--checkpoints", "all", "--k", "3", "--json",
        "--model", _tiny.MODEL, "--inputs", _tiny.INPUTS, "--head-layer", "head",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["weighting"] == "checkpoint" and all(c["weight"] == c["lr"] for c in out["checkpoints"])
    with RunStore(tiny) as store:
        a = store.latest_analysis("influence")
        w = usage_weights(store, np.arange(_tiny.N_TRAIN), [c["checkpoint_id"] for c in a["checkpoints"]])
    assert a["params"]["weighting"] == "checkpoint"
    assert [c["interval"] for c in a["checkpoints"]] == w.intervals
    proc = run_cli(
        "influence", str(tiny), "--weighting", "usage", "--checkpoints", "all", "--k", "3",
        "--model", _tiny.MODEL, "--inputs", _tiny.INPUTS, "--head-layer", "head",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "(usage weighting)" in proc.stdout and "uses)" in proc.stdout


def test_bad_sample_weights_are_refused(tiny: Path) -> None:
    x, y = _tiny.dataset()
    with RunStore(tiny) as store:
        path = store.checkpoints().path.iloc[1]
    with pytest.raises(Exception, match="sample_weights must be"):
        tracin(_tiny.MLP(), "head", (x[:4], y[:4]), (x[4:6], y[4:6]), [(str(tiny / path), 0.1)], sample_weights=np.ones((3, 1)))
