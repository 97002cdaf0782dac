"""Hash chain over leaf hashes: ``c_0 = GENESIS``, ``c_i = SHA-256(c_{i-1} || leaf_hash_i)``.

``GENESIS`` is 32 zero bytes.  For leaves numbered from 0 (row ``i`` of a table is leaf ``i``), the chain
value stored next to row ``i`` is ``c_{i+1}``, the chain after that row's leaf hash has been absorbed; the
chain head of a log of ``n`` leaves is ``c_n`` (``GENESIS`` when ``n == 0``).

The chain complements the Merkle tree: it pins the exact order of everything recorded, so the first
altered, inserted or deleted leaf is found by recomputing the chain and comparing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

__all__ = ["GENESIS", "chain_hashes", "chain_head", "chain_step", "first_chain_mismatch"]

#: Chain value before any leaf: 32 zero bytes.
GENESIS = bytes(32)

_sha256 = hashlib.sha256
_HASH_SIZE = 32


def _check(h: object, what: str) -> bytes:
    """Return ``h`` as bytes if it is 32 bytes long, else raise ``ValueError`` naming ``what``."""
    if not isinstance(h, bytes | bytearray) or len(h) != _HASH_SIZE:
        raise ValueError(f"{what} is not {_HASH_SIZE} bytes")
    return bytes(h)


def chain_step(prev: bytes, leaf_hash: bytes) -> bytes:
    """Return ``SHA-256(prev || leaf_hash)``, the chain value after absorbing one leaf hash."""
    return _sha256(_check(prev, "previous chain value") + _check(leaf_hash, "leaf hash")).digest()


def chain_hashes(leaf_hashes: Iterable[bytes], start: bytes = GENESIS) -> list[bytes]:
    """Return ``[c_1, ..., c_n]``: the chain value after each leaf hash, starting from ``start``."""
    c = _check(start, "chain start")
    sha = _sha256
    out: list[bytes] = []
    append = out.append
    for i, h in enumerate(leaf_hashes):
        if len(h) != _HASH_SIZE:
            raise ValueError(f"leaf hash {i} is not {_HASH_SIZE} bytes")
        c = sha(c + h).digest()
        append(c)
    return out


def chain_head(leaf_hashes: Iterable[bytes], start: bytes = GENESIS) -> bytes:
    """Return ``c_n``, the chain value after all leaf hashes (``start`` itself if there are none).

    ``start`` lets a caller resume from a stored chain value instead of rehashing from genesis.
    """
    c = _check(start, "chain start")
    sha = _sha256
    for i, h in enumerate(leaf_hashes):
        if len(h) != _HASH_SIZE:
            raise ValueError(f"leaf hash {i} is not {_HASH_SIZE} bytes")
        c = sha(c + h).digest()
    return c


def first_chain_mismatch(
    leaf_hashes: Sequence[bytes], stored_chain: Sequence[bytes], start: bytes = GENESIS
) -> int | None:
    """Return the first 0-based leaf index whose stored chain value differs from the recomputed one.

    ``stored_chain[i]`` is compared with the recomputed ``c_{i+1}``.  If all common positions agree but the
    lengths differ, the index of the first position present in only one list (the shorter length) is
    returned.  ``None`` means the stored chain matches exactly.
    """
    c = _check(start, "chain start")
    sha = _sha256
    n = min(len(leaf_hashes), len(stored_chain))
    for i in range(n):
        h = leaf_hashes[i]
        if len(h) != _HASH_SIZE:
            raise ValueError(f"leaf hash {i} is not {_HASH_SIZE} bytes")
        c = sha(c + h).digest()
        if c != stored_chain[i]:
            return i
    if len(leaf_hashes) != len(stored_chain):
        return n
    return None
