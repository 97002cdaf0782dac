"""Ed25519 signing keys and signed tree heads (STH).

Key management: the private key lives outside every run directory, in :func:`default_key_dir`, as
``signing_key.pem`` (PKCS#8 PEM, unencrypted, mode 0600; the directory is created with mode 0700).  A key
stored inside a run would prove nothing against someone able to rewrite the run.  A key file that group or others
may access, or a key directory that group or others may write (where the key could be swapped), is refused with
:class:`KeyFileError`, as is an empty or corrupt key file; :func:`load_signing_key` never creates a key (an
existing run must not be re-keyed), :func:`load_or_create_signing_key` creates one for a new run.

Key fingerprint: ``"SHA256:" + hex(SHA-256(raw 32-byte Ed25519 public key))``, lowercase hex.

Signed message of a tree head (UTF-8, each line ends in ``"\\n"``, no other whitespace), in the spirit of a
transparency-dev/formats log checkpoint::

    fgtrac-sth/v1
    <run_id>
    <tree_size in decimal, no leading zeros>
    <root, standard base64 with padding>
    <chain_head, standard base64 with padding>
    <timestamp, RFC 3339 UTC with second precision, e.g. 2026-11-23T12:00:00Z>

The Ed25519 signature (RFC 8032, pure Ed25519) is over exactly these bytes.  The key fingerprint is not
part of the message; :func:`verify_tree_head` requires it to equal the verifying key's fingerprint.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
import secrets
import shlex
import stat
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "KEY_FILENAME",
    "STH_FORMAT",
    "KeyFileError",
    "MissingKeyError",
    "SignedTreeHead",
    "default_key_dir",
    "fingerprint",
    "load_or_create_signing_key",
    "load_signing_key",
    "load_public_key",
    "public_key_pem",
    "sign_tree_head",
    "tree_head_message",
    "utc_timestamp",
    "verify_tree_head",
]

#: First line of the signed message and value of the ``"format"`` field of an STH's JSON form.
STH_FORMAT = "fgtrac-sth/v1"
#: File name of the private key inside the key directory.
KEY_FILENAME = "signing_key.pem"

_HASH_SIZE = 32
_SIG_SIZE = 64
_TIMESTAMP_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_FINGERPRINT_RE = re.compile(r"SHA256:[0-9a-f]{64}")
_HEX_RE = re.compile(r"[0-9a-fA-F]*")
_JSON_FIELDS = ("run_id", "tree_size", "root", "chain_head", "timestamp", "key_fingerprint", "signature")


# --------------------------------------------------------------------------------------------------- keys


class KeyFileError(ValueError):
    """A signing key file or key directory that fgtrac refuses to use; the message is one line naming the path
    and the fix."""


class MissingKeyError(KeyFileError):
    """The key directory holds no signing key (raised by :func:`load_signing_key`, which never creates one)."""


def default_key_dir() -> Path:
    """Return the key directory: ``$FGTRAC_KEY_DIR``, else ``$XDG_CONFIG_HOME/fgtrac``, else ``~/.config/fgtrac``.

    Empty variables count as unset; a relative ``XDG_CONFIG_HOME`` is ignored (XDG base directory spec).
    """
    explicit = os.environ.get("FGTRAC_KEY_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "fgtrac"
    return Path.home() / ".config" / "fgtrac"


def _who(mode: int) -> str:
    return " and ".join(w for w, bits in (("group", 0o070), ("others", 0o007)) if mode & bits)


def _check_key_dir(directory: Path) -> None:
    """Refuse a key directory that group or others may write: whoever can write there can swap the key."""
    if os.name == "nt":
        return
    try:
        mode = stat.S_IMODE(directory.stat().st_mode)
    except OSError as exc:
        raise KeyFileError(f"{directory}: cannot read the key directory ({exc.strerror or exc})") from None
    if mode & 0o022:
        raise KeyFileError(
            f"{directory} (the signing key directory) is writable by {_who(mode & 0o022)} (mode {mode:04o}); "
            f"run: chmod go-w {shlex.quote(str(directory))}"
        )


def _load_private_key_file(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted PKCS#8 PEM Ed25519 private key that only its owner may access, or raise
    :class:`KeyFileError` with a one-line message."""
    quoted = shlex.quote(str(path))
    try:
        if os.name != "nt":
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                raise KeyFileError(
                    f"{path} is {'readable' if mode & 0o044 else 'accessible'} by {_who(mode & 0o077)} "
                    f"(mode {mode:04o}); run: chmod 600 {quoted}"
                )
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the signing key ({exc.strerror or exc})") from None
    if not data.strip():
        raise KeyFileError(
            f"{path} is empty: restore the signing key from a backup (or move the file away to create a new key "
            "for new runs)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"{path}: the signing key is encrypted; fgtrac needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise KeyFileError(f"{path}: not a PEM private key ({detail}); restore it from a backup") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: the signing key is {type(key).__name__}, expected Ed25519")
    return key


def _fsync_dir(path: Path) -> None:
    """Best-effort fsync of a directory so a new file name survives a crash."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_signing_key(key_dir: str | os.PathLike[str] | None = None) -> Ed25519PrivateKey:
    """Return the Ed25519 signing key in ``key_dir`` (default :func:`default_key_dir`); never creates one.

    Raises :class:`MissingKeyError` when there is no key file, :class:`KeyFileError` when the key file may be
    accessed by group or others, the directory written by them, or the file is empty, corrupt, encrypted or not
    Ed25519.
    """
    directory = Path(key_dir).expanduser() if key_dir is not None else default_key_dir()
    path = directory / KEY_FILENAME
    if not path.exists() and not path.is_symlink():
        raise MissingKeyError(f"{directory} holds no signing key ({KEY_FILENAME})")
    _check_key_dir(directory)
    return _load_private_key_file(path)


def load_or_create_signing_key(key_dir: str | os.PathLike[str] | None = None) -> Ed25519PrivateKey:
    """Return the Ed25519 signing key in ``key_dir`` (default :func:`default_key_dir`), creating it once.

    For new runs only: a run that already exists loads its key with :func:`load_signing_key`, which never
    creates one.

    On first use the directory is created with mode 0700 and ``signing_key.pem`` is written atomically:
    a temporary file is created with ``O_EXCL`` and mode 0600, synced, then hard-linked to the final name,
    which fails rather than overwrite a key that appeared meanwhile.  An existing key is never replaced;
    if two processes race, both return the key that won.  Raises :class:`KeyFileError` (a ``ValueError``)
    as :func:`load_signing_key` does, and for a directory that group or others may write.
    """
    directory = Path(key_dir).expanduser() if key_dir is not None else default_key_dir()
    path = directory / KEY_FILENAME
    if path.exists() or path.is_symlink():
        return load_signing_key(directory)

    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    _check_key_dir(directory)

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = directory / f".{KEY_FILENAME}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never overwrites: FileExistsError if another process won the race
        except FileExistsError:
            pass
        except OSError:
            # File systems without hard links: fall back to a rename unless the key appeared meanwhile.
            if not path.exists():
                os.rename(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(directory)
    return _load_private_key_file(path)


def _as_public(key: Ed25519PublicKey | Ed25519PrivateKey) -> Ed25519PublicKey:
    """Return the public half of an Ed25519 key, or raise ``TypeError`` for other objects."""
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    if isinstance(key, Ed25519PublicKey):
        return key
    raise TypeError(f"expected an Ed25519 public key, got {type(key).__name__}")


def public_key_pem(pub: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """Return the public key as SubjectPublicKeyInfo PEM (``-----BEGIN PUBLIC KEY-----``)."""
    return _as_public(pub).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _raw_public_bytes(pub: Ed25519PublicKey) -> bytes:
    """Return the raw 32-byte encoding of an Ed25519 public key (RFC 8032)."""
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(pub: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Return ``"SHA256:" + lowercase hex SHA-256 of the raw 32-byte public key``."""
    return "SHA256:" + hashlib.sha256(_raw_public_bytes(_as_public(pub))).hexdigest()


def _parse_public_key(data: bytes, origin: str, binary: bool = True) -> Ed25519PublicKey:
    """Parse PEM, OpenSSH, hex/base64 text of raw or DER, and (if ``binary``) raw 32 bytes or DER."""
    text = data.strip()
    key: object
    try:
        if text.startswith(b"-----BEGIN"):
            if b"PRIVATE KEY" in text.split(b"\n", 1)[0]:
                raise ValueError(f"{origin}: this is a private key; pass the public key instead")
            key = serialization.load_pem_public_key(text)
        elif text.startswith(b"ssh-ed25519 "):
            key = serialization.load_ssh_public_key(text)
        elif binary and len(data) == _HASH_SIZE:
            key = Ed25519PublicKey.from_public_bytes(data)
        # DER SubjectPublicKeyInfo of Ed25519 starts 30 2a; checking both bytes keeps 44 characters of base64 text
        # that happen to start with "0" (0x30) out of this branch
        elif binary and data[:2] == b"\x30\x2a" and len(data) == 44:
            key = serialization.load_der_public_key(data)
        else:
            raw: bytes | None = None
            if len(text) == 2 * _HASH_SIZE and _HEX_RE.fullmatch(text.decode("ascii", "replace")):
                raw = bytes.fromhex(text.decode("ascii"))
            else:
                with contextlib.suppress(binascii.Error, ValueError):
                    raw = base64.b64decode(b"".join(text.split()), validate=True)
            if raw is not None and len(raw) == _HASH_SIZE:
                key = Ed25519PublicKey.from_public_bytes(raw)
            elif raw is not None and raw[:1] == b"\x30":
                key = serialization.load_der_public_key(raw)
            else:
                raise ValueError(
                    f"{origin}: not an Ed25519 public key (expected PEM, 'ssh-ed25519 ...', raw 32 bytes, "
                    "or 32 bytes as base64 or hex)"
                )
    except (UnsupportedAlgorithm, binascii.Error) as exc:
        raise ValueError(f"{origin}: cannot parse public key ({exc})") from None
    except ValueError as exc:
        if str(exc).startswith(origin):
            raise
        raise ValueError(f"{origin}: cannot parse public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{origin}: the public key is {type(key).__name__}, expected Ed25519")
    return key


def load_public_key(source: str | os.PathLike[str] | bytes) -> Ed25519PublicKey:
    """Load an Ed25519 public key, liberally.

    ``bytes`` are key material: PEM (SubjectPublicKeyInfo), an OpenSSH ``ssh-ed25519`` line, DER, the raw
    32-byte key, or the raw key as base64 (standard alphabet) or hex text.  A ``str``/path names a file
    holding any of these; a ``str`` that itself looks like PEM, OpenSSH or base64/hex key text is parsed
    directly when no such file exists.  Raises ``ValueError`` with the reason otherwise.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        return _parse_public_key(bytes(source), "public key")
    if isinstance(source, str):
        stripped = source.strip()
        if stripped.startswith(("-----BEGIN", "ssh-ed25519 ")):
            return _parse_public_key(stripped.encode("utf-8"), "public key", binary=False)
        if stripped and os.path.isfile(source):
            return _parse_public_key(Path(source).read_bytes(), source)
        try:
            return _parse_public_key(stripped.encode("utf-8"), "public key", binary=False)
        except ValueError:
            raise ValueError(
                f"{source!r} is neither a readable key file nor Ed25519 public key text"
            ) from None
    if isinstance(source, os.PathLike):
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read public key file ({exc.strerror})") from None
        return _parse_public_key(data, str(path))
    raise TypeError(f"expected bytes, str or a path, got {type(source).__name__}")


# ------------------------------------------------------------------------------------------ tree heads


def utc_timestamp(when: datetime | None = None) -> str:
    """Return ``when`` (default: now) as RFC 3339 UTC with second precision, e.g. ``2026-11-23T12:00:00Z``.

    A naive ``datetime`` is rejected with ``ValueError`` (its time zone is unknown).
    """
    if when is None:
        when = datetime.now(UTC)
    elif when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("timestamp datetime must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_timestamp(ts: object) -> str:
    """Return ``ts`` if it is an RFC 3339 UTC second-precision timestamp ending in ``Z``, else raise."""
    if not isinstance(ts, str) or not _TIMESTAMP_RE.fullmatch(ts):
        raise ValueError(f"timestamp {ts!r} is not of the form YYYY-MM-DDTHH:MM:SSZ (UTC, whole seconds)")
    try:
        datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise ValueError(f"timestamp {ts!r} is not a valid date and time") from None
    return ts


def _check_run_id(run_id: object) -> str:
    """Return ``run_id`` if it is a non-empty string with no control characters or surrogates."""
    if not isinstance(run_id, str) or not run_id:
        raise ValueError("run_id must be a non-empty string")
    for ch in run_id:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise ValueError(f"run_id contains the control or surrogate character U+{ord(ch):04X}")
    return run_id


def _check_bytes(value: object, size: int, name: str) -> bytes:
    """Return ``value`` as ``bytes`` if it is bytes-like of exactly ``size`` bytes."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ValueError(f"{name} must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
    return value


def _check_size(tree_size: object) -> int:
    """Return ``tree_size`` if it is a non-negative ``int`` (not ``bool``)."""
    if not isinstance(tree_size, int) or isinstance(tree_size, bool) or tree_size < 0:
        raise ValueError(f"tree_size must be a non-negative integer, got {tree_size!r}")
    return int(tree_size)


def tree_head_message(run_id: str, tree_size: int, root: bytes, chain_head: bytes, timestamp: str) -> bytes:
    """Return the exact bytes an STH signature covers (see the module docstring)."""
    lines = (
        STH_FORMAT,
        _check_run_id(run_id),
        str(_check_size(tree_size)),
        base64.b64encode(_check_bytes(root, _HASH_SIZE, "root")).decode("ascii"),
        base64.b64encode(_check_bytes(chain_head, _HASH_SIZE, "chain_head")).decode("ascii"),
        _check_timestamp(timestamp),
    )
    return "".join(line + "\n" for line in lines).encode("utf-8")


@dataclass(frozen=True)
class SignedTreeHead:
    """A signed statement that run ``run_id`` had ``tree_size`` entries with this Merkle root and chain head.

    All fields are validated on construction (``ValueError`` on a malformed value).
    """

    run_id: str
    tree_size: int
    root: bytes
    chain_head: bytes
    timestamp: str
    key_fingerprint: str
    signature: bytes

    def __post_init__(self) -> None:
        """Validate and normalise the fields."""
        _check_run_id(self.run_id)
        _check_size(self.tree_size)
        object.__setattr__(self, "root", _check_bytes(self.root, _HASH_SIZE, "root"))
        object.__setattr__(self, "chain_head", _check_bytes(self.chain_head, _HASH_SIZE, "chain_head"))
        _check_timestamp(self.timestamp)
        if not isinstance(self.key_fingerprint, str) or not _FINGERPRINT_RE.fullmatch(self.key_fingerprint):
            raise ValueError(
                f"key_fingerprint {self.key_fingerprint!r} is not 'SHA256:' + 64 lowercase hex digits"
            )
        object.__setattr__(self, "signature", _check_bytes(self.signature, _SIG_SIZE, "signature"))

    def message(self) -> bytes:
        """Return the bytes the signature covers."""
        return tree_head_message(self.run_id, self.tree_size, self.root, self.chain_head, self.timestamp)

    def to_json_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (bytes as lowercase hex, plus ``"format": "fgtrac-sth/v1"``)."""
        return {
            "format": STH_FORMAT,
            "run_id": self.run_id,
            "tree_size": self.tree_size,
            "root": self.root.hex(),
            "chain_head": self.chain_head.hex(),
            "timestamp": self.timestamp,
            "key_fingerprint": self.key_fingerprint,
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> SignedTreeHead:
        """Rebuild an STH from :meth:`to_json_dict` output; ``ValueError`` with the reason if malformed.

        ``"format"`` may be absent but, if present, must be ``"fgtrac-sth/v1"``; unknown keys are rejected.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"signed tree head must be a JSON object, got {type(d).__name__}")
        missing = [f for f in _JSON_FIELDS if f not in d]
        if missing:
            raise ValueError(f"signed tree head is missing field(s): {', '.join(missing)}")
        unknown = sorted(str(k) for k in d if k not in _JSON_FIELDS and k != "format")
        if unknown:
            raise ValueError(f"signed tree head has unknown field(s): {', '.join(unknown)}")
        if "format" in d and d["format"] != STH_FORMAT:
            raise ValueError(f"signed tree head format {d['format']!r} is not {STH_FORMAT!r}")

        def unhex(name: str, size: int) -> bytes:
            value = d[name]
            if not isinstance(value, str) or len(value) != 2 * size or not _HEX_RE.fullmatch(value):
                raise ValueError(
                    f"signed tree head field {name!r} must be {2 * size} hex digits ({size} bytes)"
                )
            return bytes.fromhex(value)

        try:
            return cls(
                run_id=d["run_id"],
                tree_size=d["tree_size"],
                root=unhex("root", _HASH_SIZE),
                chain_head=unhex("chain_head", _HASH_SIZE),
                timestamp=d["timestamp"],
                key_fingerprint=d["key_fingerprint"],
                signature=unhex("signature", _SIG_SIZE),
            )
        except ValueError as exc:
            raise ValueError(f"malformed signed tree head: {exc}") from None


