"""The usage index of a run as of a ledger size, read from the database (the recorder when it commits the index,
the verifier when it recomputes it, `fgtrac prove` when it proves use, non-use or non-registration).

Only what the ledger committed before `ledger_size` counts: samples whose `sample` entry and uses whose `batch`
entry have ``seq < ledger_size``.  The format is `fgtrac_core.ledger.usage_index`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import duckdb
import numpy as np

from fgtrac_core.ledger.merkle import leaf_hash, perfect_subtree_levels, root_from_leaf_hashes
from fgtrac_core.ledger.usage_index import content_leaf, usage_leaf, uses_root


@dataclass
class UsageIndex:
    """Sorted leaves of both trees, the subtree levels for proofs, and the uses behind every usage leaf."""

    sample_ids: np.ndarray  # ascending: usage leaf i is sample_ids[i]
    usage_leaves: list[bytes]
    content_leaves: list[bytes]  # ascending by (content hash, sample id)
    uses: dict[int, list[tuple[int, int]]]  # sample id -> [(batch entry seq, position)] in ledger order

    @property
    def usage_levels(self) -> list[list[bytes]]:
        return perfect_subtree_levels([leaf_hash(x) for x in self.usage_leaves])

    @property
    def content_levels(self) -> list[list[bytes]]:
        return perfect_subtree_levels([leaf_hash(x) for x in self.content_leaves])

    @property
    def n_uses(self) -> int:
        return sum(len(u) for u in self.uses.values())

    @property
    def usage_root(self) -> bytes:
        return root_from_leaf_hashes([leaf_hash(x) for x in self.usage_leaves])

    @property
    def content_root(self) -> bytes:
        return root_from_leaf_hashes([leaf_hash(x) for x in self.content_leaves])


def read_usage_index(con: duckdb.DuckDBPyConnection, ledger_size: int) -> UsageIndex:
    """The index over what the first `ledger_size` ledger entries committed."""
    samples = con.execute(
        """SELECT s.sample_id, s.content_sha256 FROM samples s
           JOIN ledger l ON l.kind = 'sample' AND l.ref_id = s.sample_id
           WHERE l.seq < ? ORDER BY s.sample_id""",
        [ledger_size],
    ).fetchnumpy()
    used = con.execute(
        """SELECT bs.sample_id, l.seq, bs.position FROM batch_samples bs
           JOIN ledger l ON l.kind = 'batch' AND l.ref_id = bs.batch_id
           WHERE l.seq < ? ORDER BY bs.sample_id, l.seq, bs.position""",
        [ledger_size],
    ).fetchnumpy()
    ids = samples["sample_id"].astype(np.int64)
    hashes = samples["content_sha256"].tolist()
    uses: dict[int, list[tuple[int, int]]] = {}
    sid = used["sample_id"].astype(np.int64)
    if len(sid):
        starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
        ends = np.r_[starts[1:], len(sid)]
        seqs, positions = used["seq"].tolist(), used["position"].tolist()
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            uses[int(sid[s])] = list(zip(seqs[s:e], positions[s:e], strict=True))
    usage = [usage_leaf(i, len(uses.get(i, ())), uses_root(uses.get(i, []))) for i in ids.tolist()]
    content = [content_leaf(_hex64(h), i) for h, i in sorted(zip(hashes, ids.tolist(), strict=True))]
    return UsageIndex(ids, usage, content, uses)


def _hex64(text: str) -> str:
    """A recorded content hash as 64 hex digits; anything else (only an edited row holds one, which the `sample`
    entry check reports) is hashed instead, so recomputing the index never fails on it."""
    try:
        if len(text) == 64 and bytes.fromhex(text):
            return text.lower()
    except (TypeError, ValueError):
        pass
    return hashlib.sha256(str(text).encode()).hexdigest()
