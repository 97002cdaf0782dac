"""Fitting recorded states into the pipeline's model: wrapper prefixes of older runs, one-line errors; a pipeline
whose model does not run on its inputs, or whose loss fails on the outputs, refused in one line before any work."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fgtrac_core.checkpoint_files import unwrapped_state
from fgtrac_core.errors import FgtracError
from fgtrac_core.pipeline import Pipeline, load_into
from tests.conftest import run_cli
from tests.stages._loops import D_IN, INPUTS_REF, MLP, MODEL_REF, StageCfg, dataset, inputs, record


def test_wrapper_prefixes_are_removed_only_when_every_key_has_one() -> None:
    plain = nn.Sequential(nn.Linear(2, 3)).state_dict()
    compiled_dp = {f"module._orig_mod.{k}": v for k, v in plain.items()}
    assert list(unwrapped_state(compiled_dp)) == list(plain)
    mixed = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert unwrapped_state(mixed) is mixed and unwrapped_state({}) == {}


def test_a_state_that_does_not_fit_is_one_line() -> None:
    with pytest.raises(FgtracError) as err:
        load_into(nn.Linear(2, 3), {"weight": torch.zeros(3, 3), "extra": torch.zeros(1)}, "checkpoint 4")
    assert str(err.value) == (
        "checkpoint 4 does not fit the pipeline's model Linear: missing bias; unexpected extra; shape differs for "
        "weight (is --model the class the run trained, built the same way?)"
    )


def wide_inputs(config: dict, ids: np.ndarray) -> torch.Tensor:
    """Inputs one feature wider than `tests.stages._loops.MLP` takes."""
    return torch.zeros(len(ids), D_IN + 1)


def failing_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    raise ValueError("this loss expects a dict")


def _pipeline(load_inputs: Callable = inputs, loss_fn: Callable | None = None) -> Pipeline:
    return Pipeline(model_factory=MLP, load_inputs=load_inputs, head_layer="head", config={}, loss_fn=loss_fn)


def test_a_pipeline_that_does_not_run_is_one_line() -> None:
    ids = np.arange(2)
    x, y = dataset()
    _pipeline().check(x[:2], y[:2])  # a fitting pipeline passes
    with pytest.raises(FgtracError) as err:
        _pipeline(wide_inputs).check(wide_inputs({}, ids), y[:2])
    assert str(err.value) == (
        "the model does not run on the pipeline's inputs (RuntimeError: mat1 and mat2 shapes cannot be multiplied "
        f"(2x{D_IN + 1} and {D_IN}x10)); check --model and --inputs"
    )
    with pytest.raises(FgtracError) as err:
        _pipeline(loss_fn=failing_loss).check(x[:2], y[:2])
    assert str(err.value) == (
        "the training loss tests.test_pipeline:failing_loss fails on the model's outputs "
        "(ValueError: this loss expects a dict); check --loss"
    )


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small recorded run (README loop, two stages with checkpoints)."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    sgd = StageCfg("a", lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    record(run_dir, [sgd, StageCfg("b", lambda m: torch.optim.SGD(m.parameters(), lr=0.05))], validate="eval")
    return run_dir


@pytest.mark.parametrize("command", ["influence", "stages"])
@pytest.mark.parametrize(
    "flags",
    [("--inputs", "tests.test_pipeline:wide_inputs"),
     ("--inputs", INPUTS_REF, "--loss", "tests.test_pipeline:failing_loss")],  # fmt: skip
)
def test_the_cli_refuses_such_a_pipeline_before_any_work(recorded: Path, command: str, flags: tuple[str, ...]) -> None:
    proc = run_cli(command, str(recorded), "--model", MODEL_REF, "--head-layer", "head", *flags)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "check --" in proc.stderr
