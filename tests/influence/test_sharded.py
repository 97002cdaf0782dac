"""Influence sharded on Ray (`fgtrac influence RUN --ray`): the same stored results as one process, on the sample
run and on a tiny synthetic run cut into several shards, for every mode and weighting; a worker killed mid-run
costs a retry, not a result; without Ray installed, one line naming the extra."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fgtrac_core import RunStore
from fgtrac_core.cli import main
from fgtrac_core.influence.run_influence import run_influence
from fgtrac_core.influence.tracin import review
from tests.influence import _tiny

RTOL = 1e-6
KEY = ["test_id", "view", "direction", "rank", "train_id"]
TINY = {"model": _tiny.MODEL, "inputs": _tiny.INPUTS, "layer": "head", "checkpoints": "all"}


@pytest.fixture(scope="module")
def ray_cluster():  # noqa: ANN201
    """One small local cluster for the module (run_influence and sharded_review use a connection they find)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("tiny") / "run"
    _tiny.record(run)
    return run


def _stored(run: Path, analysis_id: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    with RunStore(run) as store:
        top = store.df(
            "SELECT * FROM influence_topk WHERE analysis_id = ? ORDER BY test_id, view, direction, rank",
            [analysis_id],
        )
        si = store.df("SELECT * FROM self_influence WHERE analysis_id = ? ORDER BY sample_id", [analysis_id])
        params = store.analysis(analysis_id, "influence")["params"]
    return top, si, params


def _assert_same_results(run: Path, single: int, sharded: int) -> dict:
    """The two analyses stored identical ids and ranks, scores equal to 1e-6 relative; returns the sharded
    analysis' params."""
    (top_a, si_a, params_a), (top_b, si_b, params_b) = _stored(run, single), _stored(run, sharded)
    assert len(top_a) == len(top_b) > 0
    assert top_a[KEY].equals(top_b[KEY])
    for column in ("score", "cosine"):
        np.testing.assert_allclose(top_b[column], top_a[column], rtol=RTOL, atol=0)
    parts_a = np.array([json.loads(c) for c in top_a.contributions])
    parts_b = np.array([json.loads(c) for c in top_b.contributions])
    # relative to the scores they add up to: a checkpoint that never used the sample gives an exact 0
    np.testing.assert_allclose(parts_b, parts_a, rtol=RTOL, atol=RTOL * np.abs(top_a.score).max())
    assert si_a.sample_id.equals(si_b.sample_id) and si_a["rank"].equals(si_b["rank"])
    np.testing.assert_allclose(si_b.value, si_a.value, rtol=RTOL, atol=0)
    assert "sharded" not in params_a
    assert {k: v for k, v in params_b.items() if k != "sharded"} == params_a
    return params_b


def _one_line_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.strip().splitlines() == [f"fgtrac: error: {message}"], proc.stderr


def test_cli_ray_starts_a_local_cluster_and_stores_the_same_results(tiny_run: Path) -> None:
    """First in the module, before its own cluster: `--ray` with no address starts one and shuts it down."""
    pytest.importorskip("ray")
    flags = (
        f"--model {_tiny.MODEL} --inputs {_tiny.INPUTS} --layer head --checkpoints all --k 5 --json".split()
    )
    cmd = [sys.executable, "-m", "fgtrac_core.cli", "influence", str(tiny_run), *flags]
    proc = subprocess.run([*cmd, "--ray"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sharded = json.loads(proc.stdout)
    assert sharded["shards"] == 1  # 24 training samples: one default shard
    single = run_influence(tiny_run, k=5, **TINY)
    params = _assert_same_results(tiny_run, single.analysis_id, sharded["analysis_id"])
    assert params["sharded"] == {"engine": "ray", "shards": 1, "shard_size": 8192}


@pytest.mark.parametrize("mode", ["last_layer", "full", "adamw"])
@pytest.mark.parametrize("weighting", ["usage", "checkpoint"])
def test_several_shards_store_the_single_process_results(
    ray_cluster: object, tiny_run: Path, mode: str, weighting: str
) -> None:
    """24 training samples in shards of 7 (the last one of 3, shorter than k): partial lists merged exactly."""
    single = run_influence(tiny_run, mode=mode, weighting=weighting, k=5, **TINY)
    sharded = run_influence(
        tiny_run, mode=mode, weighting=weighting, k=5, ray_address=True, shard_size=7, **TINY
    )
    assert sharded.shards == 4
    params = _assert_same_results(tiny_run, single.analysis_id, sharded.analysis_id)
    assert params["sharded"] == {"engine": "ray", "shards": 4, "shard_size": 7}
    top_ids = [[r["sample_id"] for r in s.top_self_influence] for s in (single, sharded)]
    assert top_ids[0] == top_ids[1]


def test_relabelled_samples_shard_like_the_single_process(ray_cluster: object, tmp_path: Path) -> None:
    """Targets that differ per checkpoint (samples relabelled in stage "b") travel sliced with their shard."""
    _tiny.record(tmp_path / "run", relabel=(18, 19, 12))
    single = run_influence(tmp_path / "run", k=5, weighting="checkpoint", **TINY)
    sharded = run_influence(tmp_path / "run", k=5, weighting="checkpoint", ray_address=True, shard_size=7, **TINY)
    params = _assert_same_results(tmp_path / "run", single.analysis_id, sharded.analysis_id)
    assert params["relabelled_train_samples"] == 3


@pytest.mark.parametrize(
    ("mode", "weighting", "stored"), [("last_layer", "checkpoint", True), ("adamw", "usage", False)]
)
def test_sample_run_sharded_equals_single_process(
    ray_cluster: object, digits_copy: Path, mode: str, weighting: str, stored: bool
) -> None:
    """The bundled digits run in 3 shards; its default analysis is compared with the one the demo stored."""
    if stored:
        with RunStore(digits_copy) as store:
            single = int(store.analyses("influence").analysis_id.iloc[0])  # the demo's: k=20, defaults
    else:
        single = run_influence(digits_copy, mode=mode, weighting=weighting, k=20).analysis_id
    sharded = run_influence(
        digits_copy, mode=mode, weighting=weighting, k=20, ray_address=True, shard_size=448
    )
    assert sharded.shards == 3
    _assert_same_results(digits_copy, single, sharded.analysis_id)


def _tiny_review_inputs() -> tuple[tuple, tuple, list]:
    x, y = _tiny.dataset()
    n = _tiny.N_TRAIN
    model = _tiny.MLP()
    ckpts = []
    for i in range(3):
        torch.manual_seed(i)
        state = {k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()}
        ckpts.append((state, 0.1 * (i + 1)))
    return (x[:n], y[:n]), (x[n:], y[n:]), ckpts


def test_a_killed_worker_is_retried_and_the_result_is_complete(ray_cluster: object, tmp_path: Path) -> None:
    """The first shard task to compute a loss kills its own worker (SIGKILL, as the OOM killer would); Ray
    re-runs it and the merged review equals one process's."""
    from fgtrac_core.influence.sharded import sharded_review

    marker, driver = tmp_path / "killed", os.getpid()

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pickled by value: a closure
        if os.getpid() != driver:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return F.cross_entropy(out, y, reduction="none")

    train, test, ckpts = _tiny_review_inputs()
    weights = torch.rand(len(train[0]), len(ckpts), generator=torch.Generator().manual_seed(0))
    kw = {"k": 5, "cosine": True, "loss_fn": loss, "sample_weights": weights}
    want = review(_tiny.MLP(), "head", train, test, ckpts, **kw)
    got = sharded_review(_tiny.MLP(), "head", train, test, ckpts, shard_size=6, **kw)
    assert marker.exists() and got.n_shards == 4 and len(got.shard_seconds) == 4
    for view in ("top", "top_cosine"):
        a, b = getattr(want, view), getattr(got, view)
        assert torch.equal(a.proponent_indices, b.proponent_indices)
        assert torch.equal(a.opponent_indices, b.opponent_indices)
        torch.testing.assert_close(b.proponent_scores, a.proponent_scores, rtol=RTOL, atol=0)
        torch.testing.assert_close(b.opponent_scores, a.opponent_scores, rtol=RTOL, atol=0)
        rows = torch.arange(len(test[0]))[:, None].expand_as(a.proponent_indices)
        detail = [r.pair_detail(rows, a.proponent_indices) for r in (want, got)]
        for x, z in zip(*detail, strict=True):
            torch.testing.assert_close(z, x, rtol=RTOL, atol=RTOL * float(x.abs().max()))
    torch.testing.assert_close(got.self_influence, want.self_influence, rtol=RTOL, atol=0)
    torch.testing.assert_close(got.test_self_influence, want.test_self_influence, rtol=RTOL, atol=0)


def test_ray_without_the_extra_is_one_line(tiny_run: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "no_ray"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None  # `import ray` fails\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for ray in (["--ray"], ["--ray", "auto"]):
        proc = subprocess.run(
            [sys.executable, "-m", "fgtrac_core.cli", "influence", str(run), *ray],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        _one_line_error(proc, "--ray needs the optional extra: pip install 'fgtrac[ray]'")


def test_exact_mode_refuses_ray(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["influence", str(tiny_run), "--mode", "exact", "--ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fgtrac: error: --ray does not apply to exact mode"), err


def test_an_unreachable_cluster_is_one_line_not_a_hang(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ray retries an address nothing answers at without end; fgtrac checks it first (5 s at most)."""
    pytest.importorskip("ray")
    with RunStore(tiny_run) as store:
        before = len(store.analyses("influence"))
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        flags = f"--model {_tiny.MODEL} --inputs {_tiny.INPUTS} --layer head".split()
        assert main(["influence", str(tiny_run), *flags, "--ray", address]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"fgtrac: error: cannot reach the Ray cluster at {address}"), err
    with RunStore(tiny_run) as store:
        assert len(store.analyses("influence")) == before  # nothing stored
