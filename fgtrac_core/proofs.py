"""Building usage-proof bundles from a run (the offline checker is `fgtrac_core.ledger.bundle`)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fgtrac_core.errors import FgtracError, UnknownSampleError
from fgtrac_core.ledger import SignedTreeHead, decode_entry, inclusion_proof_from_leaf_hashes
from fgtrac_core.ledger.bundle import BUNDLE_FORMAT, CONTENT_FORMAT
from fgtrac_core.ledger.entries import member_leaf_hashes
from fgtrac_core.ledger.merkle import (
    consistency_proof_from_levels,
    inclusion_proof_from_levels,
    perfect_subtree_levels,
)
from fgtrac_core.ledger.usage_index import content_key, parse_content_leaf
from fgtrac_core.store.reader import RunStore
from fgtrac_core.store.usage_index import UsageIndex


def build_usage_proof(
    run_dir: str | Path, sample_id: int, *, since: Sequence[SignedTreeHead] = ()
) -> dict[str, Any]:
    """A JSON-able bundle proving sample `sample_id`'s registration, preprocessing and uses in training.

    Proofs are against the run's latest signed tree head; entries after it (none in a closed run) are left out.
    Where the run committed a usage index (at every session close), the bundle also proves the list of uses
    complete as of that index, or — for an id the run never registered — that no such sample exists.  Without an
    index a checker can confirm each listed use, not that none was omitted.  For each head in `since` (heads a
    reviewer pinned earlier) the bundle carries the RFC 9162 consistency proof from it to the bundle's head.
    """
    sid = int(sample_id)
    with RunStore(run_dir) as store:
        sth = store.latest_tree_head()
        size = sth.tree_size
        levels = _ledger_levels(store, size)  # once: then every proof is O(log² n)
        rows = store.df(
            """SELECT l.seq, l.kind, l.entry, l.ref_id FROM ledger l
               WHERE l.seq < ? AND (
                   (l.kind IN ('sample', 'annotation') AND l.ref_id = ?)
                OR (l.kind = 'batch' AND l.ref_id IN (SELECT batch_id FROM batch_samples WHERE sample_id = ?))
                OR (l.kind = 'transform' AND l.ref_id IN (SELECT transform_id FROM transform_samples WHERE sample_id = ?)))
               ORDER BY l.seq""",
            [size, sid, sid, sid],
        )
        registered = bool((rows["kind"] == "sample").any())
        index = _index_section(store, levels, size, sid)
        if registered and index is not None and "absent" in index:
            index = None  # registered after the latest index: its uses cannot be proven complete yet
        if not registered and (index is None or "absent" not in index):
            store.sample(sid)  # UnknownSampleError for an id that was never registered
            raise UnknownSampleError(f"sample {sample_id} has no signed ledger entry yet")
        entries = []
        for r in rows.itertuples():
            item: dict[str, Any] = {
                "seq": int(r.seq),
                "kind": r.kind,
                "entry": bytes(r.entry).hex(),
                "inclusion": _hex(inclusion_proof_from_levels(levels, int(r.seq), size)),
            }
            if r.kind in ("batch", "transform"):
                members = _member_proofs(store, r.kind, int(r.ref_id), sid)
                item["member"] = members[0]
                if len(members) > 1:
                    item["more_members"] = members[1:]
            entries.append(item)
        public_key = store.meta().get("signer_public_key")
    return {
        "format": BUNDLE_FORMAT,
        "run_id": sth.run_id,
        "sample_id": sid,
        "tree_head": sth.to_json_dict(),
        "public_key": public_key,
        "entries": entries,
        **({"index": index} if index is not None else {}),
        **({"consistency": _consistency(levels, size, since)} if since else {}),
    }


def build_content_proof(
    run_dir: str | Path, content_sha256: str, *, since: Sequence[SignedTreeHead] = ()
) -> dict[str, Any]:
    """A JSON-able bundle answering a data owner who knows only a file's SHA-256: every sample registered with
    that content hash (each with its number of uses) and, by the neighbouring leaves of the content tree, that
    there is no other — or that none was ever registered.  Needs a run with a usage index."""
    h = str(content_sha256).lower()
    if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise FgtracError(f"--content-sha256 must be 64 hex digits, not {content_sha256!r}")
    with RunStore(run_dir) as store:
        sth = store.latest_tree_head()
        size = sth.tree_size
        levels = _ledger_levels(store, size)
        found = _latest_index(store, levels, size)
        if found is None:
            raise FgtracError(f"{store.layout.root} has no signed usage index (recorded by a session that closed)")
        head, body, ui = found
        keys = [content_key(x) for x in ui.content_leaves]
        lo, hi = bisect.bisect_left(keys, h), bisect.bisect_right(keys, h)
        content_levels, usage_levels = ui.content_levels, ui.usage_levels
        n = len(ui.content_leaves)

        def leaf(i: int) -> dict[str, Any]:
            return {"leaf": ui.content_leaves[i].hex(), "index": i,
                    "inclusion": _hex(inclusion_proof_from_levels(content_levels, i, n))}  # fmt: skip

        matches = []
        for i in range(lo, hi):
            sid = parse_content_leaf(ui.content_leaves[i])[1]
            j = int(np.searchsorted(ui.sample_ids, sid))
            usage = {"leaf": ui.usage_leaves[j].hex(), "index": j,
                     "inclusion": _hex(inclusion_proof_from_levels(usage_levels, j, len(ui.usage_leaves)))}  # fmt: skip
            matches.append({**leaf(i), "usage": usage})
        bounds = [leaf(i) for i in (lo - 1, hi) if 0 <= i < n]
        public_key = store.meta().get("signer_public_key")
    return {
        "format": CONTENT_FORMAT,
        "run_id": sth.run_id,
        "content_sha256": h,
        "tree_head": sth.to_json_dict(),
        "public_key": public_key,
        "index": head,
        "matches": matches,
        "bounds": bounds,
        **({"consistency": _consistency(levels, size, since)} if since else {}),
    }


def _hex(hashes: Sequence[bytes]) -> list[str]:
    return [x.hex() for x in hashes]


def _ledger_levels(store: RunStore, size: int) -> list[list[bytes]]:
    leaves = store.df("SELECT leaf_hash FROM ledger WHERE seq < ? ORDER BY seq", [size])["leaf_hash"]
    return perfect_subtree_levels([bytes(x) for x in leaves])


def _consistency(levels: list[list[bytes]], size: int, since: Sequence[SignedTreeHead]) -> list[dict[str, Any]]:
    return [
        {"tree_size": h.tree_size, "proof": _hex(consistency_proof_from_levels(levels, h.tree_size, size))}
        for h in since
        if 0 < h.tree_size <= size
    ]


def _latest_index(
    store: RunStore, levels: list[list[bytes]], size: int
) -> tuple[dict[str, Any], dict[str, Any], UsageIndex] | None:
    """(the latest usage_index entry under the head with its inclusion proof, its body, the index itself)."""
    row = store.df(
        "SELECT seq, entry FROM ledger WHERE kind = 'usage_index' AND seq < ? ORDER BY seq DESC LIMIT 1", [size]
    )
    if row.empty:
        return None
    seq, entry = int(row.seq.iloc[0]), bytes(row.entry.iloc[0])
    body = decode_entry(entry)[1]
    head = {"seq": seq, "entry": entry.hex(), "inclusion": _hex(inclusion_proof_from_levels(levels, seq, size))}
    return head, body, store.usage_index(int(body["ledger_size"]))


def _index_section(store: RunStore, levels: list[list[bytes]], size: int, sample_id: int) -> dict[str, Any] | None:
    found = _latest_index(store, levels, size)
    if found is None:
        return None
    head, _, ui = found
    n = len(ui.usage_leaves)
    usage_levels = ui.usage_levels
    i = int(np.searchsorted(ui.sample_ids, sample_id))

    def leaf(j: int) -> dict[str, Any]:
        return {"leaf": ui.usage_leaves[j].hex(), "index": j,
                "inclusion": _hex(inclusion_proof_from_levels(usage_levels, j, n))}  # fmt: skip

    if i < n and int(ui.sample_ids[i]) == sample_id:
        return {**head, "leaf": leaf(i), "uses": [list(u) for u in ui.uses_of(sample_id)]}
    return {**head, "absent": [leaf(j) for j in (i - 1, i) if 0 <= j < n]}


def _member_proofs(store: RunStore, kind: str, ref_id: int, sample_id: int) -> list[dict[str, Any]]:
    """Inclusion of the sample in a batch (batch order, with the target it was trained on) or transform (ascending
    ids) id set, once per occurrence."""
    if kind == "batch":
        rows = store.df("SELECT sample_id, target FROM batch_samples WHERE batch_id = ? ORDER BY position", [ref_id])
        missing = rows["target"].isna().tolist()
        targets: list[int | None] | None = [
            None if m else int(t) for t, m in zip(rows["target"].tolist(), missing, strict=True)
        ]
    else:
        rows = store.df(
            "SELECT sample_id FROM transform_samples WHERE transform_id = ? ORDER BY sample_id", [ref_id]
        )
        targets = None
    arr = rows["sample_id"].to_numpy()
    hashes = member_leaf_hashes(arr.tolist(), targets)
    return [
        {"index": int(i), **({"target": targets[i]} if targets is not None else {}),
         "inclusion": _hex(inclusion_proof_from_leaf_hashes(hashes, int(i)))}  # fmt: skip
        for i in np.flatnonzero(arr == sample_id)
    ]
