"""A run that cannot be replayed bit for bit because a kernel rounded differently (made here by a forward that
scaled the recording's logits by 1 + 2^-20, as a layout-dependent kernel perturbs the last bits): the refusal names
float rounding rather than a recorded fact, and a tolerance replays it — equal bit for bit to an independent replay
of the same batches, within the tolerance of the recording, the deviation stored.  A fact the loop did not follow
is refused whatever the tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fgtrac_core.stages._records import load_training
from fgtrac_core.stages.errors import ReplayMismatchError
from fgtrac_core.stages.replay import deterministic, replay_full
from fgtrac_core.stages.replay_match import difference
from fgtrac_core.store import RunStore
from tests.app._support import open_page, plain
from tests.conftest import run_cli
from tests.stages._loops import (
    INPUTS_REF,
    MODEL_REF,
    StageCfg,
    edit_step_lr,
    pipeline,
    record,
    reference_replay,
    same_state,
)

NUDGE = 1 + 2**-20


def _nudged(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x) * NUDGE


@pytest.fixture(scope="module")
def nudged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("nudged") / "run"
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)  # noqa: E731
    adam = lambda m: torch.optim.Adam(m.parameters(), lr=0.01)  # noqa: E731
    with deterministic(1):
        record(run_dir, [StageCfg("a", sgd, epochs=2), StageCfg("b", adam, epochs=1)], forward=_nudged)
    return run_dir


def test_rounding_is_named_and_a_tolerance_replays_it(nudged_run: Path) -> None:
    with RunStore(nudged_run) as store, deterministic(1):
        training = load_training(store, pipeline()).training
        with pytest.raises(ReplayMismatchError) as err:
            replay_full(training)
        message = str(err.value)
        assert "first diverges at step 0 (stage 'a')" in message and "The difference is float rounding" in message
        assert "--tolerance 1e-4" in message and "\n" not in message
        training.tolerance = 1e-4
        result = replay_full(training)
    assert 0 < training.deviation <= 1e-4
    # the replay is the loop without the nudge, step for step: an independent replay of the tables agrees bit for
    # bit, and both stay within the tolerance of the recorded model (which the nudge moved)
    reference = reference_replay(nudged_run)
    assert same_state(result.model, reference)
    final = difference(result.model, training.final_model)
    assert final is not None and 0 < final.relative <= training.deviation


def test_a_fact_the_loop_did_not_follow_is_refused_whatever_the_tolerance(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    with deterministic(1):
        record(run_dir, [StageCfg("a", sgd, epochs=2)])
    edit_step_lr(run_dir, 3, 0.125)
    with RunStore(run_dir) as store, deterministic(1):
        training = load_training(store, pipeline()).training
        training.tolerance = 1e-4
        training.stages.append(training.stages[0])  # replay_full checks multi-stage runs; the first stage fails
        with pytest.raises(ReplayMismatchError) as err:
            replay_full(training)
    message = str(err.value)
    assert "first diverges at step 3" in message and "lr 0.125" in message
    assert "float rounding" not in message


def test_cli_tolerance(nudged_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = ("--model", MODEL_REF, "--inputs", INPUTS_REF)
    refused = run_cli("stages", str(nudged_run), *pipe)
    assert refused.returncode == 2 and "float rounding" in refused.stderr and refused.stderr.count("\n") == 1
    text = run_cli("stages", str(nudged_run), *pipe, "--tolerance", "1e-4", check=True).stdout
    assert "replay reproduced the recorded parameters within a relative difference of" in text
    assert "(--tolerance 0.0001): not bit for bit" in text
    out = json.loads(run_cli("stages", str(nudged_run), *pipe, "--tolerance", "1e-4", "--json", check=True).stdout)
    assert out["verified"] is True and out["replay_tolerance"] == 1e-4 and 0 < out["replay_deviation"] <= 1e-4
    with RunStore(nudged_run) as store:  # stored with the analysis, which the ledger commits
        params = json.loads(store.df("SELECT params FROM analyses ORDER BY analysis_id DESC LIMIT 1").params[0])
    assert params["replay_tolerance"] == 1e-4 and params["replay_deviation"] == out["replay_deviation"]
    at = open_page(nudged_run, "views/stages.py", monkeypatch)  # the dashboard says it was not bit for bit
    said = [plain(c.value) for c in at.caption if "not bit for bit" in c.value]
    assert said == [
        f"Replay reproduced the recorded parameters within a relative difference of {out['replay_deviation']:.2g}, "
        "not bit for bit (tolerance 0.0001: this pipeline's kernels round differently from run to run)"
    ]
    exact = json.loads(
        run_cli("influence", str(nudged_run), *pipe, "--head-layer", "head", "--mode", "exact", "--tolerance", "1e-4", "--json", check=True).stdout
    )
    assert exact["replay_tolerance"] == 1e-4 and 0 < exact["replay_deviation"] <= 1e-4
    bad = run_cli("stages", str(nudged_run), *pipe, "--tolerance", "1.5")
    assert bad.returncode == 2 and "--tolerance: 1.5 is not a finite number in [0, 1)" in bad.stderr
    assert bad.stderr.count("\n") == 1
