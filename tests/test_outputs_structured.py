"""Models whose outputs are a structure (a tuple (logits, features), a dict with "logits", an object with a
`.logits` attribute): fgtrac reads their class logits, and the loop's own loss gets the outputs as returned.

Each structured model has `MLP`'s parameters and function, so every analysis of a run it trained must equal the
same analysis of that run through the plain `MLP` (whose path the rest of the suite holds to brute-force
references): stored influence scores and predictions, replay bit for bit, stage effects; per-sample losses equal
one batch-of-one call per sample, on vmap's path and on the eager fallback."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fgtrac_core._per_example import per_example_losses
from fgtrac_core.errors import FgtracError
from fgtrac_core.outputs import class_logits, logits
from fgtrac_core.pipeline import Pipeline
from fgtrac_core.stages._records import load_training
from fgtrac_core.stages.replay import deterministic, replay_full
from fgtrac_core.store import RunStore
from tests._stored import assert_same_influence, assert_same_stage_effects
from tests.conftest import run_cli
from tests.stages._loops import (
    INPUTS_REF,
    MLP,
    MODEL_REF,
    DictMLP,
    StageCfg,
    TupleMLP,
    dict_loss,
    inputs,
    record,
    same_state,
    tuple_loss,
)

STRUCTURED = {
    "tuple": (TupleMLP, tuple_loss, "tests.stages._loops:TupleMLP", "tests.stages._loops:tuple_loss"),
    "dict": (DictMLP, dict_loss, "tests.stages._loops:DictMLP", "tests.stages._loops:dict_loss"),
}


def test_logits_are_found_in_every_structure() -> None:
    z = torch.randn(4, 3)
    h = torch.randn(4, 5)
    for outputs in (z, (z, h), [z, h], {"features": h, "logits": z}, SimpleNamespace(logits=z, hidden=h)):
        assert logits(outputs) is z
        assert torch.equal(class_logits(outputs), z)
    assert torch.equal(class_logits((z[:, :1], h)), torch.cat([torch.zeros(4, 1), z[:, :1]], 1))  # binary
    for bad in ({"features": h}, (), "text", SimpleNamespace(hidden=h), (None, z)):
        with pytest.raises(FgtracError, match=r"^the model's outputs are a \w+ without class logits"):
            logits(bad)


@pytest.mark.parametrize("eager", [False, True])
def test_per_sample_losses_of_structured_outputs_are_each_sample_alone(eager: bool) -> None:
    """vmap's path, and the eager fallback (a loss with Python control flow on tensor values, which vmap cannot
    trace): both equal one call of the loop's loss per sample."""
    g = torch.Generator().manual_seed(0)
    z, h, y = torch.randn(6, 3, generator=g), torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)

    def loss(outputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        logits_, features = outputs
        extra = features.pow(2).mean() if not eager or bool(features.sum() > 0) else features.abs().mean()
        return F.cross_entropy(logits_, targets, label_smoothing=0.1) + extra

    got = per_example_losses(loss, (z, h), y)
    want = torch.stack([loss((z[i : i + 1], h[i : i + 1]), y[i : i + 1]) for i in range(6)])
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def _structured_pipeline(kind: str) -> Pipeline:
    model, loss, _, _ = STRUCTURED[kind]
    return Pipeline(model, inputs, "head", {}, loss_fn=loss)


@pytest.fixture(scope="module", params=sorted(STRUCTURED))
def structured_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    """Two stages (SGD, then Adam over two epochs, checkpoints at each epoch) trained by the structured model
    with the loop's own loss."""
    kind = request.param
    model, loss, model_ref, loss_ref = STRUCTURED[kind]
    run_dir = tmp_path_factory.mktemp(kind) / "run"
    stages = [
        StageCfg("a", lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), None, epochs=2),
        StageCfg("b", lambda m: torch.optim.Adam(m.parameters(), lr=0.01), None, epochs=2),
    ]
    config = {"model": model_ref, "inputs": INPUTS_REF, "head_layer": "head", "loss": loss_ref}
    with deterministic(1):
        trained = record(run_dir, stages, model_factory=model, loss_fn=loss, validate="eval", config=config)
    return kind, run_dir, {k: v.detach().clone() for k, v in trained.state_dict().items()}


def test_structured_runs_replay_bit_for_bit(structured_run: tuple[str, Path, Any]) -> None:
    kind, run_dir, trained = structured_run
    with RunStore(run_dir) as store, deterministic(1):
        training = load_training(store, _structured_pipeline(kind)).training
        assert same_state(replay_full(training).model, trained)


@pytest.mark.parametrize("mode", ["last_layer", "full", "exact"])
def test_influence_of_a_structured_run_equals_the_plain_models(structured_run: tuple[str, Path, Any], mode: str) -> None:
    """The same run scored through the structured model with the loop's loss, and through the plain `MLP` with
    torch's mean cross-entropy (what both structured losses compute from the logits): the same stored
    predictions, proponents and opponents, and self-influence."""
    kind, run_dir, _ = structured_run
    _, _, model_ref, loss_ref = STRUCTURED[kind]
    base = ["--inputs", INPUTS_REF, "--head-layer", "head", "--mode", mode]
    plain = ["--model", MODEL_REF, "--loss", "torch.nn.functional:cross_entropy"]
    assert_same_influence(run_dir, [*base, "--model", model_ref, "--loss", loss_ref], [*base, *plain])


def test_stage_effects_of_a_structured_run_equal_the_plain_models(structured_run: tuple[str, Path, Any]) -> None:
    """Replay and every estimator (the linear read-offs' forward-mode pass reads the logits alone)."""
    kind, run_dir, _ = structured_run
    plain = Pipeline(MLP, inputs, "head", {}, loss_fn=F.cross_entropy)
    assert_same_stage_effects(run_dir, _structured_pipeline(kind), plain)


def test_influence_function_refuses_a_loss_that_reads_more_than_the_head(structured_run: tuple[str, Path, Any]) -> None:
    kind, run_dir, _ = structured_run
    _, _, model_ref, loss_ref = STRUCTURED[kind]
    proc = run_cli(
        "influence", str(run_dir), "--model", model_ref, "--inputs", INPUTS_REF, "--head-layer", "head",
        "--loss", loss_ref, "--mode", "influence_function",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]  # after torch's warning about indexing a tensor with a string
    assert line.startswith("fgtrac: error: the training loss fails on the head's outputs (") and line.endswith(
        "the influence function takes its Hessian in the head's outputs, so the model's outputs must be the head's; "
        "use a TracIn mode (--mode last_layer)"
    )


def test_outputs_without_logits_are_refused_in_one_line(tmp_path: Path) -> None:
    pipe = Pipeline(lambda: _FeaturesOnly(), inputs, "head", {}, loss_fn=lambda out, y: out["features"].sum())
    with pytest.raises(FgtracError, match=r"^the model's outputs are a dict without class logits"):
        pipe.check(inputs({}, [0, 1]), torch.tensor([0, 1]))


class _FeaturesOnly(MLP):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"features": torch.tanh(self.body(x))}
