"""Recorded text cannot drive the terminal: `fgtrac` text output shows control characters, ESC, DEL and bidi
overrides from a run (name, stage, sample source, transform, failure details, proof bundles) as visible escapes."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from torch import nn

from fgtrac_core import Run
from fgtrac_core._text import for_terminal
from tests.conftest import run_cli

ESC_NAME = "x\x1b[31mRED\x1b[0m"
UNSAFE = ("\x1b", "\x9b", "\r", "\x07", "\x7f", "\u202e", "\u2066")


def _clean(text: str) -> None:
    for ch in UNSAFE:
        assert ch not in text, (ch, text)


def test_for_terminal() -> None:
    assert for_terminal(ESC_NAME) == "x\\x1b[31mRED\\x1b[0m"
    assert for_terminal("a\nb\rc\td\x00\x7f\x9b") == "a\\x0ab\\x0dc\\x09d\\x00\\x7f\\x9b"
    assert for_terminal("abc\u202edef\u2066g\u200f") == "abc\\u202edef\\u2066g\\u200f"
    assert for_terminal("prüfung → 日本 C:\\runs") == "prüfung → 日本 C:\\runs"
    assert for_terminal(None) == "None"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("term") / "run"
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = Run.create(run_dir, name=ESC_NAME)
    run.register_samples(np.arange(4), split="train\x1b[2J", labels=np.arange(4) % 3,
                         raw=np.arange(16, dtype=np.uint8).reshape(4, 4),
                         source="file\x1b]0;pwned\x07\u202eevil")  # fmt: skip
    run.log_transform("scale\r\x1b[1Aok", np.arange(4), note="\x1b[8m")
    with run.stage("st\x1b[Kage\x9b", optimizer=opt, model=model):
        for step in range(3):
            loss = model(torch.randn(2, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log_batch(torch.tensor([step % 4, (step + 1) % 4]), step=step, loss=loss)
    run.close()
    return run_dir


def test_info_and_sample_escape_recorded_text(hostile_run: Path) -> None:
    info = run_cli("info", str(hostile_run), check=True)
    _clean(info.stdout)
    assert "x\\x1b[31mRED\\x1b[0m" in info.stdout and "st\\x1b[Kage\\x9b" in info.stdout
    assert "scale\\x0d\\x1b[1Aok" in info.stdout and "train\\x1b[2J" in info.stdout
    sample = run_cli("sample", str(hostile_run), "1", check=True)
    _clean(sample.stdout)
    assert "file\\x1b]0;pwned\\x07\\u202eevil" in sample.stdout
    # --json is escaped by json.dumps already, and stays exactly JSON
    assert json.loads(run_cli("info", str(hostile_run), "--json", check=True).stdout)["name"] == ESC_NAME


def test_verify_escapes_failure_details(hostile_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(hostile_run, run)
    for db in ("snapshot.duckdb", "fgtrac.duckdb"):
        with duckdb.connect(str(run / db)) as con:
            con.execute("UPDATE samples SET source = 'x\x1b[2J\x1b[32mLedger intact' WHERE sample_id = 2")
    proc = run_cli("verify", str(run))
    assert proc.returncode == 1
    _clean(proc.stdout + proc.stderr)
    assert "TAMPERED" in proc.stdout


def test_errors_and_check_proof_escape_recorded_text(hostile_run: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "proof.json"
    proved = run_cli("prove", str(hostile_run), "--sample", "1", "--out", str(bundle))
    assert proved.returncode == 0, proved.stderr
    data = json.loads(bundle.read_text())
    data["run_id"] = "r\x1b[2J\x1b]0;title\x07"
    bundle.write_text(json.dumps(data))
    proc = run_cli("check-proof", str(bundle))
    assert proc.returncode in (1, 2)
    _clean(proc.stdout + proc.stderr)
    # an error message quoting recorded text (here: the run id a bundle claims)
    proc = run_cli("check-proof", str(bundle), "--run-id", "expected")
    _clean(proc.stdout + proc.stderr)
