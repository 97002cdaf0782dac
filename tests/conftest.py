"""Shared fixtures: small real runs, built once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `fgtrac ARGS` in a fresh interpreter, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "fgtrac_core.cli", *args], capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fgtrac {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample run, built through the CLI exactly as the README does (read-only for tests)."""
    out = tmp_path_factory.mktemp("digits") / "run"
    run_cli("demo", "--no-app", "--out", str(out), check=True)
    return out


@pytest.fixture(scope="session")
def tabular_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled tabular sample run (breast-cancer MLP), built through the CLI (read-only for tests)."""
    out = tmp_path_factory.mktemp("tabular") / "run"
    run_cli("demo", "--pipeline", "tabular", "--no-app", "--out", str(out), check=True)
    return out


@pytest.fixture(scope="session")
def relabelled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small recorded run whose later stages train some samples on other targets than their labels
    (`tests.stages._loops.record_relabelled`), with an influence analysis (read-only for tests)."""
    from fgtrac_core.stages.replay import deterministic
    from tests.stages._loops import INPUTS_REF, MODEL_REF, record_relabelled

    with deterministic(1):
        out = record_relabelled(tmp_path_factory.mktemp("relabelled") / "run")
    run_cli("influence", str(out), "--model", MODEL_REF, "--inputs", INPUTS_REF, "--head-layer", "head", check=True)
    return out


@pytest.fixture
def digits_copy(digits_run: Path, tmp_path: Path) -> Path:
    """A private copy of the sample run that a test may damage."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(digits_run, dst)
    return dst


@pytest.fixture(scope="session", autouse=True)
def _signing_key_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests sign with a throwaway key, never the user's ~/.config/fgtrac key (children inherit the variable)."""
    import os

    os.environ["FGTRAC_KEY_DIR"] = str(tmp_path_factory.mktemp("keys"))
