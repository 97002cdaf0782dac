"""A model with an operation torch has no second or forward-mode derivative of (`nn.EmbeddingBag`), or one whose
second derivative torch silently takes as zero (a custom function with a once_differentiable backward): everything
that needs only first derivatives runs and equals its reference on a twin model with every derivative (the same
function in plain operations); what needs second derivatives (the propagated estimator) is refused in one line,
and left out of `--compare` with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgtrac_core.derivatives import once_differentiable_functions
from fgtrac_core.errors import UnsupportedDerivativeError
from fgtrac_core.influence.adamw_influence import adamw_influence, unrolled_influence
from fgtrac_core.pipeline import Pipeline
from fgtrac_core.stages import analyze
from fgtrac_core.stages._records import load_training
from fgtrac_core.stages.replay import deterministic
from fgtrac_core.store import RunStore
from tests.conftest import run_cli
from tests.stages._loops import (
    N_TEST,
    N_TRAIN,
    BagMLP,
    BagTwin,
    CubeMLP,
    CubeTwin,
    StageCfg,
    dataset,
    inputs,
    record,
)

BAG_REF = "tests.stages._loops:BagMLP"


def _clip(model: nn.Module, step: int) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)  # binds at every step here


STAGES = [
    StageCfg("pretrain", lambda m: torch.optim.AdamW(m.parameters(), lr=0.02, weight_decay=0.01), clip=_clip),
    StageCfg("finetune", lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)),
]


def _pipeline(model: type[nn.Module]) -> Pipeline:
    return Pipeline(model_factory=model, load_inputs=inputs, head_layer="head", config={})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[type[nn.Module], Path]:
    """The same loop recorded with `BagMLP`, `CubeMLP` and their twins."""
    out = {}
    for model in (BagMLP, BagTwin, CubeMLP, CubeTwin):
        run_dir = tmp_path_factory.mktemp(model.__name__) / "run"
        with deterministic(1):
            record(run_dir, STAGES, model_factory=model, validate="eval",
                   config={"model": f"tests.stages._loops:{model.__name__}", "inputs": "tests.stages._loops:inputs",
                           "head_layer": "head"})  # fmt: skip
        out[model] = run_dir
    return out


def test_the_model_lacks_second_and_forward_derivatives() -> None:
    x = dataset()[0][:4]
    torch.manual_seed(0)
    model = BagMLP()
    (g,) = torch.autograd.grad(model(x).square().sum(), model.body.weight, create_graph=True)
    with pytest.raises(NotImplementedError):
        torch.autograd.grad(g.sum(), model.body.weight)
    torch.manual_seed(0)
    twin = BagTwin()
    torch.testing.assert_close(model(x), twin(x))  # the same function and initial values as its twin


def test_once_differentiable_functions_are_found_in_the_graph() -> None:
    x, y = dataset()
    torch.manual_seed(0)
    assert once_differentiable_functions(F.cross_entropy(CubeMLP()(x[:4]), y[:4])) == ["_OnceCube"]
    assert once_differentiable_functions(F.cross_entropy(CubeTwin()(x[:4]), y[:4])) == []


def test_propagated_refuses_a_once_differentiable_model(runs: dict[type[nn.Module], Path]) -> None:
    """torch itself raises nothing there: the HVP would take the activation's curvature as zero."""
    with pytest.raises(UnsupportedDerivativeError, match=r"_OnceCube is marked @once_differentiable"):
        analyze(runs[CubeMLP], method="propagated", pipeline=_pipeline(CubeMLP))


def test_propagated_is_refused_in_one_line(runs: dict[type[nn.Module], Path]) -> None:
    with pytest.raises(UnsupportedDerivativeError, match=r"propagated estimator needs second derivatives.*"
                       r"_embedding_bag_backward.*--method replay, fast and partial-replay"):  # fmt: skip
        analyze(runs[BagMLP], method="propagated", pipeline=_pipeline(BagMLP))
    proc = run_cli("stages", str(runs[BagMLP]), "--method", "propagated", "--model", BAG_REF, "--inputs",
                   "tests.stages._loops:inputs", "--head-layer", "head")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "_embedding_bag_backward" in proc.stderr


def test_compare_runs_everything_else_and_says_why_not_propagated(runs: dict[type[nn.Module], Path]) -> None:
    got = analyze(runs[BagMLP], compare=True, pipeline=_pipeline(BagMLP))
    want = analyze(runs[BagTwin], compare=True, pipeline=_pipeline(BagTwin))
    assert set(got.params["not_run"]) == {"propagated"}
    assert "_embedding_bag_backward" in got.params["not_run"]["propagated"]
    assert want.params["not_run"] == {}
    methods = set(got.effects.method)
    assert "propagated" not in methods and {"replay", "fast", "fast:linear"} <= methods
    # every method the bag model ran equals the twin's (fast:linear by reverse-mode gradients there, forward mode
    # here); the runs differ only by float32 rounding of a sum against a matmul
    cols = ["method", "behaviour", "stage_id", "test_id"]
    merged = got.effects.merge(want.effects, on=cols, suffixes=("", "_twin"))
    assert len(merged) == len(got.effects)
    np.testing.assert_allclose(merged.value, merged.value_twin, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(("model", "twin"), [(BagMLP, BagTwin), (CubeMLP, CubeTwin)])
def test_adamw_influence_through_clipping_without_second_derivatives(
    runs: dict[type[nn.Module], Path], model: type[nn.Module], twin: type[nn.Module]
) -> None:
    """Clipping's Jacobian takes a mixed second derivative where torch has one; for these models it takes one
    gradient per batch row instead: the scores equal the brute-force reference (autograd through the unrolled
    steps) on the twin."""
    x, y = dataset()
    test = (x[N_TRAIN : N_TRAIN + N_TEST], y[N_TRAIN : N_TRAIN + N_TEST])
    scores = {}
    for model_cls in (model, twin):
        run_dir = runs[model_cls]
        with RunStore(run_dir) as store:
            training = load_training(store, _pipeline(model_cls)).training
        with deterministic(1):
            scores[model_cls] = adamw_influence(
                training, "head", np.arange(N_TRAIN), test, sgd_form="trajectory"
            ).scores
            if model_cls is twin:
                want = unrolled_influence(training, np.arange(N_TRAIN), test, params=["head.weight", "head.bias"])
    assert float((scores[twin] - want).abs().max() / want.abs().max()) < 1e-6
    assert float((scores[model] - want).abs().max() / want.abs().max()) < 1e-4


def test_compare_through_the_cli_and_the_dashboard(
    runs: dict[type[nn.Module], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stages --compare` stores what ran and says, in --json and on the Stages page, why propagated did not."""
    from tests.app._support import PAGES, open_page, plain

    proc = run_cli("stages", str(runs[BagMLP]), "--compare", "--json", "--model", BAG_REF, "--inputs",
                   "tests.stages._loops:inputs", "--head-layer", "head")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "_embedding_bag_backward" in out["not_run"]["propagated"]
    assert "fast:linear" in {r["method"] for r in out["faithfulness"]}
    at = open_page(runs[BagMLP], PAGES[2], monkeypatch)
    captions = [plain(c.value) for c in at.caption]
    assert any(c.startswith("propagated not run: the propagated estimator needs second derivatives") for c in captions)
