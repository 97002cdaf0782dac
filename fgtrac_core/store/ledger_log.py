"""The recorder's side of the ledger: append entries (leaf and chain hashes) and sign tree heads, in DuckDB."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import duckdb
import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fgtrac_core.ledger import GENESIS, CompactRange, chain_hashes, leaf_hash, sign_tree_head
from fgtrac_core.store.db import BufferedInserts, insert_arrow
from fgtrac_core.store.entries import Entry, entries_of_rows, iter_entries


@dataclass(frozen=True)
class Rows:
    """Rows of `kind` the same transaction just wrote, committed from memory instead of read back.

    `links` are the link rows of kinds with an id set (`entries_of_rows`).  The verifier recomputes every entry
    from the database, so an entry built from rows that differ from those stored fails verification.
    """

    kind: str
    rows: pa.Table
    links: pa.Table | None = None

    def entries(self) -> list[Entry]:
        return entries_of_rows(self.kind, self.rows, self.links)


Touched = str | tuple[str, int, int] | Rows


def _entries(con: duckdb.DuckDBPyConnection, item: Touched) -> tuple[str, Iterable[Entry]]:
    if isinstance(item, Rows):
        return item.kind, item.entries()
    if isinstance(item, str):
        return item, iter_entries(con, item, only_new=True)
    kind, lo, hi = item
    return kind, iter_entries(con, kind, key_range=(lo, hi))


class LedgerLog:
    """Appends entries in order and keeps the Merkle compact range and chain head up to date (O(log n) state)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, run_id: str, key: Ed25519PrivateKey) -> None:
        self.run_id = run_id
        self._key = key
        self._tree = CompactRange()
        self._chain = GENESIS
        cols = con.execute("SELECT leaf_hash, chain_hash FROM ledger ORDER BY seq").fetchnumpy()
        if len(cols["leaf_hash"]):
            self._tree.extend_leaf_hashes([bytes(h) for h in cols["leaf_hash"]])
            self._chain = bytes(cols["chain_hash"][-1])
        row = con.execute("SELECT max(tree_size), count(*) FROM tree_heads").fetchall()[0]
        self._signed_size = -1 if row[0] is None else int(row[0])
        self._next_sth = int(row[1])

    @property
    def size(self) -> int:
        return self._tree.size

    def append(self, con: duckdb.DuckDBPyConnection | BufferedInserts, touched: Sequence[Touched]) -> None:
        """Append entries for the rows just written, in this order: `Rows` held in memory, `(kind, first_key,
        last_key)` for a key range, or a bare kind for every row of that kind that has no entry yet.

        Ranges and kinds are read back from `con` inside the caller's transaction, through the same code the
        verifier uses; `Rows` are encoded by that code's in-memory twin.
        """
        kinds, ref_ids, ref_keys, entries = [], [], [], []
        for item in touched:
            kind, items = _entries(con, item)
            for ref_id, ref_key, entry in items:
                kinds.append(kind)
                ref_ids.append(ref_id)
                ref_keys.append(ref_key)
                entries.append(entry)
        if not entries:
            return
        # hashed together (one call each), not entry by entry: the per-call checks cost as much as the hashes
        leaves = [leaf_hash(entry) for entry in entries]
        chains = chain_hashes(leaves, self._chain)
        first = self._tree.size
        self._tree.extend_leaf_hashes(leaves)
        self._chain = chains[-1]
        seqs = range(first, first + len(entries))
        insert_arrow(
            con,
            "ledger",
            pa.table(
                {
                    "seq": pa.array(seqs, pa.int64()),
                    "kind": pa.array(kinds, pa.string()),
                    "ref_id": pa.array(ref_ids, pa.int64()),
                    "ref_key": pa.array(ref_keys, pa.string()),
                    "entry": pa.array(entries, pa.binary()),
                    "leaf_hash": pa.array(leaves, pa.binary()),
                    "chain_hash": pa.array(chains, pa.binary()),
                }
            ),
        )

    def sign_if_grown(self, con: duckdb.DuckDBPyConnection | BufferedInserts) -> None:
        """Sign and store a tree head over everything appended, unless the last head already covers it."""
        if self._tree.size == self._signed_size:
            return
        sth = sign_tree_head(self._key, self.run_id, self._tree.size, self._tree.root(), self._chain)
        d = sth.to_json_dict()
        row = {"sth_id": pa.array([self._next_sth], pa.int32())}
        for col in ("run_id", "tree_size", "root", "chain_head", "timestamp", "key_fingerprint", "signature"):
            row[col] = pa.array([d[col]], pa.int64() if col == "tree_size" else pa.string())
        insert_arrow(con, "tree_heads", pa.table(row))
        self._signed_size = self._tree.size
        self._next_sth += 1
