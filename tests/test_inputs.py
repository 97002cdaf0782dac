"""Pipelines whose model takes several inputs (`fgtrac_core.inputs`): positional ``model(low, high, sign)`` and
keyword ``model(features=x, sign=s)``, with an int64 input that must stay one.

Each model has `MLP`'s parameters and function, so every analysis of a run it trained must equal the same
analysis through the plain `MLP` and one input tensor (whose path the rest of the suite holds to brute-force
references): stored influence in every mode (and sharded on Ray), replay bit for bit, every stage estimate."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from fgtrac_core.errors import FgtracError
from fgtrac_core.inputs import Inputs
from fgtrac_core.pipeline import Pipeline
from fgtrac_core.stages._records import load_training
from fgtrac_core.stages.replay import deterministic, replay_full
from fgtrac_core.store import RunStore
from tests._stored import assert_same_influence, assert_same_stage_effects
from tests.stages._loops import (
    INPUTS_REF,
    MLP,
    MODEL_REF,
    KeywordMLP,
    StageCfg,
    ThreeInputMLP,
    dataset,
    inputs,
    keyword_inputs,
    record,
    same_state,
    three_inputs,
)

SEVERAL = {
    "positional": (ThreeInputMLP, three_inputs, lambda m, x: m(*_split3(x))),
    "keyword": (KeywordMLP, keyword_inputs, lambda m, x: m(features=x, sign=(x[:, 0] > 0).long())),
}
REFS = {
    "positional": ("tests.stages._loops:ThreeInputMLP", "tests.stages._loops:three_inputs"),
    "keyword": ("tests.stages._loops:KeywordMLP", "tests.stages._loops:keyword_inputs"),
}


def _split3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x[:, :2], x[:, 2:], (x[:, 0] > 0).long()


def test_inputs_of_a_loader_and_what_is_refused() -> None:
    x, s = torch.randn(4, 3), torch.arange(4)
    assert Inputs.of(x) is x
    for value, n_args, keys in (((x, s), 2, []), ([x, s], 2, []), ({"features": x, "sign": s}, 0, ["features", "sign"])):
        got = Inputs.of(value)
        assert isinstance(got, Inputs) and len(got.args) == n_args and list(got.kwargs) == keys and len(got) == 4
    for bad, needle in (
        ("text", "returned a str, not a torch.Tensor (or a tuple, list or dict of them"),
        ((x, np.zeros(4)), "returned a tuple holding a ndarray; each of the model's inputs must be a torch.Tensor"),
        ((), "returned a tuple holding nothing"),
    ):
        with pytest.raises(FgtracError, match=needle.replace("(", r"\(")):
            Inputs.of(bad)


def test_inputs_index_split_and_move_as_one_tensor() -> None:
    x, s = torch.randn(5, 3), torch.arange(5)
    several = Inputs([x], {"sign": s})
    assert torch.equal(several[1:3].args[0], x[1:3]) and torch.equal(several[[4, 0]].kwargs["sign"], s[[4, 0]])
    parts = several.split([2, 3])
    assert [len(p) for p in parts] == [2, 3] and torch.equal(parts[1].kwargs["sign"], s[2:])
    moved = several.to(torch.float64)
    assert moved.args[0].dtype == torch.float64 and moved.kwargs["sign"].dtype == torch.int64  # ids stay ids
    assert several.unsqueeze(0).args[0].shape == (1, 5, 3)
    copied = several.clone()
    assert copied.args[0] is not x and torch.equal(copied.args[0], x)
    # torch.func maps over it as over a tensor: per-example gradients of a model with several inputs
    model = Pipeline(ThreeInputMLP, three_inputs, "head", {}).model()
    xs = Inputs(_split3(dataset()[0][:5]))
    params = dict(model.named_parameters())

    def loss(p: dict[str, torch.Tensor], xi: Inputs, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, p, (xi.unsqueeze(0),)), yi[None])

    y = torch.tensor([0, 1, 2, 0, 1])
    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, y)
    for i in range(5):
        one = torch.autograd.grad(loss(params, xs[i], y[i]), list(params.values()))
        for (name, g), g1 in zip(per_example.items(), one, strict=True):
            assert torch.allclose(g[i], g1, atol=1e-6), name


def test_models_a_pipeline_builds_take_inputs_as_the_loop_called_them() -> None:
    x = dataset()[0][:6]
    model = Pipeline(ThreeInputMLP, three_inputs, "head", {}).model()
    assert torch.equal(model(Inputs(_split3(x))), model(*_split3(x)))
    for again in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(again(Inputs(_split3(x))), model(*_split3(x)))
    keyword = Pipeline(KeywordMLP, keyword_inputs, "head", {}).model()
    assert torch.equal(keyword(Inputs.of(keyword_inputs({}, np.arange(6)))), MLP.forward(keyword, x))


def test_a_loader_whose_inputs_disagree_in_length_is_refused() -> None:
    pipe = Pipeline(ThreeInputMLP, lambda c, ids: (*three_inputs(c, ids)[:2], torch.zeros(1, dtype=torch.long)), "head", {})
    with pytest.raises(FgtracError, match=r"^the pipeline returned 1 inputs for 3 sample ids$"):
        pipe.inputs(np.arange(3))


@pytest.fixture(scope="module", params=sorted(SEVERAL))
def several_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    """SGD then Adam, checkpoints every epoch, trained by the model with several inputs as the loop calls it."""
    kind = request.param
    model, _, forward = SEVERAL[kind]
    model_ref, inputs_ref = REFS[kind]
    run_dir = tmp_path_factory.mktemp(kind) / "run"
    stages = [
        StageCfg("a", lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), None, epochs=2),
        StageCfg("b", lambda m: torch.optim.Adam(m.parameters(), lr=0.01), None, epochs=2),
    ]
    config = {"model": model_ref, "inputs": inputs_ref, "head_layer": "head"}
    with deterministic(1):
        trained = record(run_dir, stages, model_factory=model, validate="eval", config=config, forward=forward)
    return kind, run_dir, {k: v.detach().clone() for k, v in trained.state_dict().items()}


def test_runs_with_several_inputs_replay_bit_for_bit(several_run: tuple[str, Path, Any]) -> None:
    kind, run_dir, trained = several_run
    model, loader, _ = SEVERAL[kind]
    with RunStore(run_dir) as store, deterministic(1):
        training = load_training(store, Pipeline(model, loader, "head", {})).training
        assert same_state(replay_full(training).model, trained)


@pytest.mark.parametrize("mode", ["last_layer", "full", "exact", "adamw_influence", "influence_function", "ray"])
def test_influence_with_several_inputs_equals_the_single_input_models(
    several_run: tuple[str, Path, Any], mode: str
) -> None:
    kind, run_dir, _ = several_run
    model_ref, inputs_ref = REFS[kind]
    how = ["--ray", "--k", "5"] if mode == "ray" else ["--mode", mode]
    if mode == "ray":
        pytest.importorskip("ray")
    pairs = ((model_ref, inputs_ref), (MODEL_REF, INPUTS_REF))
    assert_same_influence(run_dir, *[["--model", m, "--inputs", i, "--head-layer", "head", *how] for m, i in pairs])


def test_stage_effects_with_several_inputs_equal_the_single_input_models(several_run: tuple[str, Path, Any]) -> None:
    kind, run_dir, _ = several_run
    model, loader, _ = SEVERAL[kind]
    assert_same_stage_effects(run_dir, Pipeline(model, loader, "head", {}), Pipeline(MLP, inputs, "head", {}))
