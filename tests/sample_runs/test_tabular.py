"""The bundled tabular sample run: feature-mapping displays instead of thumbnails, two stages, deterministic."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import torch

from fgtrac_core import RunStore
from fgtrac_core.stages._records import load_training
from fgtrac_core.stages.replay import deterministic, replay_full
from sample_runs import tabular
from tests.conftest import run_cli


def _digest(obj: Any, h: Any) -> None:
    """Feed a checkpoint payload's tensors and scalars into `h`, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(f"K{k!r}".encode())
            _digest(obj[k], h)
    elif isinstance(obj, list | tuple):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    else:
        h.update(f"V{obj!r}".encode())


def _state_hashes(run_dir: Path) -> list[tuple[int, str, str]]:
    """(step, kind, SHA-256 of model + optimizer state) per checkpoint.  The checkpoint files' own hashes differ
    between two builds: each payload names its run id."""
    with RunStore(run_dir) as store:
        ckpts = store.checkpoints()
    out = []
    for r in ckpts.itertuples():
        payload = torch.load(run_dir / r.path, weights_only=True)
        h = hashlib.sha256()
        _digest({"model": payload["model"], "optimizer": payload["optimizer"]}, h)
        out.append((int(r.step), str(r.kind), h.hexdigest()))
    return out


def test_two_builds_with_one_seed_are_identical(tmp_path: Path) -> None:
    first = _state_hashes(tabular.build(tmp_path / "a"))
    second = _state_hashes(tabular.build(tmp_path / "b"))
    assert len(first) == len(second) >= 10
    assert first[-1][1] == "stage_end" and first[-1] == second[-1]  # the final model and optimizer
    assert first == second
    periodic = [h for _, kind, h in first if kind == "periodic"]
    assert len(set(periodic)) == len(periodic) >= 10  # the states move: the comparison is not vacuous
    other = _state_hashes(tabular.build(tmp_path / "c", seed=1))
    assert other[-1][2] != first[-1][2]


def test_samples_show_named_features_and_no_thumbnail(tabular_run: Path) -> None:
    data = tabular.load_data(0)
    with RunStore(tabular_run) as store:
        samples = store.samples()
        assert len(samples) == 569
        assert store.df("SELECT count(*) AS n FROM samples WHERE thumbnail IS NOT NULL")["n"][0] == 0
        shown = store.displays(samples["sample_id"].tolist())
        assert sorted(shown) == list(range(569))
        for features in shown.values():
            assert isinstance(features, dict) and list(features) == data.feature_names
            assert all(type(v) is float for v in features.values())
        first = store.sample(0)
        assert first["display"] == shown[0] and first["thumbnail_sha256"] is None
        assert first["source"] == "sklearn.datasets.load_breast_cancer"
        assert first["display"]["mean radius"] == float(f"{data.raw[0, 0]:.4g}")
        assert store.split_counts() == {"test": 120, "train": 389, "val": 60}


def test_flipped_labels_are_annotated(tabular_run: Path) -> None:
    data = tabular.load_data(0)
    finetune = data.subsets["finetune"]
    with RunStore(tabular_run) as store:
        samples = store.samples().set_index("sample_id")
        annotations = {int(sid): store.sample(int(sid))["annotations"] for sid in finetune}
        assert "label_flipped" not in store.sample(int(data.subsets["pretrain"][0]))["annotations"]
    flags = {sid: a["label_flipped"] for sid, a in annotations.items()}
    assert all(type(v) is bool for v in flags.values())
    assert 0.13 <= np.mean(list(flags.values())) <= 0.17
    for sid, a in annotations.items():
        assert type(a["true_label"]) is int and a["true_label"] == data.true_y[sid]
        recorded = int(samples.loc[sid, "label"])
        assert (recorded != a["true_label"]) == flags[sid]
        if flags[sid]:
            assert recorded == 1 - a["true_label"]


def test_verify_and_stored_analyses(tabular_run: Path) -> None:
    proc = run_cli("verify", str(tabular_run))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "re-hashed from sample_runs.tabular" in proc.stdout
    with RunStore(tabular_run) as store:
        influence = store.latest_analysis("influence")
        stages = store.latest_analysis("stages")
        assert store.stages()["name"].tolist() == ["pretrain", "finetune"]
    assert influence is not None and influence["params"]["k"] == 20
    assert stages is not None and stages["method"] == "replay"
    assert stages["params"]["replay_verified"] is True  # the whole replay reproduced theta_T bit for bit
    assert stages["params"].get("verified", True) is True


def test_replay_reproduces_the_final_parameters(tabular_run: Path) -> None:
    with RunStore(tabular_run) as store:
        records = load_training(store)
    with deterministic(records.config["torch_threads"]):
        result = replay_full(records.training)  # raises ReplayMismatchError on any difference
    assert result.steps == sum(len(s.steps) for s in records.training.stages) > 100


def test_unknown_pipeline_is_one_line_exit_2() -> None:
    proc = run_cli("demo", "--pipeline", "nope", "--no-app")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and "tabular" in lines[0]


def test_an_edited_feature_value_is_detected(tabular_run: Path, tmp_path: Path) -> None:
    """One feature value of the middle sample changed in the snapshot: verify names its row and the display
    field (what a reviewer sees of a tabular sample is covered like every recorded value)."""
    run = tmp_path / "run"
    shutil.copytree(tabular_run, run)
    with duckdb.connect(str(run / "snapshot.duckdb")) as con:
        sid, shown = con.execute(
            "SELECT sample_id, display FROM samples ORDER BY sample_id LIMIT 1 OFFSET (SELECT count(*) // 2 FROM samples)"
        ).fetchone()
        value = json.loads(shown)
        name = next(iter(value["features"]))
        value["features"][name] *= 1.01
        con.execute("UPDATE samples SET display = ? WHERE sample_id = ?", [json.dumps(value), sid])
    proc = run_cli("verify", str(run))
    assert proc.returncode == 1, proc.stdout
    assert f"samples row sample_id={sid} field display" in proc.stdout, proc.stdout
