"""The usage index of a run as of a ledger size, read from the database (the recorder when it commits the index,
the verifier when it recomputes it, `fgtrac prove` when it proves use, non-use or non-registration).

Only what the ledger committed before `ledger_size` counts: samples whose `sample` entry and uses whose `batch`
entry have ``seq < ledger_size``.  The format is `fgtrac_core.ledger.usage_index`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import duckdb
import numpy as np

from fgtrac_core.ledger.merkle import EMPTY_ROOT, HASH_SIZE, perfect_subtree_levels
from fgtrac_core.store.merkle_batch import (
    big_endian,
    leaf_hashes,
    rows_as_bytes,
    runs,
    tree_root,
)


class LeafRows(Sequence[bytes]):
    """The leaves of one index tree, one per row of an (n, w) uint8 array, read as bytes."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> bytes:  # type: ignore[override]  # leaves are read one at a time
        return self.rows[i].tobytes()

    def __iter__(self) -> Iterator[bytes]:
        return iter(rows_as_bytes(self.rows))

    @cached_property
    def hashes(self) -> np.ndarray:
        return leaf_hashes(self.rows)

    @property
    def root(self) -> bytes:
        return tree_root(self.hashes)

    @property
    def levels(self) -> list[list[bytes]]:
        return perfect_subtree_levels(rows_as_bytes(self.hashes))


@dataclass
class UsageIndex:
    """Sorted leaves of both trees, the subtree levels for proofs, and the uses behind every usage leaf."""

    sample_ids: np.ndarray  # ascending: usage leaf i is sample_ids[i]
    usage_leaves: LeafRows
    content_leaves: LeafRows  # ascending by (content hash, sample id)
    _used_ids: np.ndarray  # the distinct sample ids with uses, ascending
    _use_starts: np.ndarray  # where each one's uses start in the two arrays below (one more: the end)
    _use_seqs: np.ndarray  # (batch entry seq, position) of every use, by sample id, then in ledger order
    _use_positions: np.ndarray

    def uses_of(self, sample_id: int) -> list[tuple[int, int]]:
        """[(batch entry seq, position)] of a sample's uses in ledger order (empty when it has none)."""
        i = int(np.searchsorted(self._used_ids, sample_id))
        if i == len(self._used_ids) or int(self._used_ids[i]) != sample_id:
            return []
        lo, hi = int(self._use_starts[i]), int(self._use_starts[i + 1])
        return list(zip(self._use_seqs[lo:hi].tolist(), self._use_positions[lo:hi].tolist(), strict=True))

    @property
    def n_uses(self) -> int:
        return len(self._use_seqs)

    @property
    def usage_levels(self) -> list[list[bytes]]:
        return self.usage_leaves.levels

    @property
    def content_levels(self) -> list[list[bytes]]:
        return self.content_leaves.levels

    @property
    def usage_root(self) -> bytes:
        return self.usage_leaves.root

    @property
    def content_root(self) -> bytes:
        return self.content_leaves.root


def read_usage_index(con: duckdb.DuckDBPyConnection, ledger_size: int) -> UsageIndex:
    """The index over what the first `ledger_size` ledger entries committed.

    Leaves are built as arrays (`fgtrac_core.ledger.usage_index` defines them one by one, the reference the tests
    hold this to): 1M samples take seconds here, where a Python loop per sample and per use took ~10 s."""
    samples = con.execute(
        """SELECT s.sample_id, s.content_sha256,
                  coalesce(regexp_full_match(s.content_sha256, '[0-9a-fA-F]{64}'), false) AS is_hex
           FROM samples s JOIN ledger l ON l.kind = 'sample' AND l.ref_id = s.sample_id
           WHERE l.seq < ? ORDER BY s.sample_id""",
        [ledger_size],
    ).fetchnumpy()
    used = con.execute(
        """SELECT bs.sample_id, l.seq, bs.position FROM batch_samples bs
           JOIN ledger l ON l.kind = 'batch' AND l.ref_id = bs.batch_id
           WHERE l.seq < ? ORDER BY bs.sample_id, l.seq, bs.position""",
        [ledger_size],
    ).fetchnumpy()
    ids = np.asarray(samples["sample_id"], np.int64)
    n = len(ids)

    # uses, grouped by sample id: one tree per used sample
    sid = np.asarray(used["sample_id"], np.int64)
    seqs, positions = np.asarray(used["seq"], np.int64), np.asarray(used["position"], np.int64)
    starts, counts = runs(sid)  # sorted by sample id
    used_ids = sid[starts]
    use_rows = np.concatenate([big_endian(seqs, ">u8"), big_endian(positions, ">u4")], axis=1)
    roots_of_used = _group_digests(use_rows, counts)

    n_uses = np.zeros(n, np.int64)
    roots = np.tile(np.frombuffer(EMPTY_ROOT, np.uint8), (n, 1))  # a sample never used: the hash of no uses
    if len(used_ids):
        at = np.minimum(np.searchsorted(used_ids, ids), len(used_ids) - 1)
        has_uses = used_ids[at] == ids
        n_uses[has_uses] = counts[at[has_uses]]
        roots[has_uses] = roots_of_used[at[has_uses]]
    id_bytes = big_endian(ids, ">i8")
    usage = np.concatenate([id_bytes, big_endian(n_uses, ">u8"), roots], axis=1)

    content = np.concatenate([_content_hashes(samples["content_sha256"], samples["is_hex"]), id_bytes], axis=1)
    keys = content[:, :32].copy().view(">u8")  # the hash as four big-endian words: sorts as the bytes do
    order = np.lexsort((ids, keys[:, 3], keys[:, 2], keys[:, 1], keys[:, 0]))
    return UsageIndex(
        ids, LeafRows(usage), LeafRows(content[order]), used_ids, np.r_[starts, len(sid)], seqs, positions
    )


def _group_digests(rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """SHA-256 of each of consecutive groups of rows of an (n, w) uint8 array, the group's rows concatenated, as
    (len(counts), 32): one hash call per group, over a view of one buffer."""
    data = memoryview(np.ascontiguousarray(rows, np.uint8).reshape(-1))
    ends = np.cumsum(counts, dtype=np.int64) * rows.shape[1]
    bounds = zip((ends - np.asarray(counts, np.int64) * rows.shape[1]).tolist(), ends.tolist(), strict=True)
    sha = hashlib.sha256
    return np.frombuffer(b"".join([sha(data[a:b]).digest() for a, b in bounds]), np.uint8).reshape(-1, HASH_SIZE)


def _content_hashes(texts: np.ndarray, is_hex: np.ndarray) -> np.ndarray:
    """(n, 32) uint8: each recorded content hash's bytes.  A text that is not 64 hex digits (only an edited row
    holds one, which the `sample` entry check reports) is hashed instead, so recomputing the index never fails."""
    is_hex = np.asarray(is_hex, bool)
    out = np.empty((len(texts), 32), np.uint8)
    if is_hex.any():
        out[is_hex] = np.frombuffer(bytes.fromhex("".join(texts[is_hex].tolist())), np.uint8).reshape(-1, 32)
    for i in np.flatnonzero(~is_hex).tolist():
        out[i] = np.frombuffer(hashlib.sha256(str(texts[i]).encode()).digest(), np.uint8)
    return out
