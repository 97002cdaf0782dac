"""The recorder and `fgtrac key export` with a missing, loose, empty or corrupt signing key: refused in one line,
and an existing run is never re-keyed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fgtrac_core import Run, RunStore
from fgtrac_core.errors import FgtracError, SigningKeyError
from fgtrac_core.ledger import KEY_FILENAME

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")


@pytest.fixture
def key_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private FGTRAC_KEY_DIR (the session's shared key must not be deleted or loosened)."""
    directory = tmp_path / "keys"
    monkeypatch.setenv("FGTRAC_KEY_DIR", str(directory))
    return directory


def test_a_reopened_run_whose_key_is_gone_is_refused_not_rekeyed(tmp_path: Path, key_dir: Path) -> None:
    Run.create(tmp_path / "run", name="r").close()
    with RunStore(tmp_path / "run") as store:
        signer = store.meta()["signer_fingerprint"]
    key = key_dir / KEY_FILENAME
    saved = key.read_bytes()
    key.unlink()
    with pytest.raises(SigningKeyError) as exc:
        Run.open(tmp_path / "run")
    assert str(exc.value) == (
        f"this run is signed by key {signer}, but {key_dir} holds no signing key; restore that key (or set "
        "FGTRAC_KEY_DIR); fgtrac never re-keys an existing run"
    )
    assert not key.exists()  # no new key was made
    # the live database was released: restoring the key lets the run be extended, by the same signer
    key.write_bytes(saved)
    key.chmod(0o600)
    Run.open(tmp_path / "run").close()
    with RunStore(tmp_path / "run") as store:
        assert store.meta()["signer_fingerprint"] == signer


def test_a_run_with_another_key_is_refused(tmp_path: Path, key_dir: Path) -> None:
    Run.create(tmp_path / "run", name="r").close()
    (key_dir / KEY_FILENAME).unlink()
    Run.create(tmp_path / "other", name="o").close()  # a new run may create a new key
    with pytest.raises(FgtracError, match="point FGTRAC_KEY_DIR at the run's key"):
        Run.open(tmp_path / "run")


@pytest.mark.parametrize("damage", ["loose", "empty", "corrupt", "open_dir"])
def test_recording_refuses_a_bad_key_in_one_line(tmp_path: Path, key_dir: Path, damage: str) -> None:
    Run.create(tmp_path / "run", name="r").close()
    key = key_dir / KEY_FILENAME
    if damage == "loose":
        key.chmod(0o644)
    elif damage == "empty":
        key.write_bytes(b"")
    elif damage == "corrupt":
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    else:
        key_dir.chmod(0o777)
    for record in (lambda: Run.open(tmp_path / "run"), lambda: Run.create(tmp_path / "new", name="n")):
        with pytest.raises(SigningKeyError) as exc:
            record()
        assert "\n" not in str(exc.value) and str(key_dir) in str(exc.value)
    assert not (tmp_path / "new" / "fgtrac.duckdb").exists()
    key_dir.chmod(0o700)


def _key_export(key_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fgtrac_core.cli", "key", "export", "--key-dir", str(key_dir)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "FGTRAC_KEY_DIR": str(key_dir)},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "expect"),
    [("loose", "run: chmod 600"), ("empty", "is empty"), ("corrupt", "not a PEM private key"),
     ("open_dir", "run: chmod go-w")],
)  # fmt: skip
def test_key_export_refuses_a_bad_key_in_one_line(tmp_path: Path, damage: str, expect: str) -> None:
    key_dir = tmp_path / "keys"
    assert _key_export(key_dir).returncode == 0  # creates the key
    key = key_dir / KEY_FILENAME
    if damage == "loose":
        key.chmod(0o640)
    elif damage == "empty":
        key.write_bytes(b"")
    elif damage == "corrupt":
        key.write_bytes(b"garbage")
    else:
        key_dir.chmod(0o770)
    proc = _key_export(key_dir)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fgtrac: error: ") and expect in lines[0], proc.stderr
    assert proc.stdout == ""
    key_dir.chmod(0o700)
