"""Building usage-proof bundles from a run (the offline checker is `fgtrac_core.ledger.bundle`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fgtrac_core.errors import UnknownSampleError
from fgtrac_core.ledger import SignedTreeHead, inclusion_proof_from_leaf_hashes
from fgtrac_core.ledger.bundle import BUNDLE_FORMAT
from fgtrac_core.ledger.entries import id_leaf_hashes
from fgtrac_core.ledger.merkle import (
    consistency_proof_from_levels,
    inclusion_proof_from_levels,
    perfect_subtree_levels,
)
from fgtrac_core.store.reader import RunStore


def build_usage_proof(
    run_dir: str | Path, sample_id: int, *, since: Sequence[SignedTreeHead] = ()
) -> dict[str, Any]:
    """A JSON-able bundle proving sample `sample_id`'s registration, preprocessing and uses in training.

    It lists every use recorded in the run, but a checker can only confirm that each listed use happened, not that
    none was omitted.  Proofs are against the run's latest signed tree head; entries after it (none in a closed
    run) are left out.  For each head in `since` (heads a reviewer pinned earlier) the bundle carries the RFC 9162
    consistency proof from it to the bundle's head, so `check-proof --since` can tell the run was not truncated or
    rewritten in between.
    """
    with RunStore(run_dir) as store:
        store.sample(sample_id)  # UnknownSampleError for an id that was never registered
        sth = store.latest_tree_head()
        size = sth.tree_size
        leaves = [
            bytes(x)
            for x in store.df("SELECT leaf_hash FROM ledger WHERE seq < ? ORDER BY seq", [size])["leaf_hash"]
        ]
        levels = perfect_subtree_levels(leaves)  # once: then every proof is O(log² n)
        sid = int(sample_id)
        rows = store.df(
            """SELECT l.seq, l.kind, l.entry, l.ref_id FROM ledger l
               WHERE l.seq < ? AND (
                   (l.kind IN ('sample', 'annotation') AND l.ref_id = ?)
                OR (l.kind = 'batch' AND l.ref_id IN (SELECT batch_id FROM batch_samples WHERE sample_id = ?))
                OR (l.kind = 'transform' AND l.ref_id IN (SELECT transform_id FROM transform_samples WHERE sample_id = ?)))
               ORDER BY l.seq""",
            [size, sid, sid, sid],
        )
        if not (rows["kind"] == "sample").any():
            raise UnknownSampleError(f"sample {sample_id} has no signed ledger entry yet")
        entries = []
        for r in rows.itertuples():
            item: dict[str, Any] = {
                "seq": int(r.seq),
                "kind": r.kind,
                "entry": bytes(r.entry).hex(),
                "inclusion": [p.hex() for p in inclusion_proof_from_levels(levels, int(r.seq), size)],
            }
            if r.kind in ("batch", "transform"):
                item["member"] = _member_proof(store, r.kind, int(r.ref_id), sid)
            entries.append(item)
        public_key = store.meta().get("signer_public_key")
        consistency = [
            {"tree_size": h.tree_size, "proof": [p.hex() for p in consistency_proof_from_levels(levels, h.tree_size, size)]}
            for h in since
            if 0 < h.tree_size <= size
        ]
    return {
        "format": BUNDLE_FORMAT,
        "run_id": sth.run_id,
        "sample_id": sid,
        "tree_head": sth.to_json_dict(),
        "public_key": public_key,
        "entries": entries,
        **({"consistency": consistency} if since else {}),
    }


def _member_proof(store: RunStore, kind: str, ref_id: int, sample_id: int) -> dict[str, Any]:
    """Inclusion of the sample id in a batch (batch order) or transform (ascending ids) id set."""
    if kind == "batch":
        ids = store.df("SELECT sample_id FROM batch_samples WHERE batch_id = ? ORDER BY position", [ref_id])
    else:
        ids = store.df(
            "SELECT sample_id FROM transform_samples WHERE transform_id = ? ORDER BY sample_id", [ref_id]
        )
    arr = ids["sample_id"].to_numpy()
    index = int(np.flatnonzero(arr == sample_id)[0])
    proof = inclusion_proof_from_leaf_hashes(id_leaf_hashes(arr.tolist()), index)
    return {"index": index, "inclusion": [p.hex() for p in proof]}
