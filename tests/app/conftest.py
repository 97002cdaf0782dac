"""Fixtures of the dashboard tests: the sample run with a recorded stage analysis, and copies to damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.app._support import record_stage_rows


@pytest.fixture(scope="session")
def staged_run(digits_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the sample run with a recorded stage analysis (read-only for tests)."""
    dst = tmp_path_factory.mktemp("staged") / "run"
    shutil.copytree(digits_run, dst)
    record_stage_rows(dst)
    return dst


@pytest.fixture
def staged_copy(staged_run: Path, tmp_path: Path) -> Path:
    """A private copy of the staged run that a test may damage."""
    dst = tmp_path / "staged"
    shutil.copytree(staged_run, dst)
    return dst
