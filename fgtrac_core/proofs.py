"""Building usage-proof bundles from a run (the offline checker is `fgtrac_core.ledger.bundle`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fgtrac_core.errors import CorruptRunError, UnknownSampleError
from fgtrac_core.ledger import SignedTreeHead, inclusion_proof_from_leaf_hashes
from fgtrac_core.ledger.bundle import BUNDLE_FORMAT
from fgtrac_core.ledger.entries import id_leaf_hashes
from fgtrac_core.ledger.merkle import inclusion_proof_from_levels, perfect_subtree_levels
from fgtrac_core.store.reader import RunStore


def build_usage_proof(run_dir: str | Path, sample_id: int) -> dict[str, Any]:
    """A JSON-able bundle proving sample `sample_id`'s registration, preprocessing and uses in training.

    It lists every use recorded in the run, but a checker can only confirm that each listed use happened, not that
    none was omitted.  Proofs are against the run's latest signed tree head; entries after it (none in a closed
    run) are left out.
    """
    with RunStore(run_dir) as store:
        store.sample(sample_id)  # UnknownSampleError for an id that was never registered
        head = store.df("SELECT * FROM tree_heads ORDER BY tree_size DESC, sth_id DESC LIMIT 1")
        if head.empty:
            raise CorruptRunError(f"{store.layout.root} has no signed tree head")
        h = head.iloc[0]
        sth = SignedTreeHead.from_json_dict(
            {k: (int(h[k]) if k == "tree_size" else h[k])
             for k in ("run_id", "tree_size", "root", "chain_head", "timestamp", "key_fingerprint", "signature")}
        )  # fmt: skip
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
    return {
        "format": BUNDLE_FORMAT,
        "run_id": sth.run_id,
        "sample_id": sid,
        "tree_head": sth.to_json_dict(),
        "public_key": public_key,
        "entries": entries,
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
