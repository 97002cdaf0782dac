"""Usage-proof bundles: `fgtrac prove` / `fgtrac check-proof` end to end, tampered hashes, unusable input."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from fgtrac_core.ledger import load_public_key
from fgtrac_core.ledger.bundle import BundleError, check_bundle
from fgtrac_core.store.reader import RunStore
from tests.conftest import run_cli

PathKey = tuple[str | int, ...]


def _pick_samples(run: Path) -> tuple[int, int]:
    """A train sample used in training and a test sample never used (both deterministic)."""
    with RunStore(run) as store:
        train = [int(s) for s in store.samples("train")["sample_id"]]
        test = [int(s) for s in store.samples("test")["sample_id"]]
        used = next(s for s in train if not store.sample_usage(s).empty)
        unused = next(s for s in test if store.sample_usage(s).empty)
    return used, unused


@pytest.fixture(scope="module")
def proofs(digits_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Bundles for a used train sample and an unused test sample, written by `fgtrac prove --out`."""
    out = tmp_path_factory.mktemp("proofs")
    used, unused = _pick_samples(digits_run)
    files = {}
    for name, sid in (("train", used), ("test", unused)):
        f = out / f"{name}.json"
        proc = run_cli("prove", str(digits_run), "--sample", str(sid), "--out", str(f))
        assert proc.returncode == 0, proc.stderr
        files[name] = f
    key = out / "key.pem"
    key.write_text(run_cli("key", "export", check=True).stdout)
    return {"used": used, "unused": unused, "files": files, "key": key, "dir": out}


def _load(proofs: dict[str, Any], name: str = "train") -> dict[str, Any]:
    return json.loads(proofs["files"][name].read_text())


