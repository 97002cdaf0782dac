"""Pinned tree heads: a signed tree head a reviewer kept (`fgtrac head RUN --out F`), checked later against the
run's current tree with an RFC 9162 consistency proof, as Certificate Transparency clients do.

Whoever holds the signing key can truncate a run to an earlier point, or re-record a different history, and sign
it again; every check inside the run still passes.  A head kept outside the run catches both: the current tree
must be at least as large as the pinned one, and its first `tree_size` entries must be exactly those the pinned
head signed (the consistency proof from the pinned root to the current root verifies).

The file is the head's JSON (`SignedTreeHead.to_json_dict`, ``"format": "fgtrac-sth/v1"``).  Pure Python.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .merkle import verify_consistency
from .signing import SignedTreeHead, fingerprint, verify_tree_head

MAX_HEAD_FILE_BYTES = 64 * 1024


def read_pinned_head(path: str | os.PathLike[str]) -> SignedTreeHead:
    """The signed tree head in a file written by `fgtrac head`; ValueError naming the file if it is not one."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            data = fh.read(MAX_HEAD_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read pinned head {name}: {exc.strerror or exc}") from None
    if len(data) > MAX_HEAD_FILE_BYTES:
        raise ValueError(f"{name} is too large to be a signed tree head")
    try:
        return SignedTreeHead.from_json_dict(json.loads(data))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{name} is not a signed tree head written by `fgtrac head` ({exc})") from None


def pinned_head_problem(
    pinned: SignedTreeHead,
    key: Ed25519PublicKey,
    *,
    run_id: str,
    tree_size: int,
    root: bytes,
    proof: Sequence[bytes],
    name: str = "the pinned head",
) -> str | None:
    """None when the current tree (`tree_size`, `root`) extends the pinned head; else why not, in one sentence.

    `proof` is the RFC 9162 consistency proof from ``pinned.tree_size`` to `tree_size` (ignored when the pinned
    head is larger).  `key` verifies the pinned head's signature: a head that does not verify is no evidence.
    """
    if not verify_tree_head(pinned, key):
        return f"{name} is not signed by key {fingerprint(key)} (signed by {pinned.key_fingerprint})"
    if pinned.run_id != run_id:
        return f"{name} is for run {pinned.run_id}, not {run_id}"
    if pinned.tree_size > tree_size:
        return (
            f"the run was truncated since {name} (signed {pinned.timestamp}): it then had {pinned.tree_size} "
            f"entries, now {tree_size}"
        )
    if not verify_consistency(pinned.tree_size, tree_size, pinned.root, root, list(proof)):
        return (
            f"the run was rewritten since {name} (signed {pinned.timestamp}): its first {pinned.tree_size} "
            "entries are not the ones that head signed (RFC 9162 consistency proof fails)"
        )
    return None
