"""`fgtrac influence RUN --check K`: the stored LDS equals an independent computation (hand retraining without
each random half, scipy's Spearman), and replaying with nothing removed reproduces the recorded run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from fgtrac_core import RunStore
from fgtrac_core.influence import tracin
from fgtrac_core.influence.check import replay_without
from fgtrac_core.influence.run_influence import run_influence
from fgtrac_core.stages._records import load_training
from fgtrac_core.stages.replay import deterministic
from tests.conftest import run_cli
from tests.influence import _tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("tiny_check") / "run"
    _tiny.record(run)
    return run


def test_replay_without_nothing_is_the_recorded_run(tiny: Path) -> None:
    x, y = _tiny.dataset()
    with RunStore(tiny) as store:
        records = load_training(store, _tiny.pipeline())
        final = store.checkpoints().path.iloc[-1]
    model = _tiny.MLP()
    model.load_state_dict(torch.load(tiny / final, weights_only=True)["model"])
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(x[_tiny.N_TRAIN :]), y[_tiny.N_TRAIN :], reduction="none")
    with deterministic(records.config.get("torch_threads")):
        got = replay_without(
            records.training, np.arange(_tiny.N_TRAIN), np.ones(_tiny.N_TRAIN, bool),
            (x[_tiny.N_TRAIN :], y[_tiny.N_TRAIN :]),
        )  # fmt: skip
    assert np.array_equal(got, want.double().numpy())


def test_replay_without_samples_of_accumulated_steps(tmp_path: Path) -> None:
    """Stage "a" accumulates two micro-batches per step (losses scaled by size): removing samples replays the
    step's mean over the samples kept, as a hand retraining does (micro-batches emptied too)."""
    _tiny.record(tmp_path / "run", accumulate=True)
    x, y = _tiny.dataset()
    with RunStore(tmp_path / "run") as store:
        records = load_training(store, _tiny.pipeline())
    dropped = {0, 1, 2, 3, 5, 8, 13}
    keep = np.array([i not in dropped for i in range(_tiny.N_TRAIN)])
    with deterministic(records.config.get("torch_threads")):
        got = replay_without(
            records.training, np.arange(_tiny.N_TRAIN), keep, (x[_tiny.N_TRAIN :], y[_tiny.N_TRAIN :])
        )
    np.testing.assert_allclose(got, _tiny.hand_losses_without(tmp_path / "run", dropped), rtol=1e-5, atol=1e-7)


def test_check_lds_equals_an_independent_computation(tiny: Path) -> None:
    k, seed = 6, 3
    summary = run_influence(
        tiny, k=3, checkpoints="all", check=k, seed=seed, model=_tiny.MODEL, inputs=_tiny.INPUTS, layer="head",
        weighting="usage",
    )
    with RunStore(tiny) as store:
        a = store.latest_analysis("influence")
        ids = [c["checkpoint_id"] for c in a["checkpoints"]]
        ckpts = [(str(tiny / c["path"]), c["lr"]) for c in a["checkpoints"]]
    stored = a["params"]["check"]
    assert stored == summary.check and stored["replays"] == k
    # independent: the documented subsets, hand retraining, scores from hand-counted usage weights, scipy
    rng = np.random.default_rng(seed)
    keeps = [set(rng.permutation(_tiny.N_TRAIN)[: _tiny.N_TRAIN // 2].tolist()) for _ in range(k)]
    losses = np.stack([_tiny.hand_losses_without(tiny, set(range(_tiny.N_TRAIN)) - keep) for keep in keeps])
    w, _ = _tiny.hand_usage(tiny, ids)
    x, y = _tiny.dataset()
    scores = tracin(
        _tiny.MLP(), "head", (x[: _tiny.N_TRAIN], y[: _tiny.N_TRAIN]), (x[_tiny.N_TRAIN :], y[_tiny.N_TRAIN :]),
        ckpts, sample_weights=w,
    ).double().numpy()  # fmt: skip
    masks = np.array([[i in keep for i in range(_tiny.N_TRAIN)] for keep in keeps], float)
    predicted = masks @ scores.T  # (k, n_test)
    rhos = [spearmanr(predicted[:, t], -losses[:, t])[0] for t in range(_tiny.N_TEST)]
    assert stored["lds"] == pytest.approx(float(np.nanmean(rhos)), abs=1e-6)
    assert stored["test_loss_spread"] == pytest.approx(float(losses.std(0).mean()), rel=1e-4)


def test_check_through_the_cli(tiny: Path) -> None:
    proc = run_cli(
        "influence", str(tiny), "--mode", "exact", "--k", "2", "--check", "3",
        "--model", _tiny.MODEL, "--inputs", _tiny.INPUTS, "--head-layer", "head",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "measured on this run: LDS" in proc.stdout and "(3 replays" in proc.stdout
    proc = run_cli("influence", str(tiny), "--check", "1", "--model", _tiny.MODEL, "--inputs", _tiny.INPUTS)
    assert proc.returncode == 2 and "--check" in proc.stderr
    with RunStore(tiny) as store:
        assert json.loads(store.analyses().params.iloc[-1])["check"]["replays"] == 3


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_check_cost_is_estimated_printed_and_stored(tiny: Path) -> None:
    proc = run_cli(
        "influence", str(tiny), "--k", "2", "--check", "3", "--json",
        "--model", _tiny.MODEL, "--inputs", _tiny.INPUTS, "--head-layer", "head",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"--check 3: estimated [\d.]+ s: 48 replayed steps at [\d.]+ ms", proc.stderr), proc.stderr
    check = json.loads(proc.stdout)["check"]
    assert check["estimated_seconds"] > 0 and check["budget_s"] == 600 and check["force"] is False
    with RunStore(tiny) as store:
        assert json.loads(store.analyses().params.iloc[-1])["check"] == check


def test_check_over_the_budget_is_refused_before_anything_is_written(tiny: Path) -> None:
    before = _files(tiny)
    args = ("--check", "3", "--budget", "1e-9", "--model", _tiny.MODEL, "--inputs", _tiny.INPUTS, "--layer", "head")
    proc = run_cli("influence", str(tiny), *args)
    assert proc.returncode == 2 and proc.stdout == ""
    error = [line for line in proc.stderr.splitlines() if line.startswith("fgtrac:")]
    assert len(error) == 1 and "Traceback" not in proc.stderr
    assert re.fullmatch(
        r"fgtrac: error: --check 3 estimated [\d.]+ s: 48 replayed steps at [\d.]+ ms, over the budget of 1e-09 s; "
        r"raise the budget or force it",
        error[0],
    ), error[0]
    assert _files(tiny) == before
    proc = run_cli("influence", str(tiny), *args, "--force", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["check"]["force"] is True
