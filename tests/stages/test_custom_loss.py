"""A loop that trains on its own loss (label-smoothed cross-entropy): the pipeline names it (`--loss`, config
"loss"), replay reproduces the loop bit for bit with it and diverges at the first step without it, a run whose
config names a loss is never rebuilt with another one, and influence scores with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fgtrac_core.errors import FgtracError
from fgtrac_core.influence.run_influence import run_influence
from fgtrac_core.influence.tracin import load_state_dict, tracin
from fgtrac_core.pipeline import Pipeline, load_pipeline
from fgtrac_core.stages._records import load_training
from fgtrac_core.stages.errors import ReplayMismatchError
from fgtrac_core.stages.replay import deterministic, replay_full
from fgtrac_core.store import RunStore
from tests.conftest import run_cli
from tests.stages._loops import (
    INPUTS_REF,
    LOSS_REF,
    MLP,
    MODEL_REF,
    StageCfg,
    dataset,
    inputs,
    record,
    same_state,
    smoothed_loss,
)


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


@pytest.fixture(scope="module")
def smoothed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    run_dir = tmp_path_factory.mktemp("smoothed") / "run"
    config = {"model": MODEL_REF, "inputs": INPUTS_REF, "head_layer": "head", "loss": LOSS_REF}
    with deterministic(1):
        trained = record(run_dir, [StageCfg("a", _sgd, None, epochs=2)], loss_fn=smoothed_loss, config=config)
    return run_dir, trained.state_dict()


def _pipeline(loss: bool) -> Pipeline:
    return Pipeline(MLP, inputs, "head", {}, loss_fn=smoothed_loss if loss else None)


def test_replay_uses_the_loops_loss(smoothed_run: tuple[Path, dict[str, torch.Tensor]]) -> None:
    run_dir, trained = smoothed_run
    with RunStore(run_dir) as store, deterministic(1):
        training = load_training(store, _pipeline(loss=True)).training
        assert same_state(replay_full(training).model, trained)
        default = load_training(store, _pipeline(loss=False)).training
        diverges = r"first diverges at step 0 .*loss other than mean cross-entropy: name the loop's with --loss"
        with pytest.raises(ReplayMismatchError, match=diverges):
            replay_full(default)


def test_a_run_that_names_its_loss_needs_it(smoothed_run: tuple[Path, dict[str, torch.Tensor]]) -> None:
    run_dir, _ = smoothed_run
    with RunStore(run_dir) as store:
        config = store.meta()["config"]
    with pytest.raises(FgtracError, match=rf"--loss {LOSS_REF}"):
        load_pipeline(config, model=MODEL_REF, inputs=INPUTS_REF)
    pipe = load_pipeline(config, model=MODEL_REF, inputs=INPUTS_REF, loss=LOSS_REF)
    out, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    per_sample = pipe.per_sample_loss()
    assert per_sample is not None
    # the loop's batch loss of each sample alone: label smoothing's per-sample loss
    expected = F.cross_entropy(out, y, label_smoothing=0.2, reduction="none")
    assert torch.allclose(per_sample(out, y), expected, atol=1e-6)


def test_influence_scores_with_the_loops_loss(
    smoothed_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    run_dir, _ = smoothed_run
    hessian = run_influence(run_dir, mode="influence_function", model=MODEL_REF, inputs=INPUTS_REF, loss=LOSS_REF)
    with RunStore(run_dir) as store:  # the influence function's Hessian is the smoothed loss's (tested against
        # brute force in tests/influence/test_influence_function.py)
        assert store.analysis(hessian.analysis_id, "influence")["params"]["training_loss"] == LOSS_REF
    summary = run_influence(
        run_dir, k=5, checkpoints="all", model=MODEL_REF, inputs=INPUTS_REF, loss=LOSS_REF, weighting="checkpoint"
    )
    with RunStore(run_dir) as store:
        aid = summary.analysis_id
        assert store.analysis(aid, "influence")["params"]["training_loss"] == LOSS_REF  # what the scores used
        test_id = int(store.influence_tests(aid)["sample_id"].iloc[0])
        stored = store.influence_topk(aid, test_id, "raw").query("direction == 'proponent'")
        used = [int(c["checkpoint_id"]) for c in summary.checkpoints]
        ckpts = store.df(f"SELECT path, lr FROM checkpoints WHERE checkpoint_id IN ({', '.join(map(str, used))}) "
                         "ORDER BY checkpoint_id")  # fmt: skip
        train = store.df("SELECT sample_id, label FROM samples WHERE split = 'train' ORDER BY sample_id")
    x, _ = dataset()
    ids = train["sample_id"].to_numpy(np.int64)
    y_tr = torch.from_numpy(train["label"].to_numpy(np.int64).copy())
    y_te = torch.as_tensor([int(dataset()[1][test_id])])
    states = [(load_state_dict(run_dir / p), lr) for p, lr in zip(ckpts["path"], ckpts["lr"], strict=True)]

    def scores(loss_fn):  # noqa: ANN001, ANN202
        train = (x[torch.from_numpy(ids.copy())], y_tr)
        return tracin(MLP(), "head", train, (x[[test_id]], y_te), states, loss_fn=loss_fn)[0].double()

    smoothed = scores(lambda o, t: F.cross_entropy(o, t, label_smoothing=0.2, reduction="none"))
    top = stored.sort_values("rank")
    at = np.searchsorted(ids, top["train_id"].to_numpy())
    assert np.allclose(top["score"], smoothed[at].numpy(), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(smoothed, scores(None))  # the loss made a difference


def test_the_cli_takes_the_loss(smoothed_run: tuple[Path, dict[str, torch.Tensor]]) -> None:
    run_dir, _ = smoothed_run
    pipeline = ["--model", MODEL_REF, "--inputs", INPUTS_REF]
    refused = run_cli("stages", str(run_dir), "--method", "replay", *pipeline)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and f"--loss {LOSS_REF}" in refused.stderr
    proc = run_cli("stages", str(run_dir), "--method", "replay", *pipeline, "--loss", LOSS_REF, "--json")
    assert proc.returncode == 0, proc.stderr
    with RunStore(run_dir) as store:
        assert store.latest_analysis("stages")["params"]["training_loss"] == LOSS_REF
