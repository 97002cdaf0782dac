"""Smoke test of the mislabel-detection and faithfulness benchmarks in quick mode: every figure is produced, finite
and JSON-able, and the markdown sections render.  No thresholds on quality (those are what the benchmark
measures); the only hard checks are the harness's own invariants (ranges, exact replay of the reference run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from bench import faithfulness, mislabel, peers_dattri


def test_mean_spearman_matches_scipy_per_column() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    b[:, 0] = a[:, 0] ** 3  # a monotone column: rho = 1
    expected = np.mean([spearmanr(a[:, j], b[:, j]).statistic for j in range(4)])
    assert faithfulness.mean_spearman(a, b) == pytest.approx(expected)


def test_detection_figures_on_a_known_ranking() -> None:
    flipped = np.zeros(100, dtype=bool)
    flipped[:10] = True
    score = -np.arange(100.0)  # samples 0..9 score highest: a perfect ranking
    figs = mislabel.detection_figures(flipped, score)
    assert figs == {"auc": 1.0, "recall_5": 0.5, "recall_10": 1.0, "recall_20": 1.0}


def test_mislabel_quick_produces_every_figure() -> None:
    r = mislabel.measure(quick=True)
    json.dumps(r, allow_nan=False)  # JSON-able and every number finite
    for kind in mislabel.NOISE_KINDS:
        methods = r["noise"][kind]["methods"]
        assert list(methods) == list(mislabel.METHODS)
        for key, m in methods.items():
            assert "unavailable" not in m, (kind, key, m)
            for name in ("auc", "recall_5", "recall_10", "recall_20"):
                assert 0.0 <= m[name] <= 1.0, (kind, key, name, m[name])
        assert set(r["noise"][kind]["goal_recall10_vs_cleanlab"]) == {
            "self_influence_sgd",
            "self_influence_adamw",
        }
    text = mislabel.summarise(r)
    assert text.startswith("## Mislabel detection") and "not available" not in text


def test_faithfulness_quick_produces_every_figure() -> None:
    r = faithfulness.measure(quick=True)
    json.dumps(r, allow_nan=False)
    assert [s.name for s in faithfulness.SETTINGS] == list(r["settings"])
    for name, e in r["settings"].items():
        # the batched retraining replays the reference run that wrote the checkpoints
        assert e["replay_error"] < 1e-9, name
        assert e["mean_abs_loo_change"] > 0, name
        for key, m in e["methods"].items():
            assert "unavailable" not in m, (name, key, m)
            assert -1.0 <= m["loo_spearman"] <= 1.0 and -1.0 <= m["lds"] <= 1.0, (name, key, m)
        if e["optimizer"] == "adamw":  # the goal: AdamW-influence (along the replayed recording) vs SGD form
            assert faithfulness._GOAL in e["comparisons"], name
            assert "adamw_influence" in e["methods"], name
        # dattri's rows (the bench-only extra) are there exactly when dattri is installed
        peers = {k for k, m in e["methods"].items() if m["by"] == "dattri"}
        assert peers == (set(peers_dattri.METHODS) if r["dattri_version"] else set()), name
        assert (e["lds_vs_dattri"] is not None) == bool(r["dattri_version"]), name
    text = faithfulness.summarise(r)
    assert text.startswith("## Influence faithfulness") and "not available" not in text
    assert (peers_dattri.MISSING in text) == (r["dattri_version"] is None)


def test_influence_scale_quick_reports_time_and_memory() -> None:
    from bench import influence_scale

    r = influence_scale.measure(quick=True)
    assert r["n_train"] == 6_000 and r["seconds"] > 0 and r["peak_rss_gib"] > 0
    assert "peak RSS" in influence_scale.report(r)


def test_usage_and_step_exact_weights_against_a_hand_computation() -> None:
    """The bench's usage-aware and step-exact forms: weights counted from the batch order by hand, and step-exact
    scores equal to Σ_t η/|B_t| Σ_{z ∈ B_t} ∇ℓ(test, θ_t)·∇ℓ(z, θ_t) by autograd at every step's own parameters."""
    import torch
    import torch.nn.functional as F

    train, test = faithfulness._data()
    train, test = (train[0][:40], train[1][:40]), (test[0][:6], test[1][:6])
    setting = faithfulness.Setting("logreg", "sgd", 0.5, batch_size=16, checkpoint_every=4)
    steps = faithfulness.batches(setting, 40)
    assert {len(b) for b in steps} == {16, 8}  # 40 = 16 + 16 + 8: batch sizes differ, so weights differ
    w = faithfulness.usage_matrix(setting, 40, [range(0, 4), range(4, 8)])
    for z in range(40):
        for c, span in enumerate([range(0, 4), range(4, 8)]):
            hand = sum(0.5 / len(steps[t]) for t in span for i in steps[t].tolist() if i == z)
            assert w[z, c] == pytest.approx(hand)
    model, _, trajectory = faithfulness.train_reference(setting, train)
    assert len(trajectory.before) == faithfulness.STEPS
    got = faithfulness._scores(
        model, train, test, setting, trajectory, {"mode": "last_layer", "weighting": "step"}, Path("unused")
    )
    assert isinstance(got, np.ndarray)

    def grads(state: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = faithfulness.LogReg().double()
        m.load_state_dict(state)
        rows = []
        for xi, yi in zip(x, y, strict=True):
            g = torch.autograd.grad(F.cross_entropy(m(xi[None]), yi[None]), list(m.parameters()))
            rows.append(torch.cat([t.flatten() for t in g]))
        return torch.stack(rows)

    expected = np.zeros((6, 40))
    for t, (state, lr) in enumerate(trajectory.before):
        g_test, g_train = grads(state["model"], *test), grads(state["model"], *train)
        idx = steps[t].numpy()
        np.add.at(expected.T, idx, (lr / len(idx)) * (g_train[idx] @ g_test.T).numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_run_faithfulness_quick_judges_forms_by_replays_of_the_sample_run() -> None:
    from bench import run_faithfulness

    r = run_faithfulness.measure(quick=True)
    json.dumps(r, allow_nan=False)
    assert list(r["forms"]) == [f"{m}/{w}" for m, w in run_faithfulness.FORMS[:2]]
    for name, e in r["forms"].items():
        assert "unavailable" not in e, (name, e)
        assert -1.0 <= e["lds"] <= 1.0 and e["check_seconds"] > 0, (name, e)
        assert e["misclassified"] == len(e["removal_effect"]) == len(e["random_removal_effect"]) >= 1, (name, e)
        # a replay without samples really trained on less: some removal moved a test loss
        assert any(abs(d) > 0 for d in e["removal_effect"] + e["random_removal_effect"]), (name, e)
    text = run_faithfulness.summarise(r)
    assert text.startswith("## Influence faithfulness on the sample run") and "not available" not in text
