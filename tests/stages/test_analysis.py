"""`analyze` on recorded runs: the sample run and tiny runs recorded here through `fgtrac_core.tracking.Run`."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fgtrac_core.errors import FgtracError
from fgtrac_core.pipeline import load_pipeline
from fgtrac_core.stages import (
    COMPARE_HORIZONS,
    BudgetExceededError,
    MissingBoundaryStateError,
    ReplayMismatchError,
    StageAnalysisError,
    analyze,
)
from fgtrac_core.stages._records import load_training
from fgtrac_core.stages.replay import deterministic, replay_full
from fgtrac_core.store.reader import RunStore
from fgtrac_core.store.schema import create_schema
from tests.stages._toy import MLP, StageSpec, cosine, data, record_run

N_TRAIN = 40
STAGES = [
    StageSpec("pretrain", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4), 12, cosine),
    StageSpec("finetune", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01), 8),
    StageSpec("adapt", lambda p: torch.optim.SGD(p, lr=0.05), 4),
]


def _columns(table: str) -> list[str]:
    con = duckdb.connect()
    create_schema(con)
    cols = [r[1] for r in con.execute(f"PRAGMA table_info('{table}')").fetchall()]
    return [c for c in cols if c not in ("row_id", "analysis_id")]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):
    x, y = data()
    run_dir = tmp_path_factory.mktemp("toy") / "run"
    return run_dir, record_run(run_dir, MLP, STAGES, x, y, n_train=N_TRAIN)


@pytest.fixture(scope="module")
def toy_compare(toy):
    run_dir, pipeline = toy
    return analyze(run_dir, compare=True, behaviours=("loss", "margin"), pipeline=pipeline, progress=False)


def _last_stage_exact(run_dir: Path, pipeline) -> np.ndarray:
    """f(theta_T) - f(theta at the last stage's start), straight from the recorded checkpoints."""
    with RunStore(run_dir) as store:
        training = load_training(store, pipeline).training
    x, y = training.test_set()
    model = training.model_factory()
    losses = []
    for state in (training.final_model, training.stages[-1].start_model):
        model.load_state_dict(state)
        with torch.no_grad():
            losses.append(F.cross_entropy(model(x), y, reduction="none").double().numpy())
    return losses[0] - losses[1]


def test_tables_have_the_ledger_columns(toy_compare) -> None:
    assert list(toy_compare.effects.columns) == _columns("stage_effects")
    assert list(toy_compare.aggregates.columns) == _columns("stage_aggregates")
    assert list(toy_compare.faithfulness.columns) == _columns("stage_faithfulness")
    assert toy_compare.params["replay_verified"] and len(toy_compare.checkpoint_ids) == 6


def test_compare_covers_every_method_and_horizon(toy_compare) -> None:
    f = toy_compare.faithfulness
    partial = {f"partial-replay:{h}" for h in COMPARE_HORIZONS}
    methods = {"replay", "fast", "fast:linear", "propagated", "propagated:linear"} | partial
    assert (
        set(f["method"])
        == methods
        == set(toy_compare.effects["method"])
        == set(toy_compare.aggregates["method"])
    )
    assert sorted(f.loc[f["method"].isin(partial), "horizon"].unique()) == list(COMPARE_HORIZONS)
    replay = f[f["method"] == "replay"]
    assert np.allclose(replay["pearson"], 1) and (replay["confidence"] == 1).all()
    # a horizon covering every later step (12 >= 8 + 4) is exact replay
    exact = f[(f["method"] == "partial-replay:20") & f["stage_id"].isna()]
    assert exact["pearson"].iloc[0] == pytest.approx(1.0, abs=1e-9)
    assert (f["reference_seconds"] == replay["seconds"].iloc[0]).all()


def test_last_stage_is_exact_in_every_method(toy, toy_compare) -> None:
    exact = _last_stage_exact(*toy)
    e = toy_compare.effects
    last = e[(e["stage_id"] == 2) & (e["behaviour"] == "loss")]
    for method, rows in last.groupby("method"):
        np.testing.assert_allclose(rows["value"].to_numpy(), exact, atol=1e-6, err_msg=method)
    f = toy_compare.faithfulness
    assert (f.loc[f["stage_id"] == 2, "confidence"] == 1.0).all()


def test_aggregates_are_slice_means_and_accuracy(toy, toy_compare) -> None:
    a, e = toy_compare.aggregates, toy_compare.effects
    rep = e[(e["method"] == "replay") & (e["behaviour"] == "loss") & (e["stage_id"] == 0)]
    row = a[
        (a["method"] == "replay") & (a["behaviour"] == "loss") & (a["slice"] == "all") & (a["stage_id"] == 0)
    ]
    assert row["value"].iloc[0] == pytest.approx(rep["value"].mean())
    assert row["n"].iloc[0] == 20
    slices = set(a["slice"])
    assert {"all", "misclassified"} <= slices and any(s.startswith("class=") for s in slices)
    acc = a[(a["behaviour"] == "accuracy") & (a["slice"] == "all")]
    assert acc["value"].between(-1, 1).all()


def test_proxy_confidence_without_replay(toy) -> None:
    run_dir, pipeline = toy
    res = analyze(run_dir, method="fast", pipeline=pipeline, progress=False)
    f = res.faithfulness
    assert list(f["stage_id"]) == [0, 1, 2] and f["pearson"].isna().all()
    assert f["confidence"].iloc[-1] == 1.0 and (f["confidence"] > 0).all() and (f["confidence"] < 1).any()
    assert set(res.effects["method"]) == {"fast"} and res.params["readout"] == "evaluated"


def test_budget_refuses_unless_forced(toy) -> None:
    run_dir, pipeline = toy
    with pytest.raises(BudgetExceededError, match=r"estimated [\d.]+ s: \d+ replayed steps.*budget of 0 s"):
        analyze(run_dir, method="replay", budget_s=0, pipeline=pipeline, progress=False)
    seen = []
    res = analyze(
        run_dir,
        method="partial-replay",
        horizon=2,
        budget_s=0,
        force=True,
        pipeline=pipeline,
        on_estimate=seen.append,
    )
    assert res.params["horizon"] == 2 and res.params["estimated_seconds"] > 0
    assert (
        seen[0].steps == 2 * (2 + 2) and seen[0].hvps == 0
    )  # two stages with later steps, both sides replayed


def test_replay_mismatch_is_reported_not_hidden(toy) -> None:
    run_dir, pipeline = toy
    inputs = pipeline.load_inputs
    pipeline.load_inputs = lambda cfg, ids: inputs(cfg, ids) * (1 + 1e-4)
    try:
        with pytest.raises(ReplayMismatchError, match="does not reproduce .* 'pretrain'"):
            analyze(run_dir, method="replay", pipeline=pipeline, progress=False)
    finally:
        pipeline.load_inputs = inputs


def test_single_stage_run_gives_one_exact_bar(tmp_path: Path) -> None:
    x, y = data()
    pipeline = record_run(tmp_path / "one", MLP, STAGES[:1], x, y, n_train=N_TRAIN)
    exact = _last_stage_exact(tmp_path / "one", pipeline)
    for method in ("replay", "fast", "propagated", "partial-replay"):
        res = analyze(tmp_path / "one", method=method, pipeline=pipeline, progress=False)
        assert set(res.effects["stage_id"]) == {0}
        np.testing.assert_allclose(res.effects["value"].to_numpy(), exact, atol=1e-6)


def test_stage_without_boundary_checkpoint(tmp_path: Path) -> None:
    x, y = data()
    pipeline = record_run(tmp_path / "r", MLP, STAGES, x, y, n_train=N_TRAIN, fail_stage="finetune")
    with pytest.raises(MissingBoundaryStateError, match="stage 'finetune' .*no stage_end checkpoint"):
        analyze(tmp_path / "r", pipeline=pipeline, progress=False)


def test_bad_options() -> None:
    with pytest.raises(StageAnalysisError, match="unknown method"):
        analyze("/nonexistent", method="magic")
    with pytest.raises(StageAnalysisError, match="unknown behaviour"):
        analyze("/nonexistent", behaviours=("accuracy",))
    with pytest.raises(StageAnalysisError, match="horizon"):
        analyze("/nonexistent", method="fast", horizon=3)
    with pytest.raises(FgtracError):
        analyze("/nonexistent")


def test_sample_run_replays_bit_for_bit(digits_run: Path) -> None:
    """The bundled digits run: replaying it reproduces theta_T exactly, and the last stage's bar is exact."""
    with RunStore(digits_run) as store:
        records = load_training(store)
    with deterministic(records.config["torch_threads"]):
        assert replay_full(records.training).steps == 330  # raises ReplayMismatchError on any difference
    res = analyze(digits_run, method="fast", progress=False)
    exact = _last_stage_exact(digits_run, load_pipeline(records.config))
    e = res.effects
    np.testing.assert_allclose(e.loc[e["stage_id"] == 2, "value"].to_numpy(), exact, atol=1e-6)
    assert len(e) == 3 * 360 and e["value"].abs().sum() > 0
