"""Gradients at the targets training used: samples trained in stage "b" on other targets than their registered
labels (logged with `targets=`) are scored, at every checkpoint, with the target of their last use before the end
of the steps that checkpoint stands for, checked against a plain loop over the recorded rows and autograd."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fgtrac_core import RunStore
from fgtrac_core.influence.run_influence import run_influence
from fgtrac_core.influence.targets import trained_targets
from tests.influence import _tiny

RELABEL = (18, 19, 12)  # 18, 19 used in both stages (relabelled from "b" on), 12 only in "b"


@pytest.fixture(scope="module")
def relabelled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("relabelled") / "run"
    _tiny.record(run, relabel=RELABEL)
    return run


def _hand_targets(run_dir: Path, bounds: list[int]) -> np.ndarray:
    """(len(bounds), N_TRAIN) targets by a plain loop over every recorded use, the documented rule written out."""
    con = duckdb.connect(str(run_dir / "snapshot.duckdb"), read_only=True)
    try:
        labels = dict(con.execute("SELECT sample_id, label FROM samples").fetchall())
        rows = con.execute(
            """SELECT bs.sample_id, b.step, bs.target FROM batch_samples bs JOIN batches b USING (batch_id)
               ORDER BY b.step, b.batch_id, bs.position"""
        ).fetchall()
    finally:
        con.close()
    uses: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for sample, step, target in rows:
        uses[sample].append((step, labels[sample] if target is None else target))
    out = np.array([[labels[z] for z in range(_tiny.N_TRAIN)] for _ in bounds])
    for z, mine in uses.items():
        if z >= _tiny.N_TRAIN or all(t == labels[z] for _, t in mine):
            continue
        for c, bound in enumerate(bounds):
            before = [t for step, t in mine if step < bound]
            out[c, z] = before[-1] if before else mine[0][1]
    return out


def test_trained_targets_match_a_hand_count(relabelled_run: Path) -> None:
    with RunStore(relabelled_run) as store:
        labels = torch.as_tensor(store.samples("train")["label"].to_numpy(np.int64))
        bounds = [0, 3, 7, 9, 12, 1000, *store.checkpoints()["step"].tolist()]
        got = trained_targets(store, np.arange(_tiny.N_TRAIN), labels, bounds)
        ids = np.array([19, 3, 12, 18, 0])  # any order, any subset
        some = trained_targets(store, ids, labels[ids], bounds)
    hand = _hand_targets(relabelled_run, bounds)
    assert np.array_equal(got.numpy(), hand) and np.array_equal(some.numpy(), hand[:, ids])
    changed = np.flatnonzero((hand != labels.numpy()).any(0))
    assert changed.tolist() == sorted(RELABEL)
    assert (hand[0, [18, 19]] == labels[[18, 19]].numpy()).all()  # trained on their labels in stage "a" first
    assert hand[0, 12] != labels[12]  # before its first use: the target of that use


def test_a_run_without_relabellings_keeps_its_registered_labels(tmp_path: Path) -> None:
    _tiny.record(tmp_path / "run")
    with RunStore(tmp_path / "run") as store:
        labels = torch.as_tensor(store.samples("train")["label"].to_numpy(np.int64))
        assert trained_targets(store, np.arange(_tiny.N_TRAIN), labels, [0, 5]) is labels


def _self_influence(run_dir: Path, checkpoints: list[dict], targets: np.ndarray) -> np.ndarray:
    """Σ_c w_c ‖∇_head ℓ(θ_c, (x_z, targets[c, z]))‖² by autograd, one sample at a time."""
    x = _tiny.dataset()[0][: _tiny.N_TRAIN]
    model = _tiny.MLP()
    out = np.zeros(_tiny.N_TRAIN)
    for c, ck in enumerate(checkpoints):
        model.load_state_dict(torch.load(run_dir / ck["path"], weights_only=True)["model"])
        for z in range(_tiny.N_TRAIN):
            loss = F.cross_entropy(model(x[z : z + 1]), torch.tensor([int(targets[c, z])]))
            grads = torch.autograd.grad(loss, [model.head.weight, model.head.bias])
            out[z] += ck["weight"] * sum(float((g.double() ** 2).sum()) for g in grads)
    return out


def test_self_influence_is_taken_at_the_trained_targets(relabelled_run: Path) -> None:
    res = run_influence(
        relabelled_run, model=_tiny.MODEL, inputs=_tiny.INPUTS, layer="head", checkpoints="all", k=5,
        weighting="checkpoint",
    )  # fmt: skip
    with RunStore(relabelled_run) as store:
        stored = store.df(
            "SELECT sample_id, value FROM self_influence WHERE analysis_id = ? ORDER BY sample_id",
            [res.analysis_id],
        )["value"].to_numpy()
        params = store.analysis(res.analysis_id, "influence")["params"]
        registered = store.samples("train")["label"].to_numpy(np.int64)
    bounds = [max(c["step"], c["interval"]["last_step"] + 1 if c["interval"]["last_step"] is not None else -1)
              for c in res.checkpoints]  # fmt: skip
    expected = _self_influence(relabelled_run, res.checkpoints, _hand_targets(relabelled_run, bounds))
    np.testing.assert_allclose(stored, expected, rtol=1e-5)
    at_labels = _self_influence(relabelled_run, res.checkpoints, np.tile(registered, (len(bounds), 1)))
    moved = np.abs(expected - at_labels) > 1e-3 * expected
    assert np.flatnonzero(moved).tolist() == sorted(RELABEL)  # the registered labels would give other values
    assert params["relabelled_train_samples"] == len(RELABEL)
