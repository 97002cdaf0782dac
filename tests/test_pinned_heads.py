"""Pinned heads catch what no check inside a run can: the key holder truncating the run, or re-recording a
different history of the same size, and signing it again.  `fgtrac verify --since` and `check-proof --since`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fgtrac_core import Run
from fgtrac_core.ledger.pinned import read_pinned_head
from fgtrac_core.verify import verify_run
from tests.conftest import run_cli


def _record(run: Run, label: int, n: int = 8, start: int = 0) -> None:
    ids = np.arange(start, start + n)
    run.register_samples(ids, split="train", labels=np.full(n, label), raw=[bytes([label, int(i)]) for i in ids])
    run.publish()


@pytest.fixture
def histories(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """(the run as the reviewer saw it, the head they pinned, the run truncated to an earlier state with the
    same key, the run re-recorded from that earlier state with another history of the same size)."""
    live = tmp_path / "run"
    run = Run.create(live, name="audited")
    _record(run, label=1)
    run.close()
    earlier = tmp_path / "earlier"
    shutil.copytree(live, earlier)  # a consistent, signed, earlier state
    run = Run.open(live)
    _record(run, label=1, start=100)
    run.close()
    head = tmp_path / "head.json"
    assert run_cli("head", str(live), "--out", str(head)).returncode == 0
    # re-record: from the earlier state, a different history (other labels) of exactly the same size
    rewritten = tmp_path / "rewritten"
    shutil.copytree(earlier, rewritten)
    run = Run.open(rewritten)
    _record(run, label=7, start=100)
    run.close()
    return live, head, earlier, rewritten


def test_head_file_is_the_latest_signed_head(histories) -> None:
    live, head, _, _ = histories
    pinned = read_pinned_head(head)
    report = verify_run(live, since=[head])
    assert report.ok, report.first_failure
    assert pinned.tree_size == report.tree_size
    check = next(c for c in report.checks if c.name == "pinned_heads")
    assert check.ok is True and check.count == 1


def test_truncated_run_verifies_alone_but_not_since_the_pinned_head(histories) -> None:
    _, head, earlier, _ = histories
    assert verify_run(earlier).ok  # every check inside the run passes
    proc = run_cli("verify", str(earlier), "--since", str(head))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "TAMPERED: the run was truncated since pinned head head.json" in proc.stdout, proc.stdout


def test_rewritten_history_of_the_same_size_is_caught(histories) -> None:
    live, head, _, rewritten = histories
    assert verify_run(rewritten).ok
    report = verify_run(rewritten, since=[head])
    assert report.tree_size == read_pinned_head(head).tree_size  # same size, other entries
    assert not report.ok and "rewritten since pinned head head.json" in str(report.first_failure)


def test_check_proof_since(histories, tmp_path: Path) -> None:
    live, head, _, rewritten = histories
    bundle = tmp_path / "proof.json"
    assert run_cli("prove", str(live), "--sample", "100", "--since", str(head), "--out", str(bundle)).returncode == 0
    assert run_cli("check-proof", str(bundle), "--since", str(head)).returncode == 0
    # a bundle from the rewritten run carries a consistency proof that cannot verify against the pinned head
    other = tmp_path / "other.json"
    assert run_cli("prove", str(rewritten), "--sample", "100", "--since", str(head), "--out", str(other)).returncode == 0
    proc = run_cli("check-proof", str(other), "--since", str(head))
    assert proc.returncode == 1 and "rewritten since pinned head" in proc.stdout, proc.stdout
    # a bundle made without --since cannot vouch for the pinned head: asked for, that is unusable input
    plain = tmp_path / "plain.json"
    assert run_cli("prove", str(live), "--sample", "100", "--out", str(plain)).returncode == 0
    proc = run_cli("check-proof", str(plain), "--since", str(head))
    assert proc.returncode == 2 and "no consistency proof" in proc.stderr, proc.stderr


@pytest.mark.parametrize("content", ["", "{}", "not json", json.dumps({"format": "fgtrac-sth/v1"})])
def test_unusable_head_file_is_one_line(histories, tmp_path: Path, content: str) -> None:
    live, _, _, _ = histories
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    proc = run_cli("verify", str(live), "--since", str(bad))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "bad.json" in proc.stderr and "Traceback" not in proc.stderr