def sign_tree_head(
    key: Ed25519PrivateKey,
    run_id: str,
    tree_size: int,
    root: bytes,
    chain_head: bytes,
    timestamp: str | datetime | None = None,
) -> SignedTreeHead:
    """Sign a tree head with ``key``; ``timestamp`` defaults to now (a ``datetime`` must be timezone-aware)."""
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"expected an Ed25519 private key, got {type(key).__name__}")
    ts = utc_timestamp(timestamp) if timestamp is None or isinstance(timestamp, datetime) else timestamp
    message = tree_head_message(run_id, tree_size, root, chain_head, ts)
    return SignedTreeHead(
        run_id=run_id,
        tree_size=tree_size,
        root=bytes(root),
        chain_head=bytes(chain_head),
        timestamp=ts,
        key_fingerprint=fingerprint(key.public_key()),
        signature=key.sign(message),
    )


def verify_tree_head(sth: SignedTreeHead, public_key: Ed25519PublicKey) -> bool:
    """Return ``True`` iff ``sth`` carries ``public_key``'s fingerprint and a valid signature by it.

    Never raises for a bad or forged tree head; raises ``TypeError`` only if ``public_key`` is not an
    Ed25519 key.
    """
    pub = _as_public(public_key)
    if not isinstance(sth, SignedTreeHead):
        return False
    if sth.key_fingerprint != fingerprint(pub):
        return False
    try:
        pub.verify(sth.signature, sth.message())
    except (InvalidSignature, ValueError):
        return False
    return True
