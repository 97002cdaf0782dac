"""Key files fgtrac refuses: open to group or others, in a directory they may write, empty or corrupt; and
`load_signing_key`, which never creates a key."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from fgtrac_core.ledger import (
    KEY_FILENAME,
    KeyFileError,
    MissingKeyError,
    fingerprint,
    load_or_create_signing_key,
    load_signing_key,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    """A key directory holding a key, both as fgtrac creates them (0700, 0600)."""
    directory = tmp_path / "keys"
    load_or_create_signing_key(directory)
    return directory


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660, 0o666])
@pytest.mark.parametrize("load", [load_signing_key, load_or_create_signing_key])
def test_a_key_file_open_to_others_is_refused(key_dir: Path, mode: int, load: object) -> None:
    path = key_dir / KEY_FILENAME
    pem = path.read_bytes()
    path.chmod(mode)
    with pytest.raises(KeyFileError) as exc:
        load(key_dir)
    msg = _one_line(exc)
    assert str(path) in msg and f"mode {mode:04o}" in msg and f"chmod 600 {path}" in msg
    assert path.read_bytes() == pem  # never replaced
    path.chmod(0o600)
    load(key_dir)


def test_the_message_names_the_fix(key_dir: Path) -> None:
    path = key_dir / KEY_FILENAME
    path.chmod(0o644)
    with pytest.raises(KeyFileError) as exc:
        load_signing_key(key_dir)
    assert _one_line(exc) == f"{path} is readable by group and others (mode 0644); run: chmod 600 {path}"


@pytest.mark.parametrize("mode", [0o770, 0o757, 0o777, 0o1777, 0o720])
@pytest.mark.parametrize("load", [load_signing_key, load_or_create_signing_key])
def test_a_key_directory_others_may_write_is_refused(key_dir: Path, mode: int, load: object) -> None:
    key_dir.chmod(mode)
    try:
        with pytest.raises(KeyFileError) as exc:
            load(key_dir)
        msg = _one_line(exc)
        assert str(key_dir) in msg and "writable by" in msg and f"chmod go-w {key_dir}" in msg
    finally:
        key_dir.chmod(0o700)


def test_a_readable_key_directory_is_fine(key_dir: Path) -> None:
    key_dir.chmod(0o755)
    assert fingerprint(load_signing_key(key_dir)) == fingerprint(load_or_create_signing_key(key_dir))


def test_no_key_is_created_in_a_directory_others_may_write(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(KeyFileError, match="writable by group and others"):
        load_or_create_signing_key(shared)
    assert list(shared.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "expect"),
    [(b"", "is empty"), (b"\n  \n", "is empty"), (b"garbage", "not a PEM private key"),
     (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a PEM private key")],
)  # fmt: skip
@pytest.mark.parametrize("load", [load_signing_key, load_or_create_signing_key])
def test_an_empty_or_corrupt_key_file_is_one_line(tmp_path: Path, content: bytes, expect: str, load: object) -> None:
    tmp_path.chmod(0o700)
    path = tmp_path / KEY_FILENAME
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as exc:
        load(tmp_path)
    msg = _one_line(exc)
    assert expect in msg and str(path) in msg
    assert path.read_bytes() == content  # never replaced


def test_load_signing_key_never_creates_one(tmp_path: Path) -> None:
    with pytest.raises(MissingKeyError) as exc:
        load_signing_key(tmp_path / "keys")
    assert _one_line(exc) == f"{tmp_path / 'keys'} holds no signing key ({KEY_FILENAME})"
    assert not (tmp_path / "keys").exists()
    (tmp_path / "keys").mkdir(mode=0o700)
    with pytest.raises(MissingKeyError):
        load_signing_key(tmp_path / "keys")
    assert list((tmp_path / "keys").iterdir()) == []


def test_default_directory_from_the_environment(key_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FGTRAC_KEY_DIR", str(key_dir))
    assert fingerprint(load_signing_key()) == fingerprint(load_signing_key(key_dir))
    assert isinstance(KeyFileError("x"), ValueError) and issubclass(MissingKeyError, KeyFileError)
    assert stat.S_IMODE(os.stat(key_dir / KEY_FILENAME).st_mode) == 0o600
