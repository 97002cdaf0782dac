"""A loop that trains under ``torch.autocast`` (CPU bfloat16, the recipe: forward and loss under it): the recorder
notes it per stage in the checkpoint files, and replay runs those stages under it too — bit for bit against the
trained model, where a float32 replay diverges within the first steps."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import duckdb
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgtrac_core.stages._records import load_training
from fgtrac_core.stages.errors import ReplayMismatchError
from fgtrac_core.stages.replay import deterministic, replay_full
from fgtrac_core.store import RunStore
from tests.conftest import run_cli
from tests.stages._loops import INPUTS_REF, MODEL_REF, StageCfg, _load_ckpt, pipeline, record, same_state

_MIXED = {"on": True}  # whether the loop's current stage trains under autocast (set by each stage's reset)


def _mixed(on: bool) -> Any:
    return lambda model: _MIXED.update(on=on)


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_MIXED["on"]):
        return model(x)


def _loss_inside(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_MIXED["on"]):
        return F.cross_entropy(outputs, targets)


def _loss_outside(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)  # of the bfloat16 logits, in bfloat16


STAGES = [
    StageCfg("a", lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), None, epochs=2, reset=_mixed(True)),
    StageCfg("b", lambda m: torch.optim.Adam(m.parameters(), lr=0.01), None, epochs=1, reset=_mixed(False)),
    StageCfg("c", lambda m: torch.optim.AdamW(m.parameters(), lr=0.01), None, epochs=1, reset=_mixed(True)),
]


def _record(run_dir: Path, loss: Any) -> dict[str, torch.Tensor]:
    with deterministic(1):
        model = record(run_dir, STAGES, forward=_forward, loss_fn=loss, validate="eval")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    run_dir = tmp_path_factory.mktemp("autocast") / "run"
    return run_dir, _record(run_dir, _loss_inside)


def test_each_stages_checkpoints_say_what_its_forwards_ran_under(mixed_run: tuple[Path, Any]) -> None:
    run_dir, _ = mixed_run
    with duckdb.connect(str(run_dir / "snapshot.duckdb"), read_only=True) as con:
        rows = con.execute(
            "SELECT s.name, c.kind, c.path FROM checkpoints c JOIN stages s USING (stage_id) ORDER BY checkpoint_id"
        ).fetchall()
    bf16 = {"device_type": "cpu", "dtype": "bfloat16"}
    for stage, kind, path in rows:
        seen = _load_ckpt(run_dir, path)["autocast"]
        assert seen == (None if kind == "stage_start" or stage == "b" else bf16), (stage, kind)


def test_info_and_the_stages_table_say_which_stages_ran_under_autocast(mixed_run: tuple[Path, Any]) -> None:
    """`stages.autocast` (committed by the stage_end entry) says what each stage's end checkpoint says; `fgtrac
    info` names the mixed-precision stages, the dashboard's stages table shows every stage's precision."""
    run_dir, _ = mixed_run
    bf16 = {"device_type": "cpu", "dtype": "bfloat16"}
    with RunStore(run_dir) as store:
        stages = store.stages()
        summary = store.summary()
    assert stages["precision"].tolist() == ["autocast bfloat16 (cpu)", "full", "autocast bfloat16 (cpu)"]
    assert [(st["name"], st["autocast"], st["precision"]) for st in summary["stages"]] == [
        ("a", bf16, "autocast bfloat16 (cpu)"), ("b", None, "full"), ("c", bf16, "autocast bfloat16 (cpu)")
    ]  # fmt: skip
    proc = run_cli("info", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    lines = {ln.split()[0]: ln for ln in proc.stdout.splitlines() if ln.startswith("  ") and "steps" in ln}
    assert "autocast bfloat16 (cpu)" in lines["a"] and "autocast bfloat16 (cpu)" in lines["c"], proc.stdout
    assert "autocast" not in lines["b"] and "full" not in lines["b"], proc.stdout


def test_info_on_an_altered_precision_fails_in_one_line(mixed_run: tuple[Path, Any], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(mixed_run[0], run_dir)
    with duckdb.connect(str(run_dir / "snapshot.duckdb")) as con:
        con.execute("""UPDATE stages SET autocast = '{"dtype": 1' WHERE name = 'a'""")
    proc = run_cli("info", str(run_dir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        """fgtrac: error: stages.autocast holds '{"dtype": 1', not a recorded precision (run fgtrac verify)"""
    ]


def test_a_run_trained_under_autocast_replays_bit_for_bit(mixed_run: tuple[Path, Any]) -> None:
    run_dir, trained = mixed_run
    with RunStore(run_dir) as store, deterministic(1):
        training = load_training(store, pipeline()).training
        assert [s.autocast for s in training.stages] == [{"device_type": "cpu", "dtype": "bfloat16"}, None,
                                                          {"device_type": "cpu", "dtype": "bfloat16"}]  # fmt: skip
        assert same_state(replay_full(training).model, trained)
        # what replay did before: float32 throughout, which the recorded fingerprints refuse
        for stage in training.stages:
            stage.autocast = None
        with pytest.raises(ReplayMismatchError, match=r"replay first diverges at step \d+ \(stage 'a'\)"):
            replay_full(training)
    proc = run_cli("stages", str(run_dir), "--method", "replay", "--model", MODEL_REF, "--inputs", INPUTS_REF)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_loss_computed_outside_autocast_is_named_at_the_first_diverging_step(tmp_path: Path) -> None:
    _record(tmp_path / "run", _loss_outside)
    with RunStore(tmp_path / "run") as store, deterministic(1):
        training = load_training(store, pipeline()).training
        with pytest.raises(ReplayMismatchError) as info:
            replay_full(training)
    message = str(info.value)
    assert "forwards and loss under torch.autocast(cpu, bfloat16)" in message  # the recorded facts of that step
    causes = message.split("recorded at that step:")[1].split(". ", 1)[1]
    assert causes.endswith(
        "; or the loop computed its loss outside torch.autocast(cpu, bfloat16) (replay runs the forward and the loss "
        "under it, as torch's mixed-precision recipe does)"
    )
