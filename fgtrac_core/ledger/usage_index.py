"""The usage index: an authenticated map from sample id to its complete use list, and from content hash to the
samples registered with it, so that "sample X was used exactly n times (here they are)", "X was never used" and
"no file with SHA-256 H was ever registered" are all provable offline.

Committed by a `usage_index` ledger entry (appended when a recording session closes, just before its signed head)
holding two RFC 9162 roots over sorted leaves:

* ``usage_root`` — one leaf per registered sample, ascending by sample id::

      usage leaf = sample_id (8 bytes, big-endian signed) || n_uses (8 bytes, big-endian) || uses_hash (32 bytes)

  where ``uses_hash`` is the SHA-256 of the sample's uses in ledger order, concatenated, one 12-byte record per
  occurrence in a batch: ``batch entry seq (8 bytes BE) || position in the batch (4 bytes BE)`` (the SHA-256 of
  nothing, which is also the empty-tree hash, when the sample was never used).  A plain hash, not a Merkle root: a
  proof of the leaf always lists every use, so a tree would prove nothing more and cost two hashes a use instead
  of one a sample.  Only batch entries with ``seq < ledger_size`` (the entries before the index) count.
* ``content_root`` — one leaf per registered sample, ascending by (content SHA-256, sample id)::

      content leaf = content_sha256 (32 bytes) || sample_id (8 bytes, big-endian signed)

Absence is proven by adjacency: two consecutive leaves (or the first/last leaf) whose keys enclose the missing key,
each with its inclusion proof.  Pure Python: the offline checker uses this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from .merkle import EMPTY_ROOT, leaf_hash, root_from_leaf_hashes, verify_inclusion

USAGE_LEAF_SIZE = 48
CONTENT_LEAF_SIZE = 40


def use_leaf(seq: int, position: int) -> bytes:
    return int(seq).to_bytes(8, "big") + int(position).to_bytes(4, "big")


def uses_hash(uses: Sequence[tuple[int, int]]) -> bytes:
    """SHA-256 over a sample's (batch entry seq, position) use records, which must be in ledger order."""
    return hashlib.sha256(b"".join(use_leaf(s, p) for s, p in uses)).digest()


def usage_leaf(sample_id: int, n_uses: int, root: bytes) -> bytes:
    return int(sample_id).to_bytes(8, "big", signed=True) + int(n_uses).to_bytes(8, "big") + root


def parse_usage_leaf(data: bytes) -> tuple[int, int, bytes]:
    if len(data) != USAGE_LEAF_SIZE:
        raise ValueError(f"a usage leaf is {USAGE_LEAF_SIZE} bytes, not {len(data)}")
    return int.from_bytes(data[:8], "big", signed=True), int.from_bytes(data[8:16], "big"), data[16:]


def content_leaf(content_sha256: str, sample_id: int) -> bytes:
    return bytes.fromhex(content_sha256) + int(sample_id).to_bytes(8, "big", signed=True)


def parse_content_leaf(data: bytes) -> tuple[str, int]:
    if len(data) != CONTENT_LEAF_SIZE:
        raise ValueError(f"a content leaf is {CONTENT_LEAF_SIZE} bytes, not {len(data)}")
    return data[:32].hex(), int.from_bytes(data[32:], "big", signed=True)


def index_roots(
    samples: Sequence[tuple[int, str]], uses: dict[int, list[tuple[int, int]]]
) -> tuple[bytes, bytes, list[bytes], list[bytes]]:
    """(usage_root, content_root, usage leaves, content leaves) for registered `samples` ((id, content sha256),
    any order) and their `uses` (id -> [(seq, position)] in ledger order)."""
    by_id = sorted(samples)
    usage = [usage_leaf(i, len(uses.get(i, ())), uses_hash(uses.get(i, []))) for i, _ in by_id]
    content = [content_leaf(h, i) for i, h in sorted(samples, key=lambda s: (s[1], s[0]))]
    return (
        root_from_leaf_hashes([leaf_hash(x) for x in usage]),
        root_from_leaf_hashes([leaf_hash(x) for x in content]),
        usage,
        content,
    )


def _included(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    return 0 <= index < size and verify_inclusion(leaf, index, size, list(proof), root)


def usage_key(leaf: bytes) -> int:
    """The sort key of a usage leaf: its sample id (as an integer: big-endian signed bytes do not sort)."""
    return parse_usage_leaf(leaf)[0]


def content_key(leaf: bytes) -> str:
    """The sort key of a content leaf for absence: its content hash (hex)."""
    return parse_content_leaf(leaf)[0]


def check_absent(
    key: Any,
    neighbours: Sequence[tuple[bytes, int, Sequence[bytes]]],
    size: int,
    root: bytes,
    key_of: Callable[[bytes], Any],
) -> str | None:
    """None when `neighbours` ((leaf, index, inclusion proof), one or two) prove that no leaf of the sorted tree
    (`size` leaves, `root`, sorted by `key_of(leaf)`) has the key `key`; else the problem."""
    if size == 0:
        return None if root == EMPTY_ROOT and not neighbours else "an empty index must have the empty root"
    for leaf, index, proof in neighbours:
        if not _included(leaf, index, size, proof, root):
            return f"neighbour leaf {index} is not in the index (inclusion proof fails)"
    try:
        keys = [(key_of(leaf), index) for leaf, index, _ in neighbours]
    except ValueError as exc:
        return f"malformed neighbour leaf ({exc})"
    if len(keys) == 2:
        (lo, i), (hi, j) = keys
        if j != i + 1:
            return f"neighbour leaves {i} and {j} are not adjacent"
        if not lo < key < hi:
            return "the neighbour leaves do not enclose the key"
        return None
    if len(keys) == 1:
        (k, i) = keys[0]
        if i == 0 and key < k:
            return None
        if i == size - 1 and key > k:
            return None
        return "a single neighbour proves absence only before the first or after the last leaf"
    return "no neighbour leaves"
