"""A run with a failed stage: `fgtrac stages` and `fgtrac influence` refuse naming the stage unless
--allow-incomplete."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fgtrac_core.completeness import IncompleteRunError, require_complete
from tests.conftest import run_cli
from tests.stages._loops import INPUTS_REF, MODEL_REF, StageCfg, record


def _boom(model: torch.nn.Module, step: int) -> None:
    if step == 8:
        raise RuntimeError("training crashed")


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("failed") / "run"
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    with pytest.raises(RuntimeError, match="crashed"):
        record(
            run_dir, [StageCfg("pretrain", sgd, epochs=1), StageCfg("finetune", sgd, epochs=1, clip=_boom)]
        )
    return run_dir


def test_require_complete_names_the_failed_stage(failed_run: Path) -> None:
    with pytest.raises(IncompleteRunError, match=r"stage 'finetune' is failed .*--allow-incomplete"):
        require_complete(failed_run, "fgtrac stages")


@pytest.mark.parametrize("command", ["stages", "influence"])
def test_cli_refuses_an_incomplete_run(failed_run: Path, command: str) -> None:
    proc = run_cli(command, str(failed_run), "--model", MODEL_REF, "--inputs", INPUTS_REF)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "stage 'finetune' is failed" in lines[0] and "--allow-incomplete" in lines[0]


def test_allow_incomplete_goes_on_to_the_analysis(failed_run: Path) -> None:
    """Past the guard, stage replay still needs every boundary checkpoint: a different, specific refusal."""
    proc = run_cli(
        "stages", str(failed_run), "--allow-incomplete", "--model", MODEL_REF, "--inputs", INPUTS_REF
    )
    assert proc.returncode == 2 and "is failed" not in proc.stderr
    assert "finetune" in proc.stderr and "stage_end checkpoint" in proc.stderr, proc.stderr
