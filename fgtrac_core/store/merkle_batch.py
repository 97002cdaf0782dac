"""RFC 9162 hashing of many leaves at once: leaf hashes of fixed-width rows, and the roots of many trees.

`fgtrac_core.ledger.merkle` is the reference (pure Python, one tree at a time, what an offline checker runs); this
module computes the same hashes with NumPy arrays around the SHA-256 calls, for the places that hash millions of
leaves per call (the usage index: one tree per sample over its uses, then one over the samples).  Only the hash
calls remain a Python loop (hashlib has no batch API; ~0.5 us each here); building the leaf bytes, grouping and
pairing are array operations.  Tested equal to the reference.
"""

from __future__ import annotations

import hashlib

import numpy as np

from fgtrac_core.ledger.merkle import EMPTY_ROOT, HASH_SIZE

_EMPTY = np.frombuffer(EMPTY_ROOT, np.uint8)


def digests(rows: np.ndarray) -> np.ndarray:
    """SHA-256 of every row of an (n, w) uint8 array, as an (n, 32) uint8 array."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    n, w = rows.shape
    data = memoryview(rows.reshape(-1))
    sha = hashlib.sha256
    out = b"".join([sha(data[i : i + w]).digest() for i in range(0, n * w, w)])
    return np.frombuffer(out, np.uint8).reshape(n, HASH_SIZE)


def leaf_hashes(rows: np.ndarray, *, repeated: bool = False) -> np.ndarray:
    """RFC 9162 leaf hashes ``SHA-256(0x00 || row)`` of the rows of an (n, w) uint8 array, as (n, 32).

    `repeated`: the rows repeat (a sample's id in every batch it was used in), so each distinct row is hashed
    once — the hash calls are the cost (~0.45 us each, sorting the rows ~0.05 us)."""
    n, w = rows.shape
    if repeated and n:
        distinct, inverse = _distinct_rows(rows)
        return leaf_hashes(distinct)[inverse]
    prefixed = np.zeros((n, w + 1), np.uint8)
    prefixed[:, 1:] = rows
    return digests(prefixed)


def _distinct_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows, for each row the index of its distinct row) of an (n, w) uint8 array; rows of whole 8-byte
    words are sorted as integers (several times faster than as byte strings)."""
    n, w = rows.shape
    rows = np.ascontiguousarray(rows, np.uint8)
    if w % 8:
        distinct, inverse = np.unique(rows.view(f"V{w}")[:, 0], return_inverse=True)
        return distinct.view(np.uint8).reshape(len(distinct), w), inverse.reshape(-1)
    words = rows.view("<u8")
    order = np.lexsort(words.T[::-1])
    ordered = words[order]
    first = np.r_[True, (ordered[1:] != ordered[:-1]).any(1)]
    inverse = np.empty(n, np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first].view(np.uint8).reshape(-1, w), inverse


def forest_roots(hashes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The Merkle tree hash of each of consecutive groups of leaf hashes, as a (len(lengths), 32) uint8 array.

    `hashes` is (sum(lengths), 32): group g's leaf hashes follow group g-1's.  An empty group gets the empty-tree
    hash.  All trees advance one level per pass (``n`` leaves pair into ``n // 2`` nodes, an odd last one moves up
    as is), which equals RFC 9162's recursive definition (see `fgtrac_core.ledger.merkle._root`).
    """
    lengths = np.asarray(lengths, np.int64)
    out = np.empty((len(lengths), HASH_SIZE), np.uint8)
    out[lengths == 0] = _EMPTY
    nonempty = lengths > 0
    level, n = np.asarray(hashes, np.uint8).reshape(-1, HASH_SIZE), lengths[nonempty]
    if len(level) != int(n.sum()):
        raise ValueError(f"{len(level)} leaf hashes for groups of {int(n.sum())}")
    while len(n) and n.max() > 1:
        rank = np.arange(len(level)) - np.repeat(np.cumsum(n) - n, n)  # position in its group
        size = np.repeat(n, n)
        parent_n = (n + 1) // 2
        parent = np.repeat(np.cumsum(parent_n) - parent_n, n) + rank // 2
        nxt = np.empty((int(parent_n.sum()), HASH_SIZE), np.uint8)
        left = np.flatnonzero((rank % 2 == 0) & (rank + 1 < size))
        pairs = np.empty((len(left), 1 + 2 * HASH_SIZE), np.uint8)
        pairs[:, 0] = 1
        pairs[:, 1 : 1 + HASH_SIZE] = level[left]
        pairs[:, 1 + HASH_SIZE :] = level[left + 1]
        nxt[parent[left]] = digests(pairs)
        odd_last = np.flatnonzero((rank % 2 == 0) & (rank + 1 == size))
        nxt[parent[odd_last]] = level[odd_last]
        level, n = nxt, parent_n
    out[nonempty] = level
    return out


def runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of each run of equal keys in `sorted_keys` (grouped rows: one tree per run)."""
    if not len(sorted_keys):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return starts, np.diff(np.r_[starts, len(sorted_keys)])


def tree_root(hashes: np.ndarray) -> bytes:
    """The Merkle tree hash of one tree of (n, 32) leaf hashes."""
    return forest_roots(hashes, np.array([len(hashes)]))[0].tobytes()


def big_endian(values: np.ndarray, dtype: str) -> np.ndarray:
    """(n, itemsize) uint8: each value's big-endian bytes in `dtype` (e.g. '>i8' for 8-byte signed)."""
    out = np.ascontiguousarray(values).astype(dtype)
    return out.view(np.uint8).reshape(len(out), out.dtype.itemsize)


def hex_rows(rows: np.ndarray) -> list[str]:
    """The rows of an (n, w) uint8 array as hex strings."""
    return [r.hex() for r in rows_as_bytes(rows)]


def rows_as_bytes(rows: np.ndarray) -> list[bytes]:
    """The rows of an (n, w) uint8 array as a list of bytes."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    w = rows.shape[1]
    data = rows.tobytes()
    return [data[i : i + w] for i in range(0, len(data), w)]