def _assert_usage_error(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fgtrac: error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def _other_key(tmp_path: Path) -> Path:
    """The public key of a different signer (another key directory)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fgtrac_core.cli", "key", "export"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "FGTRAC_KEY_DIR": str(tmp_path / "k2")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    key = tmp_path / "other.pem"
    key.write_text(proc.stdout)
    return key


# ---------------------------------------------------------------------------------------------- valid proofs


def test_train_sample_proof(digits_run: Path, proofs: dict[str, Any]) -> None:
    """A used sample's proof is valid and proves exactly the steps the run records for it."""
    f = proofs["files"]["train"]
    proc = run_cli("check-proof", str(f))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "Proof valid"
    assert "NOT pinned" in proc.stdout
    with RunStore(digits_run) as store:
        steps = [int(s) for s in store.sample_usage(proofs["used"])["step"]]
    assert steps
    assert f"used {len(steps)} times, at steps {', '.join(map(str, steps))}" in proc.stdout

    proc = run_cli("check-proof", str(f), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] is True and result["sample_id"] == proofs["used"]
    assert [u["step"] for u in result["uses"]] == steps
    assert result["sample"]["split"] == "train"


def test_a_relabelled_sample_proof_names_each_uses_target(tmp_path: Path) -> None:
    """A sample trained with one target and then another: check-proof lists each use with its own target (with one
    target throughout, it names it once)."""
    import numpy as np
    import torch
    from torch import nn

    from fgtrac_core import Run

    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    run = Run.create(tmp_path / "run", name="relabel")
    run.register_samples(np.arange(4), split="train", labels=np.array([0, 1, 2, 0]), raw=np.eye(4, 3, dtype=np.float32))
    for name, relabel in (("a", 0), ("b", 2)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with run.stage(name, optimizer=opt, model=model):
            for _ in range(2):
                loss = model(torch.randn(2, 3)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.log_batch([0, 1], loss=loss, targets=[relabel, 1])
    run.close()
    for sample, expected in ((0, "at steps 0 (target 0), 1 (target 0), 2 (target 2), 3 (target 2)"),
                             (1, "at steps 0, 1, 2, 3, trained with target 1")):  # fmt: skip
        bundle = tmp_path / f"{sample}.json"
        proc = run_cli("prove", str(tmp_path / "run"), "--sample", str(sample), "--out", str(bundle))
        assert proc.returncode == 0, proc.stderr
        proc = run_cli("check-proof", str(bundle))
        assert proc.returncode == 0 and f"used 4 times, {expected}" in proc.stdout, proc.stdout


def test_test_sample_proof(proofs: dict[str, Any]) -> None:
    """A never-used test sample's proof is valid and shows no use."""
    proc = run_cli("check-proof", str(proofs["files"]["test"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Proof valid" in proc.stdout and "used 0 times, at steps none" in proc.stdout and "complete" in proc.stdout
    result = check_bundle(_load(proofs, "test"))
    assert result.ok and result.uses == [] and result.sample is not None
    assert result.sample["split"] == "test" and result.sample_id == proofs["unused"]


def test_pinned_proof(digits_run: Path, proofs: dict[str, Any]) -> None:
    """With the signer's key pinned (and the right run id) the proof is valid and says so."""
    bundle = _load(proofs)
    proc = run_cli(
        "check-proof", str(proofs["files"]["train"]), "--public-key", str(proofs["key"]),
        "--run-id", bundle["run_id"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(pinned)" in proc.stdout and "Proof valid" in proc.stdout
    result = check_bundle(bundle, public_key=load_public_key(proofs["key"]), run_id=bundle["run_id"])
    assert result.ok and result.key_pinned


def test_prove_to_stdout(digits_run: Path, proofs: dict[str, Any]) -> None:
    """Without --out the bundle goes to stdout and is the same as the file."""
    proc = run_cli("prove", str(digits_run), "--sample", str(proofs["unused"]))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == _load(proofs, "test")


# ---------------------------------------------------------------------------------------------- tampered hashes


def _hash_paths(bundle: dict[str, Any]) -> Iterator[PathKey]:
    """Where the bundle holds a hash (or signature) as hex text."""
    for field in ("root", "chain_head", "signature", "key_fingerprint"):
        yield ("tree_head", field)
    for i, item in enumerate(bundle["entries"]):
        for j in range(len(item["inclusion"])):
            yield ("entries", i, "inclusion", j)
        for j in range(len(item.get("member", {}).get("inclusion", []))):
            yield ("entries", i, "member", "inclusion", j)


def _get(obj: Any, path: PathKey) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _with_flip(bundle: dict[str, Any], path: PathKey, index: int) -> dict[str, Any]:
    """A copy of the bundle with the hex digit at `index` (counted within the hex part) of `path` changed."""
    out = copy.deepcopy(bundle)
    parent = _get(out, path[:-1])
    text: str = parent[path[-1]]
    offset = text.index(":") + 1 if text.startswith("SHA256:") else 0
    k = offset + index
    parent[path[-1]] = text[:k] + format(int(text[k], 16) ^ 1, "x") + text[k + 1 :]
    return out


def _rejected(bundle: dict[str, Any], **kw: Any) -> bool:
    try:
        return not check_bundle(bundle, **kw).ok
    except BundleError:
        return True


def test_every_hash_flip_rejected(proofs: dict[str, Any]) -> None:
    """One changed hex digit in any hash of the bundle (a different digit position per hash) is rejected."""
    bundle = _load(proofs)
    assert check_bundle(bundle).ok
    paths = list(_hash_paths(bundle))
    kinds = {item["kind"] for item in bundle["entries"]}
    assert {"sample", "batch", "transform"} <= kinds
    assert sum(p[2] == "member" for p in paths if p[0] == "entries") >= 2
    accepted = []
    for n, path in enumerate(paths):
        width = len(_get(bundle, path).removeprefix("SHA256:"))
        index = (n * 7) % width
        if not _rejected(_with_flip(bundle, path, index)):
            accepted.append((path, index))
    assert not accepted, accepted


def test_every_byte_of_tree_head_and_one_proof_rejected(proofs: dict[str, Any]) -> None:
    """Every byte of the signed head's hashes and signature, and of one inclusion and one id-set proof element."""
    bundle = _load(proofs)
    batch = next(i for i, item in enumerate(bundle["entries"]) if item["kind"] == "batch")
    paths: list[PathKey] = [
        ("tree_head", "root"),
        ("tree_head", "chain_head"),
        ("tree_head", "signature"),
        ("tree_head", "key_fingerprint"),
        ("entries", batch, "inclusion", 0),
        ("entries", batch, "member", "inclusion", 0),
    ]
    accepted = []
    for path in paths:
        width = len(_get(bundle, path).removeprefix("SHA256:"))
        for byte in range(width // 2):
            index = 2 * byte + byte % 2  # alternate high and low nibbles
            if not _rejected(_with_flip(bundle, path, index)):
                accepted.append((path, index))
    assert not accepted, accepted


def _with_entry_text(bundle: dict[str, Any], i: int, field: str) -> dict[str, Any]:
    """A copy whose entry #i has one hex digit of the string value of `field` changed (still canonical)."""
    out = copy.deepcopy(bundle)
    raw = bytes.fromhex(out["entries"][i]["entry"]).decode()
    marker = f'"{field}":"'
    k = raw.index(marker) + len(marker) + 10
    raw = raw[:k] + format(int(raw[k], 16) ^ 1, "x") + raw[k + 1 :]
    out["entries"][i]["entry"] = raw.encode().hex()
    return out


def test_entry_changes_rejected(proofs: dict[str, Any]) -> None:
    """Changing an entry: its samples_root / content hash (re-encoded canonically), or any raw hex digit."""
    bundle = _load(proofs)
    accepted = []
    for i, item in enumerate(bundle["entries"]):
        field = {"batch": "samples_root", "transform": "samples_root", "sample": "content_sha256"}.get(
            item["kind"]
        )
        if field and not _rejected(_with_entry_text(bundle, i, field)):
            accepted.append((i, field))
        for index in (0, len(item["entry"]) // 2, len(item["entry"]) - 1):
            if not _rejected(_with_flip(bundle, ("entries", i, "entry"), index)):
                accepted.append((i, index))
    assert not accepted, accepted


def test_bundle_proves_the_target_of_every_use(proofs: dict[str, Any], digits_run: Path) -> None:
    """Each proven use carries the target the sample was trained on, as recorded; another target (or none, or a
    non-integer) in a member proof is rejected."""
    bundle = _load(proofs)
    result = check_bundle(bundle)
    assert result.ok and result.uses
    con = duckdb.connect(str(digits_run / "snapshot.duckdb"), read_only=True)
    try:
        recorded = dict(
            con.execute(
                "SELECT b.step * 1000 + bs.position, bs.target FROM batch_samples bs JOIN batches b USING (batch_id) "
                "WHERE bs.sample_id = ?",
                [bundle["sample_id"]],
            ).fetchall()
        )
    finally:
        con.close()
    assert {u["step"] * 1000 + u["position"]: u["target"] for u in result.uses} == recorded
    batch = next(i for i, item in enumerate(bundle["entries"]) if item["kind"] == "batch")
    target = bundle["entries"][batch]["member"]["target"]
    assert isinstance(target, int)
    for forged_target in (target + 1, None):
        forged = copy.deepcopy(bundle)
        forged["entries"][batch]["member"]["target"] = forged_target
        outcome = check_bundle(forged)
        assert not outcome.ok and "is not in the id set" in (outcome.problem or ""), outcome
    forged = copy.deepcopy(bundle)
    forged["entries"][batch]["member"]["target"] = "3"
    with pytest.raises(BundleError, match="not an integer"):
        check_bundle(forged)


def test_hash_flip_cli(proofs: dict[str, Any], tmp_path: Path) -> None:
    """The CLI on tampered bundles: exit 1 with one INVALID line, or exit 2 (pinned key, fingerprint changed)."""
    bundle = _load(proofs)
    batch = next(i for i, item in enumerate(bundle["entries"]) if item["kind"] == "batch")
    for name, path in (
        ("root", ("tree_head", "root")),
        ("member", ("entries", batch, "member", "inclusion", 0)),
    ):
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(_with_flip(bundle, path, 5)))
        proc = run_cli("check-proof", str(f))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        invalid = [ln for ln in proc.stdout.splitlines() if ln.startswith("INVALID:")]
        assert len(invalid) == 1 and "Proof valid" not in proc.stdout, proc.stdout
        assert "Traceback" not in proc.stderr

    f = tmp_path / "fingerprint.json"
    f.write_text(json.dumps(_with_flip(bundle, ("tree_head", "key_fingerprint"), 3)))
    _assert_usage_error(run_cli("check-proof", str(f), "--public-key", str(proofs["key"])))


def test_duplicated_entry_rejected(proofs: dict[str, Any]) -> None:
    """A bundle must not prove more uses than the ledger holds by repeating an entry."""
    bundle = _load(proofs)
    forged = copy.deepcopy(bundle)
    batch = next(item for item in forged["entries"] if item["kind"] == "batch")
    forged["entries"].append(copy.deepcopy(batch))
    honest = check_bundle(bundle)
    try:
        result = check_bundle(forged)
    except BundleError:
        return
    assert not result.ok or len(result.uses) == len(honest.uses), [u["step"] for u in result.uses]


# ---------------------------------------------------------------------------------------------- unusable input


def test_check_proof_unusable_input(proofs: dict[str, Any], tmp_path: Path) -> None:
    """Malformed JSON, a wrong format, another run, a wrong or garbage pinned key, a missing file: exit 2."""
    bundle = _load(proofs)
    cases: dict[str, tuple[Any, list[str]]] = {
        "malformed": ('{"format": "fgtrac-usage-proof/2", "entries": [', []),
        "not-an-object": ("[1, 2, 3]", []),
        "wrong-format": ({**bundle, "format": "fgtrac-usage-proof/999"}, []),
        "no-tree-head": ({k: v for k, v in bundle.items() if k != "tree_head"}, []),
        "other-run": (bundle, ["--run-id", "other"]),
        "wrong-key": (bundle, ["--public-key", str(_other_key(tmp_path))]),
        "garbage-key": (bundle, ["--public-key", str(tmp_path / "garbage.pem")]),
        "missing-key-file": (bundle, ["--public-key", str(tmp_path / "no-such-key.pem")]),
    }
    (tmp_path / "garbage.pem").write_text(
        "-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n"
    )
    for name, (content, extra) in cases.items():
        f = tmp_path / f"{name}.json"
        f.write_text(content if isinstance(content, str) else json.dumps(content))
        proc = run_cli("check-proof", str(f), *extra)
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        _assert_usage_error(proc)
    _assert_usage_error(run_cli("check-proof", str(tmp_path / "no-such-bundle.json")))


def test_check_bundle_api_errors(proofs: dict[str, Any], tmp_path: Path) -> None:
    """The Python API raises BundleError for another run and for a head signed by another than the pinned key."""
    bundle = _load(proofs)
    with pytest.raises(BundleError, match="other"):
        check_bundle(bundle, run_id="other")
    with pytest.raises(BundleError, match="pinned"):
        check_bundle(bundle, public_key=load_public_key(_other_key(tmp_path)))
    with pytest.raises(BundleError):
        check_bundle({**bundle, "run_id": "someone-else"})


def test_prove_unusable_input(digits_run: Path, tmp_path: Path) -> None:
    """`prove` on a missing run: exit 2, one line.  An id the run never registered is not an error: the closed
    sample run has a usage index, so the answer is a proof of absence."""
    for sid in ("99999999", "-5"):
        bundle = json.loads(run_cli("prove", str(digits_run), "--sample", sid, check=True).stdout)
        assert bundle["entries"] == [] and check_bundle(bundle).registered is False
    _assert_usage_error(run_cli("prove", str(tmp_path / "no-run"), "--sample", "0"))
    _assert_usage_error(run_cli("prove", str(tmp_path), "--sample", "0"))


# ---------------------------------------------------------------------------------------------- light checker


def test_check_proof_imports_no_heavy_modules(proofs: dict[str, Any]) -> None:
    """`check-proof` runs without importing torch, duckdb or numpy."""
    code = (
        "import sys; from fgtrac_core.cli import main; rc = main(['check-proof', sys.argv[1]]); "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'duckdb', 'numpy')); "
        "assert not heavy, heavy; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(proofs["files"]["train"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Proof valid" in proc.stdout
