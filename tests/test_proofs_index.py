"""Proofs of complete use, of non-use and of non-registration (the usage index), checked offline; every
alteration of such a proof is rejected: a hidden use, a wrong count, a neighbour that is not adjacent."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fgtrac_core import Run
from fgtrac_core.ledger.bundle import BundleError, check_bundle, check_content_bundle
from fgtrac_core.ledger.usage_index import parse_usage_leaf, usage_leaf
from fgtrac_core.proofs import build_content_proof, build_usage_proof
from fgtrac_core.verify import verify_run
from tests.conftest import run_cli

SHARED = b"the same file, registered twice"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 train samples (sample 3 used 6 times, twice in one batch; samples 30-39 never used), 5 test samples
    registered with one shared content; ids 10-19 are never used."""
    out = tmp_path_factory.mktemp("index") / "run"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    run = Run.create(out, name="index")
    run.register_samples(np.arange(40), split="train", labels=y.numpy(), raw=x.numpy())
    run.register_samples(np.arange(100, 105), split="test", labels=np.zeros(5, int), raw=[SHARED] * 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with run.stage("s", optimizer=opt, model=model):
        for b in [0, 1, 2, 3, 0]:
            ids = np.r_[np.arange(b * 8, b * 8 + 8)[:5], [3]] if b else np.arange(8)
            ids = ids[(ids < 10) | (ids >= 20)]
            loss = torch.nn.functional.cross_entropy(model(x[ids]), y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log_batch(ids, loss=loss)
    run.close()
    return out


def _uses(run: Path, sid: int) -> int:
    from fgtrac_core.store import RunStore

    with RunStore(run) as store:
        return len(store.sample_usage(sid))


def test_run_with_index_verifies(run: Path) -> None:
    report = verify_run(run)
    assert report.ok, report.first_failure


@pytest.mark.parametrize("sid", [3, 0, 31, 100])
def test_complete_use(run: Path, sid: int) -> None:
    result = check_bundle(build_usage_proof(run, sid))
    assert result.ok and result.complete and result.registered, result.problem
    assert len(result.uses) == _uses(run, sid)


@pytest.mark.parametrize("sid", [77, -5, 10**12, 41])
def test_never_registered(run: Path, sid: int) -> None:
    bundle = build_usage_proof(run, sid)
    assert bundle["entries"] == [] and "absent" in bundle["index"]
    result = check_bundle(bundle)
    assert result.ok and result.registered is False, result.problem


def test_hidden_use_is_rejected(run: Path) -> None:
    bundle = build_usage_proof(run, 3)
    batches = [i for i, e in enumerate(bundle["entries"]) if e["kind"] == "batch"]
    hidden = copy.deepcopy(bundle)
    del hidden["entries"][batches[-1]]  # one use left out of the bundle: the index still commits it
    result = check_bundle(hidden)
    assert not result.ok and "does not prove" in result.problem
    hidden["index"]["uses"] = hidden["index"]["uses"][:-1]  # and from the use list: the committed root differs
    result = check_bundle(hidden)
    assert not result.ok and "does not match the usage index" in result.problem


def test_wrong_count_is_rejected(run: Path) -> None:
    bundle = build_usage_proof(run, 3)
    leaf = bytes.fromhex(bundle["index"]["leaf"]["leaf"])
    sid, n, root = parse_usage_leaf(leaf)
    bundle["index"]["leaf"]["leaf"] = usage_leaf(sid, n - 1, root).hex()
    result = check_bundle(bundle)
    assert not result.ok and "not in the usage index" in result.problem


def test_absence_with_non_adjacent_neighbours_is_rejected(run: Path) -> None:
    bundle = build_usage_proof(run, 77)  # between samples 39 and 100
    far = build_usage_proof(run, 10**12)["index"]["absent"]  # the last leaf, far from 77
    forged = copy.deepcopy(bundle)
    forged["index"]["absent"] = [bundle["index"]["absent"][0], far[0]]
    result = check_bundle(forged)
    assert not result.ok and "not adjacent" in result.problem
    # a registered sample cannot be declared absent: its own leaf sits between the neighbours
    lie = build_usage_proof(run, 77)
    lie["sample_id"] = 39
    assert not check_bundle(lie).ok


def test_content_proofs(run: Path) -> None:
    digest = hashlib.sha256(SHARED).hexdigest()
    result = check_content_bundle(build_content_proof(run, digest))
    assert result.ok, result.problem
    assert sorted(s["sample_id"] for s in result.samples) == list(range(100, 105))
    bundle = build_content_proof(run, digest)
    dropped = copy.deepcopy(bundle)
    dropped["matches"] = dropped["matches"][1:]  # hide one sample registered with this file
    assert not check_content_bundle(dropped).ok
    absent = check_content_bundle(build_content_proof(run, "ab" * 32))
    assert absent.ok and absent.samples == []


def test_cli_prove_and_check(run: Path, tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    assert run_cli("prove", str(run), "--sample", "77", "--out", str(f)).returncode == 0
    proc = run_cli("check-proof", str(f))
    assert proc.returncode == 0 and "never registered" in proc.stdout, proc.stdout
    digest = hashlib.sha256(SHARED).hexdigest()
    assert run_cli("prove", str(run), "--content-sha256", digest, "--out", str(f)).returncode == 0
    proc = run_cli("check-proof", str(f))
    assert proc.returncode == 0 and proc.stdout.count("registered as sample") == 5, proc.stdout
    proc = run_cli("prove", str(run), "--sample", "3", "--content-sha256", digest)
    assert proc.returncode == 2 and "exactly one" in proc.stderr


def test_malformed_index_is_unusable(run: Path) -> None:
    bundle: dict[str, Any] = build_usage_proof(run, 3)
    bundle["index"]["inclusion"] = ["zz"]
    with pytest.raises(BundleError):
        check_bundle(bundle)


def test_sample_registered_after_the_index_is_not_claimed_complete(run: Path, tmp_path: Path) -> None:
    import shutil

    copy_dir = tmp_path / "run"
    shutil.copytree(run, copy_dir)
    reopened = Run.open(copy_dir)
    reopened.register_samples([200], split="train", labels=[1], raw=[b"late"])
    reopened.publish()  # signed, but the session has not closed: no index covers sample 200 yet
    try:
        result = check_bundle(build_usage_proof(copy_dir, 200))
        assert result.ok and result.complete is None, result
    finally:
        reopened.close()
    result = check_bundle(build_usage_proof(copy_dir, 200))
    assert result.ok and result.complete, result.problem
