"""Tests for Ed25519 key management and signed tree heads."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import stat
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fgtrac_core.ledger.signing import (
    KEY_FILENAME,
    SignedTreeHead,
    default_key_dir,
    fingerprint,
    load_or_create_signing_key,
    load_public_key,
    public_key_pem,
    sign_tree_head,
    tree_head_message,
    utc_timestamp,
    verify_tree_head,
)

ROOT = hashlib.sha256(b"root").digest()
HEAD = hashlib.sha256(b"head").digest()
TS = "2026-11-23T12:00:00Z"

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def sth(key: Ed25519PrivateKey) -> SignedTreeHead:
    return sign_tree_head(key, "run-2026-11-23", 1234, ROOT, HEAD, TS)


# --- key directory and key file ------------------------------------------------------------------------------


def test_default_key_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FGTRAC_KEY_DIR", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert default_key_dir() == tmp_path / "home" / ".config" / "fgtrac"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")
    assert default_key_dir() == tmp_path / "home" / ".config" / "fgtrac"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_key_dir() == tmp_path / "xdg" / "fgtrac"
    monkeypatch.setenv("FGTRAC_KEY_DIR", str(tmp_path / "keys"))
    assert default_key_dir() == tmp_path / "keys"
    monkeypatch.setenv("FGTRAC_KEY_DIR", "")
    assert default_key_dir() == tmp_path / "xdg" / "fgtrac"


@posix_only
def test_key_created_with_private_modes_and_not_overwritten(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key_dir = tmp_path / "cfg" / "keys"
    monkeypatch.setenv("FGTRAC_KEY_DIR", str(key_dir))
    k1 = load_or_create_signing_key()
    path = key_dir / KEY_FILENAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert sorted(p.name for p in key_dir.iterdir()) == [KEY_FILENAME]  # no temp file left behind
    mtime = path.stat().st_mtime_ns

    k2 = load_or_create_signing_key()
    k3 = load_or_create_signing_key(key_dir)
    assert path.read_bytes() == pem and path.stat().st_mtime_ns == mtime
    assert fingerprint(k1) == fingerprint(k2) == fingerprint(k3)


@posix_only
def test_key_creation_under_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        load_or_create_signing_key(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k" / KEY_FILENAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700


def test_existing_bad_key_file_is_reported_not_replaced(tmp_path: Path) -> None:
    (tmp_path / KEY_FILENAME).write_bytes(b"garbage")
    (tmp_path / KEY_FILENAME).chmod(0o600)  # a looser file is refused for that first (test_key_files.py)
    with pytest.raises(ValueError, match="not a PEM private key"):
        load_or_create_signing_key(tmp_path)
    assert (tmp_path / KEY_FILENAME).read_bytes() == b"garbage"


def test_encrypted_key_is_reported(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    (tmp_path / KEY_FILENAME).write_bytes(pem)
    (tmp_path / KEY_FILENAME).chmod(0o600)
    with pytest.raises(ValueError, match="encrypted"):
        load_or_create_signing_key(tmp_path)


# --- public keys and fingerprints ------------------------------------------------------------------------------


def test_fingerprint_definition(key: Ed25519PrivateKey) -> None:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert fingerprint(key.public_key()) == "SHA256:" + hashlib.sha256(raw).hexdigest()
    assert fingerprint(key) == fingerprint(key.public_key())


def test_load_public_key_liberal_formats(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    pub = key.public_key()
    fp = fingerprint(pub)
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ssh = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pem = public_key_pem(pub)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    sources: list[object] = [
        pem,
        pem.decode(),
        raw,
        base64.b64encode(raw),
        base64.b64encode(raw).decode() + "\n",
        raw.hex(),
        der,
        base64.b64encode(der),
        ssh,
        ssh.decode() + " comment",
    ]
    (tmp_path / "pub.pem").write_bytes(pem)
    (tmp_path / "pub.b64").write_bytes(base64.b64encode(raw) + b"\n")
    sources += [tmp_path / "pub.pem", str(tmp_path / "pub.pem"), tmp_path / "pub.b64"]
    for src in sources:
        assert fingerprint(load_public_key(src)) == fp, src  # type: ignore[arg-type]


def test_load_public_key_errors(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="private key"):
        load_public_key(private_pem)
    for bad in (
        b"",
        b"hello",
        b"x" * 31,
        base64.b64encode(b"x" * 31),
        "no/such/file.pem",
        tmp_path / "missing",
    ):
        with pytest.raises(ValueError):
            load_public_key(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        load_public_key("a" * 32)  # a 32-character string is a path or text, never raw key bytes
    with pytest.raises(TypeError):
        load_public_key(123)  # type: ignore[arg-type]


# --- tree heads ---------------------------------------------------------------------------------------------------


def test_exact_signed_message(sth: SignedTreeHead, key: Ed25519PrivateKey) -> None:
    expected = (
        "fgtrac-sth/v1\n"
        "run-2026-11-23\n"
        "1234\n"
        f"{base64.b64encode(ROOT).decode()}\n"
        f"{base64.b64encode(HEAD).decode()}\n"
        "2026-11-23T12:00:00Z\n"
    ).encode()
    assert sth.message() == expected
    assert tree_head_message("run-2026-11-23", 1234, ROOT, HEAD, TS) == expected
    key.public_key().verify(sth.signature, expected)  # raises if the signature is not over these bytes
    assert sth.key_fingerprint == fingerprint(key)
    assert len(sth.signature) == 64


def test_sign_verify_round_trip(sth: SignedTreeHead, key: Ed25519PrivateKey) -> None:
    assert verify_tree_head(sth, key.public_key())
    again = SignedTreeHead.from_json_dict(sth.to_json_dict())
    assert again == sth
    assert verify_tree_head(again, key.public_key())


def test_empty_tree_and_unicode_run_id(key: Ed25519PrivateKey) -> None:
    from fgtrac_core.ledger.chain import GENESIS
    from fgtrac_core.ledger.merkle import EMPTY_ROOT

    sth = sign_tree_head(key, "prüfung-日本", 0, EMPTY_ROOT, GENESIS, TS)
    assert verify_tree_head(sth, key.public_key())
    assert b"\n0\n" in sth.message()


def test_default_and_datetime_timestamps(key: Ed25519PrivateKey) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    sth = sign_tree_head(key, "r", 1, ROOT, HEAD)
    stamped = datetime.strptime(sth.timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before <= stamped <= datetime.now(UTC)
    cet = timezone(timedelta(hours=1))
    sth2 = sign_tree_head(key, "r", 1, ROOT, HEAD, datetime(2026, 11, 23, 13, 0, 0, 999, tzinfo=cet))
    assert sth2.timestamp == TS
    assert utc_timestamp(datetime(2026, 11, 23, 12, 0, tzinfo=UTC)) == TS
    with pytest.raises(ValueError, match="timezone"):
        sign_tree_head(key, "r", 1, ROOT, HEAD, datetime(2026, 11, 23, 12, 0))


def test_wrong_key_fails(sth: SignedTreeHead, key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    assert not verify_tree_head(sth, other.public_key())
    # Even with the fingerprint swapped to match the other key, the signature does not verify.
    forged = dataclasses.replace(sth, key_fingerprint=fingerprint(other))
    assert not verify_tree_head(forged, other.public_key())
    # A signature made by the other key over the same message does not verify against the real key.
    resigned = dataclasses.replace(sth, signature=other.sign(sth.message()))
    assert not verify_tree_head(resigned, key.public_key())
    assert verify_tree_head(
        dataclasses.replace(resigned, key_fingerprint=fingerprint(other)), other.public_key()
    )


def _variants_of_str(s: str) -> list[str]:
    out = []
    for i, ch in enumerate(s):
        for repl in {"0", "1", "a", "Z", "-", ":"} - {ch}:
            out.append(s[:i] + repl + s[i + 1 :])
    return out


def _variants_of_bytes(b: bytes) -> list[bytes]:
    out = []
    for i in range(len(b)):
        for x in (0x01, 0x80):
            out.append(b[:i] + bytes([b[i] ^ x]) + b[i + 1 :])
    return out


def test_any_single_change_in_any_field_fails(sth: SignedTreeHead, key: Ed25519PrivateKey) -> None:
    pub = key.public_key()
    changes: list[dict[str, object]] = []
    changes += [{"run_id": v} for v in _variants_of_str(sth.run_id)]
    changes += [{"run_id": sth.run_id + "x"}, {"run_id": sth.run_id[:-1]}]
    changes += [{"tree_size": v} for v in (0, 1233, 1235, 2468, 617, 12340, 2**64 + 1234)]
    changes += [{"root": v} for v in _variants_of_bytes(sth.root)]
    changes += [{"root": HEAD}, {"chain_head": ROOT}]
    changes += [{"chain_head": v} for v in _variants_of_bytes(sth.chain_head)]
    changes += [{"timestamp": v} for v in _variants_of_str(sth.timestamp)]
    changes += [{"key_fingerprint": v} for v in _variants_of_str(sth.key_fingerprint)]
    changes += [{"signature": v} for v in _variants_of_bytes(sth.signature)]
    rejected_at_construction = 0
    for change in changes:
        try:
            tampered = dataclasses.replace(sth, **change)  # type: ignore[arg-type]
        except ValueError:
            rejected_at_construction += 1  # malformed values cannot even form a tree head
            continue
        assert not verify_tree_head(tampered, pub), change
    assert rejected_at_construction < len(changes) // 2  # most changes reached the signature check


def test_verify_never_raises_on_garbage(key: Ed25519PrivateKey) -> None:
    assert not verify_tree_head("not an sth", key.public_key())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        verify_tree_head(sign_tree_head(key, "r", 1, ROOT, HEAD, TS), "key")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"run_id": ""}, "run_id"),
        ({"run_id": "a\nb"}, "control"),
        ({"run_id": 5}, "run_id"),
        ({"tree_size": -1}, "tree_size"),
        ({"tree_size": True}, "tree_size"),
        ({"tree_size": "12"}, "tree_size"),
        ({"tree_size": 1.0}, "tree_size"),
        ({"root": "00" * 31}, "root"),
        ({"root": "00" * 33}, "root"),
        ({"root": "zz" * 32}, "root"),
        ({"root": "0x" + "00" * 31}, "root"),
        ({"root": " " + "0" * 63}, "root"),
        ({"root": bytes(32)}, "root"),
        ({"chain_head": "0" * 63}, "chain_head"),
        ({"signature": "00" * 63}, "signature"),
        ({"signature": None}, "signature"),
        ({"timestamp": "2026-11-23 12:00:00Z"}, "timestamp"),
        ({"timestamp": "2026-11-23T12:00:00+00:00"}, "timestamp"),
        ({"timestamp": "2026-11-23T12:00:00.5Z"}, "timestamp"),
        ({"timestamp": "2026-02-30T12:00:00Z"}, "timestamp"),
        ({"timestamp": "2026-11-23T12:00:00\u0660Z"}, "timestamp"),
        ({"key_fingerprint": "SHA256:" + "A" * 64}, "key_fingerprint"),
        ({"key_fingerprint": "sha256:" + "a" * 64}, "key_fingerprint"),
        ({"key_fingerprint": "SHA256:" + "a" * 63}, "key_fingerprint"),
        ({"format": "fgtrac-sth/v2"}, "format"),
        ({"extra": 1}, "unknown"),
    ],
)
def test_from_json_dict_rejects_malformed(sth: SignedTreeHead, change: dict, message: str) -> None:
    d = sth.to_json_dict() | change
    with pytest.raises(ValueError, match=message):
        SignedTreeHead.from_json_dict(d)


@pytest.mark.parametrize(
    "field", ["run_id", "tree_size", "root", "chain_head", "timestamp", "key_fingerprint", "signature"]
)
def test_from_json_dict_missing_field(sth: SignedTreeHead, field: str) -> None:
    d = sth.to_json_dict()
    del d[field]
    with pytest.raises(ValueError, match=f"missing field.*{field}"):
        SignedTreeHead.from_json_dict(d)


def test_from_json_dict_other_cases(sth: SignedTreeHead) -> None:
    with pytest.raises(ValueError, match="JSON object"):
        SignedTreeHead.from_json_dict(["x"])  # type: ignore[arg-type]
    d = sth.to_json_dict()
    del d["format"]
    assert SignedTreeHead.from_json_dict(d) == sth  # format is optional
    upper = sth.to_json_dict() | {"root": sth.root.hex().upper()}
    assert SignedTreeHead.from_json_dict(upper) == sth


def test_sign_rejects_bad_arguments(key: Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError, match="root"):
        sign_tree_head(key, "r", 1, ROOT[:31], HEAD, TS)
    with pytest.raises(ValueError, match="timestamp"):
        sign_tree_head(key, "r", 1, ROOT, HEAD, "yesterday")
    with pytest.raises(ValueError, match="run_id"):
        sign_tree_head(key, "line1\nline2", 1, ROOT, HEAD, TS)
    with pytest.raises(TypeError):
        sign_tree_head(key.public_key(), "r", 1, ROOT, HEAD, TS)  # type: ignore[arg-type]


def test_base64_text_starting_with_zero_is_not_taken_for_der() -> None:
    """44 bytes of base64 text beginning with "0" (0x30, DER's first byte) still parse as base64 of the raw key."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    raw = base64.b64decode(b"0" + b"A" * 42 + b"=")  # 32 bytes whose base64 starts with "0"
    pub = Ed25519PublicKey.from_public_bytes(raw)
    assert fingerprint(load_public_key(base64.b64encode(raw))) == fingerprint(pub)
