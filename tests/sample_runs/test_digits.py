"""The bundled sample run: three real stages, recorded completely, and deterministic under its seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fgtrac_core import RunStore
from sample_runs import digits
from tests.conftest import run_cli


def _states(run_dir: Path) -> list[tuple[int, dict]]:
    with RunStore(run_dir) as store:
        ckpts = store.checkpoints()
    return [(int(r.step), torch.load(run_dir / r.path, weights_only=True)) for r in ckpts.itertuples()]


def _assert_same_tensors(a: object, b: object, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_two_builds_are_identical_at_every_checkpoint(digits_run: Path, tmp_path: Path) -> None:
    second = digits.build(tmp_path / "again")
    first_states, second_states = _states(digits_run), _states(second)
    assert len(first_states) == len(second_states) >= 9
    for (step_a, a), (step_b, b) in zip(first_states, second_states, strict=True):
        assert step_a == step_b
        _assert_same_tensors(a["model"], b["model"], f"model@{step_a}")
        _assert_same_tensors(a["optimizer"], b["optimizer"], f"optimizer@{step_a}")
    with RunStore(digits_run) as s1, RunStore(second) as s2:
        b1, b2 = s1.batches(), s2.batches()
        assert b1[["step", "stage", "epoch", "lr", "loss"]].equals(
            b2[["step", "stage", "epoch", "lr", "loss"]]
        )
        u1 = s1.df("SELECT batch_id, position, sample_id FROM batch_samples ORDER BY ALL")
        u2 = s2.df("SELECT batch_id, position, sample_id FROM batch_samples ORDER BY ALL")
        assert u1.equals(u2)
    # and the optimizer state differs between checkpoints, so the comparison above is not vacuous
    assert not torch.equal(
        first_states[1][1]["model"]["head.weight"], first_states[2][1]["model"]["head.weight"]
    )


def test_sample_run_records_three_stages_with_checkpoints(digits_run: Path) -> None:
    proc = run_cli("info", str(digits_run), "--json", check=True)
    info = json.loads(proc.stdout)
    assert info["samples"] == {"test": 360, "train": 1257, "val": 180}
    stages = {s["name"]: s for s in info["stages"]}
    assert list(stages) == ["pretrain", "finetune", "adapt"]
    assert [stages[k]["optimizer"] for k in stages] == ["SGD", "AdamW", "SGD"]
    assert all(s["status"] == "done" for s in stages.values())
    assert info["n_steps"] == sum(s["n_steps"] for s in stages.values()) > 300
    periodic = [c for c in info["checkpoints"] if c["kind"] == "periodic"]
    for name in stages:
        assert sum(c["stage"] == name for c in periodic) >= 2
    assert all(c["val_loss"] is not None and c["val_loss"] > 0 for c in periodic)
    assert {c["kind"] for c in info["checkpoints"]} == {"stage_start", "periodic", "stage_end"}


def test_sample_run_lifecycle_and_ground_truth(digits_run: Path) -> None:
    data = digits.load_data(0)
    with RunStore(digits_run) as store:
        samples = store.samples()
        assert len(samples) == 1797
        assert store.df("SELECT count(*) AS n FROM samples WHERE thumbnail IS NULL")["n"][0] == 0
        flips = store.df("SELECT sample_id, value FROM sample_annotations WHERE key = 'label_flipped'")
        rate = (flips["value"] == "true").mean()  # JSON: annotations keep their type
        assert 0.08 <= rate <= 0.12
        # the finetune subset carries the noisy labels; the recorded label is what training used
        flipped = flips.loc[flips["value"] == "true", "sample_id"].to_numpy()
        assert np.all(samples.set_index("sample_id").loc[flipped, "label"].to_numpy() != data.true_y[flipped])
        # "when was sample X used?": every use of a pretrain sample is in pretrain or adapt, once per epoch
        sid = int(data.subsets["pretrain"][0])
        usage = store.sample_usage(sid)
        assert set(usage["stage"]) <= {"pretrain", "adapt"}
        assert (usage["stage"] == "pretrain").sum() == digits.STAGES["pretrain"]["epochs"]
        assert store.sample_transforms(sid)["name"].tolist() == ["scale", "standardize"]
        test_ids = samples.loc[samples["split"] == "test", "sample_id"].to_numpy()
        uses = store.df("SELECT DISTINCT sample_id FROM batch_samples")["sample_id"].to_numpy()
        assert not np.isin(test_ids, uses).any()


@pytest.mark.parametrize("sample_id", [0])
def test_cli_sample_json_answers_when_used(digits_run: Path, sample_id: int) -> None:
    out = json.loads(run_cli("sample", str(digits_run), str(sample_id), "--json", check=True).stdout)
    assert out["sample_id"] == sample_id and len(out["content_sha256"]) == 64
    assert [t["name"] for t in out["transforms"]] == ["scale", "standardize"]
    for use in out["usage"]:
        assert {"step", "epoch", "stage", "lr", "loss", "position"} <= use.keys()
