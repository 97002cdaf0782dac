"""Full verification of a run's records against its ledger; one routine shared by the CLI and the dashboard.

Nothing stored is trusted: every entry is recomputed from the table rows, the hash chain and Merkle roots are
rebuilt from the recomputed entries and compared with the Ed25519-signed tree heads, and every checkpoint file is
re-hashed.  The stored entries serve only to say *which field* of a changed row differs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from fgtrac_core.errors import CorruptRunError
from fgtrac_core.ledger import (
    GENESIS,
    SignedTreeHead,
    decode_entry,
    fingerprint,
    load_public_key,
    verify_consistency,
    verify_tree_head,
)
from fgtrac_core.ledger.entries import ENTRY_KINDS, RESULT_KINDS
from fgtrac_core.ledger.merkle import consistency_proof_from_levels, perfect_subtree_levels, prefix_root
from fgtrac_core.store.db import connect, first_line
from fgtrac_core.store.entries import count_mismatches, iter_entries, table_of
from fgtrac_core.store.layout import RunLayout
from fgtrac_core.store.reader import RunStore

Progress = Callable[[float, str], None]

# the key column a ledger entry's ref_id names, per table (annotations and meta also use ref_key)
_KEY_NAMES = {
    "meta": (None, "key"),
    "run_sessions": ("session_id", None),
    "samples": ("sample_id", None),
    "sample_annotations": ("sample_id", "key"),
    "transforms": ("transform_id", None),
    "stages": ("stage_id", None),
    "batches": ("batch_id", None),
    "checkpoints": ("checkpoint_id", None),
    "analyses": ("analysis_id", None),
    **{ENTRY_KINDS[kind][0]: ("row_id", None) for kind in RESULT_KINDS},
}
# only modules of the bundled pipelines may be imported to re-hash source data (a run names its pipeline, and a
# tampered run must not be able to make verification import arbitrary code)
_SOURCE_PIPELINES = ("sample_runs.",)


_LEDGER_CHECKS = ("ledger", "entries", "chain", "signatures")


@dataclass
class Check:
    """One verification check: passed (True), failed (False) or skipped (None)."""

    name: str
    ok: bool | None
    count: int = 0
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Failure:
    """The first thing found wrong: which check, table, row and field, in one sentence."""

    check: str
    table: str | None
    row: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = " ".join(x for x in (self.table, self.row) if x)
        fld = f" field {self.field}" if self.field else ""
        return f"{where}{fld}: {self.message}" if where else self.message


@dataclass
class VerifyReport:
    run_dir: str
    run_id: str | None
    ok: bool
    n_entries: int
    tree_size: int
    key_fingerprint: str | None
    key_pinned: bool
    seconds: float
    checks: list[Check] = field(default_factory=list)
    first_failure: Failure | None = None

    @property
    def ledger_seconds(self) -> float:
        """Time of the ledger checks proper (not checkpoint-file, thumbnail or source-data re-hashing)."""
        return sum(c.seconds for c in self.checks if c.name in _LEDGER_CHECKS)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["first_failure"] = (
            None
            if self.first_failure is None
            else {**asdict(self.first_failure), "text": str(self.first_failure)}
        )
        d["ledger_seconds"] = self.ledger_seconds
        d["entries_per_second"] = self.n_entries / self.ledger_seconds if self.ledger_seconds > 0 else None
        return d


def _first_difference(a: list[bytes], b: list[bytes]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _row_name(table: str, ref_id: Any, ref_key: Any) -> str:
    id_name, key_name = _KEY_NAMES.get(table, ("id", "key"))
    parts = []
    if id_name:
        parts.append(f"{id_name}={ref_id}")
    if key_name:
        parts.append(f"{key_name}={ref_key}")
    return "row " + ", ".join(parts)


def _field_diff(stored: bytes, recomputed: bytes) -> str | None:
    """The first body field whose value differs between two entries of the same kind."""
    try:
        _, a = decode_entry(stored)
        _, b = decode_entry(recomputed)
    except ValueError:
        return None
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return k.split("=")[0]
    return None


class _Verifier:
    def __init__(
        self, layout: RunLayout, con: duckdb.DuckDBPyConnection, pinned: Any, progress: Progress | None
    ):
        self.layout = layout
        self.con = con
        self.pinned = pinned
        self.progress = progress or (lambda frac, label: None)
        self.checks: list[Check] = []
        self.first: Failure | None = None
        self.meta: dict[str, str] = {}
        self.n = 0
        self.key_fingerprint: str | None = None
        self.final: tuple[int, bytes, bytes] = (0, b"", b"")

    def fail(self, check: str, table: str | None, row: str | None, fld: str | None, message: str) -> None:
        if self.first is None:
            self.first = Failure(check, table, row, fld, message)

    def run_check(self, name: str, fn: Callable[[], tuple[bool | None, int, str]]) -> None:
        t0 = time.perf_counter()
        ok, count, detail = fn()
        self.checks.append(Check(name, ok, count, time.perf_counter() - t0, detail))

    # -------------------------------------------------------------- the checks
    def load_ledger(self) -> tuple[bool, int, str]:
        self.meta = dict(self.con.execute("SELECT key, value FROM meta").fetchall())
        n, lo, hi, distinct = self.con.execute(
            "SELECT count(*), min(seq), max(seq), count(DISTINCT seq) FROM ledger"
        ).fetchall()[0]
        self.n = int(n)
        if n and (lo != 0 or hi != n - 1 or distinct != n):
            bad = self.con.execute(
                """SELECT seq FROM (SELECT seq, row_number() OVER (ORDER BY seq) - 1 AS pos FROM ledger)
                   WHERE seq <> pos ORDER BY pos LIMIT 1"""
            ).fetchall()
            s = bad[0][0] if bad else hi
            self.fail(
                "ledger", "ledger", f"row seq={s}", "seq", "sequence numbers must run 0..n-1 without gaps"
            )
            return False, self.n, "sequence gap, duplicate or reordering"
        unknown = self.con.execute(
            "SELECT seq, kind FROM ledger WHERE kind NOT IN (SELECT unnest(?)) ORDER BY seq LIMIT 1",
            [list(ENTRY_KINDS)],
        ).fetchall()
        if unknown:
            unknown = unknown[0]
            self.fail(
                "ledger", "ledger", f"row seq={unknown[0]}", "kind", f"unknown entry kind {unknown[1]!r}"
            )
            return False, self.n, "unknown entry kind"
        return True, self.n, "contiguous sequence"

    def entries(self) -> tuple[bool, int, str]:
        """Recompute every entry from its row and compare with the stored entry; find rows without entries.

        Fast path: DuckDB encodes and compares whole tables (`count_mismatches`).  Kinds it cannot do (Merkle
        roots over id sets) or where it reports any difference go through the Python reference encoder, which
        also names the row and field.
        """
        problems: list[tuple[float, Failure]] = []
        kinds = list(ENTRY_KINDS)
        for j, kind in enumerate(kinds):
            self.progress(0.05 + 0.55 * j / len(kinds), f"recomputing {kind} entries")
            if count_mismatches(self.con, kind) == 0:
                continue
            problems += self._entries_reference(kind)
        for link, parent, col in (
            ("batch_samples", "batches", "batch_id"),
            ("transform_samples", "transforms", "transform_id"),
        ):
            orphans = self.con.execute(
                f"SELECT DISTINCT {col} FROM {link} EXCEPT SELECT {col} FROM {parent} ORDER BY 1 LIMIT 1"
            ).fetchall()
            if orphans:
                msg = f"rows reference a {parent} row that does not exist"
                problems.append((math.inf, Failure("entries", link, f"rows {col}={orphans[0][0]}", col, msg)))
        # the batch root commits to the order of ids, so positions must number that order 0..n-1
        gap = self.con.execute(
            """SELECT batch_id, position FROM (
                   SELECT batch_id, position, row_number() OVER (PARTITION BY batch_id ORDER BY position) - 1 AS want
                   FROM batch_samples) WHERE position IS DISTINCT FROM want ORDER BY batch_id LIMIT 1"""
        ).fetchall()
        if gap:
            gap = gap[0]
            msg = "positions within the batch must run 0..n-1 in batch order"
            problems.append(
                (math.inf, Failure("entries", "batch_samples", f"rows batch_id={gap[0]}", "position", msg))
            )
        if problems:
            first = min(problems, key=lambda p: p[0])[1]
            self.fail(first.check, first.table, first.row, first.field, first.message)
            return False, self.n, f"{len(problems)} rows differ from the ledger"
        return True, self.n, "every row recomputed and matched"

    def _entries_reference(self, kind: str) -> list[tuple[float, Failure]]:
        """Compare one kind entry by entry with the reference encoder; (ledger position, failure) per problem."""
        table = table_of(kind)
        recomputed = {(r, k): e for r, k, e in iter_entries(self.con, kind)}
        stored = self.con.execute(
            "SELECT seq, ref_id, ref_key, entry FROM ledger WHERE kind = ? ORDER BY seq", [kind]
        ).fetchall()
        out: list[tuple[float, Failure]] = []
        seen: set[tuple[Any, Any]] = set()
        for seq, ref_id, ref_key, entry in stored:
            key = (ref_id, ref_key)
            row = _row_name(table, *key)
            if key in seen:
                out.append(
                    (
                        seq,
                        Failure(
                            "entries",
                            "ledger",
                            f"row seq={seq}",
                            None,
                            f"second ledger entry for {table} {row}",
                        ),
                    )
                )
                continue
            seen.add(key)
            mine = recomputed.pop(key, None)
            if mine is None:
                out.append(
                    (
                        seq,
                        Failure(
                            "entries",
                            table,
                            row,
                            None,
                            f"the row of ledger entry #{seq} ({kind}) is missing (deleted)",
                        ),
                    )
                )
            elif mine != bytes(entry):
                fld = _field_diff(bytes(entry), mine)
                out.append(
                    (
                        seq,
                        Failure(
                            "entries", table, row, fld, f"value differs from ledger entry #{seq} ({kind})"
                        ),
                    )
                )
        for key in sorted(recomputed, key=repr):
            msg = f"row has no ledger entry ({kind}): inserted after recording"
            out.append((math.inf, Failure("entries", table, _row_name(table, *key), None, msg)))
        return out

    def chain_and_tree(self) -> tuple[bool, int, str]:
        """Leaf and chain hashes over the entries (equal to the recomputed ones once `entries` passed); stored
        hashes must agree; Merkle roots at every signed head's size."""
        self.progress(0.65, "rebuilding hash chain and Merkle tree")
        # Two halves in parallel: DuckDB recomputes every leaf hash from its entry and compares it with the stored
        # one (vectorised, GIL released) while Python runs the sequential chain and the Merkle levels over the
        # stored leaf hashes; the comparison is what makes those leaves the recomputed ones.
        mismatch: list[Any] = []
        cursor = self.con.cursor()

        def leaf_check() -> None:
            try:
                mismatch.append(
                    cursor.execute(
                        "SELECT min(seq) FROM ledger WHERE leaf_hash IS DISTINCT FROM unhex(sha256('\\x00'::BLOB || entry))"
                    ).fetchall()[0][0]
                )
            except duckdb.Error as exc:  # re-raised below, in the verifying thread
                mismatch.append(exc)

        worker = threading.Thread(target=leaf_check, name="fgtrac-leaf-check")
        worker.start()
        table = self.con.sql("SELECT leaf_hash, chain_hash FROM ledger ORDER BY seq").to_arrow_table()
        leaves = table.column("leaf_hash").to_pylist()
        stored_chain = table.column("chain_hash").to_pylist()
        sha = hashlib.sha256
        chains, chain = [], GENESIS
        for lh in leaves:
            chain = sha(chain + lh).digest()
            chains.append(chain)
        levels = perfect_subtree_levels(leaves)
        worker.join()
        cursor.close()
        if isinstance(mismatch[0], BaseException):
            raise mismatch[0]
        ok = True
        if mismatch[0] is not None:
            ok = False
            self.fail(
                "chain",
                "ledger",
                f"row seq={mismatch[0]}",
                "leaf_hash",
                "stored leaf hash does not match its entry",
            )
        elif chains != stored_chain:
            ok = False
            i = _first_difference(chains, stored_chain)
            self.fail(
                "chain",
                "ledger",
                f"row seq={i}",
                "chain_hash",
                "stored chain hash does not match the recomputed chain",
            )
        heads = self.con.execute(
            "SELECT sth_id, run_id, tree_size, root, chain_head, timestamp, key_fingerprint, signature "
            "FROM tree_heads ORDER BY sth_id"
        ).fetchall()
        self.heads = heads
        want = {int(h[2]) for h in heads}
        self.roots = {
            size: (prefix_root(levels, size), chains[size - 1] if size else GENESIS)
            for size in want
            if size <= len(leaves)
        }
        self.levels = levels
        root = prefix_root(levels, len(leaves))
        self.final = (len(leaves), root, chain)
        return ok, len(leaves), f"chain head {chain.hex()[:16]}…, root {root.hex()[:16]}…"

    def signatures(self) -> tuple[bool, int, str]:
        self.progress(0.75, "checking signed tree heads")
        meta = self.meta
        run_id = meta.get("run_id")
        try:
            key = (
                self.pinned
                if self.pinned is not None
                else load_public_key(meta["signer_public_key"].encode())
            )
        except (KeyError, ValueError) as exc:
            self.fail(
                "signatures",
                "meta",
                "row key=signer_public_key",
                "value",
                f"no usable public key ({first_line(exc)})",
            )
            return False, 0, "no public key"
        self.key_fingerprint = fingerprint(key)
        if not self.heads:
            self.fail("signatures", "tree_heads", None, None, "the run has no signed tree head")
            return False, 0, "no signed tree heads"
        prev_size, prev_root = -1, b""
        for h in self.heads:
            problem = self._head_problem(h, key, run_id, prev_size, prev_root)
            if problem is not None:
                fld, message, summary = problem
                self.fail("signatures", "tree_heads", f"row sth_id={h[0]}", fld, message)
                return False, len(self.heads), summary
            prev_size, prev_root = int(h[2]), bytes.fromhex(h[3])
        if prev_size != self.n:
            self.fail(
                "signatures",
                "ledger",
                f"rows seq>={prev_size}",
                None,
                f"{self.n - prev_size} entries are not covered by any signed tree head",
            )
            return False, len(self.heads), "unsigned tail"
        return (
            True,
            len(self.heads),
            "every head verifies and matches the recomputed tree; each is RFC 9162-consistent with the one before",
        )

    def _head_problem(
        self, h: tuple, key: Any, run_id: str | None, prev_size: int, prev_root: bytes
    ) -> tuple[str | None, str, str] | None:
        """(field, message, summary) of the first thing wrong with one stored head, or None."""
        size = int(h[2])
        try:
            sth = SignedTreeHead.from_json_dict(
                {"run_id": h[1], "tree_size": size, "root": h[3], "chain_head": h[4], "timestamp": h[5],
                 "key_fingerprint": h[6], "signature": h[7]}
            )  # fmt: skip
        except ValueError as exc:
            return None, f"malformed signed tree head ({first_line(exc)})", "malformed head"
        if not verify_tree_head(sth, key):
            who = "the pinned key" if self.pinned is not None else "the run's recorded key"
            return (
                "signature",
                f"signature does not verify with {who} ({self.key_fingerprint})",
                "bad signature",
            )
        if sth.run_id != run_id:
            return "run_id", f"head is for run {sth.run_id}, not {run_id}", "head of another run"
        if size < prev_size or size > self.n:
            msg = f"size {size} is not between the previous head's {prev_size} and the ledger's {self.n} entries (truncated?)"
            return "tree_size", msg, "tree size out of order"
        root, chain = self.roots[size]  # size <= n was checked just above
        if sth.root != root:
            return (
                "root",
                f"signed root differs from the root of the first {size} recomputed entries",
                "root mismatch",
            )
        if sth.chain_head != chain:
            msg = f"signed chain head differs from the chain over the first {size} entries"
            return "chain_head", msg, "chain head mismatch"
        # what a reviewer holding only the two signed heads would check: an RFC 9162 consistency proof
        proof = consistency_proof_from_levels(self.levels, prev_size, size) if prev_size >= 0 else []
        if prev_size >= 0 and not verify_consistency(prev_size, size, prev_root, sth.root, proof):
            return "root", f"not consistent with the previous head (size {prev_size})", "inconsistent heads"
        return None

    def checkpoint_files(self) -> tuple[bool, int, str]:
        self.progress(0.85, "hashing checkpoint files")
        rows = self.con.execute(
            "SELECT checkpoint_id, path, sha256, size_bytes FROM checkpoints ORDER BY checkpoint_id"
        ).fetchall()
        total = 0
        for cid, rel, sha, _size in rows:
            try:
                path = self.layout.resolve_inside(rel)
            except CorruptRunError as exc:
                self.fail("checkpoint_files", "checkpoints", f"row checkpoint_id={cid}", "path", str(exc))
                return False, len(rows), "path outside the run"
            if not path.is_file():
                self.fail(
                    "checkpoint_files",
                    "checkpoints",
                    f"row checkpoint_id={cid}",
                    "path",
                    f"checkpoint file {rel} is missing",
                )
                return False, len(rows), f"{rel} missing"
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            total += path.stat().st_size
            if h.hexdigest() != sha:
                self.fail(
                    "checkpoint_files",
                    "checkpoints",
                    f"row checkpoint_id={cid}",
                    "sha256",
                    f"checkpoint file {rel} was changed or replaced (SHA-256 differs)",
                )
                return False, len(rows), f"{rel} changed"
        return True, len(rows), f"{total / 1e6:.1f} MB hashed"

    def thumbnails(self) -> tuple[bool, int, str]:
        rows = self.con.execute(
            "SELECT sample_id, thumbnail, thumbnail_sha256 FROM samples WHERE thumbnail IS NOT NULL OR thumbnail_sha256 IS NOT NULL ORDER BY sample_id"
        ).fetchall()
        for sid, blob, sha in rows:
            if blob is None or sha is None or hashlib.sha256(blob).hexdigest() != sha:
                self.fail(
                    "thumbnails",
                    "samples",
                    f"row sample_id={sid}",
                    "thumbnail",
                    "thumbnail image does not match its committed SHA-256",
                )
                return False, len(rows), "thumbnail changed"
        return True, len(rows), "every thumbnail matches its committed hash"

    def source_data(self) -> tuple[bool | None, int, str]:
        """Re-hash the samples' source data when the run's pipeline is a bundled one that can reload it."""
        try:
            pipeline = json.loads(self.meta.get("config", "{}")).get("pipeline")
        except ValueError:
            pipeline = None
        if not isinstance(pipeline, str) or not pipeline.startswith(_SOURCE_PIPELINES):
            return None, 0, "source data not available to re-hash"
        try:
            module = importlib.import_module(pipeline)
            hashes: dict[int, str] = module.source_content_hashes()
        except (ImportError, AttributeError) as exc:
            return None, 0, f"source data not available ({first_line(exc)})"
        self.progress(0.92, "re-hashing source data")
        rows = self.con.execute("SELECT sample_id, content_sha256 FROM samples ORDER BY sample_id").fetchall()
        for sid, sha in rows:
            if hashes.get(sid) != sha:
                self.fail(
                    "source_data",
                    "samples",
                    f"row sample_id={sid}",
                    "content_sha256",
                    "the source sample's bytes hash differently",
                )
                return False, len(rows), "source differs"
        return True, len(rows), f"re-hashed from {pipeline}"


def verify_run(
    run_dir: str | Path, *, public_key: str | Path | bytes | None = None, progress: Progress | None = None
) -> VerifyReport:
    """Verify a run end to end (reads its published snapshot and checkpoint files; writes nothing).

    `public_key`: a file (or bytes) holding the Ed25519 public key the reviewer expects (pinned). Without it the
    run's own recorded key is used, which proves integrity only against accidental change, not against someone
    able to rewrite and re-sign the whole run; the report says which.
    Raises FgtracError subclasses for unusable input (missing run, unreadable key file).
    """
    t0 = time.perf_counter()
    layout = RunLayout.of(run_dir)
    pinned = None
    if public_key is not None:
        try:
            pinned = load_public_key(public_key)
        except (ValueError, OSError) as exc:
            raise CorruptRunError(f"cannot read public key {public_key}: {first_line(exc)}") from None
    RunStore(layout.root).close()  # one-line errors for a missing or unreadable run
    con = connect(layout.snapshot_db, read_only=True)
    v = _Verifier(layout, con, pinned, progress)
    try:
        v.run_check("ledger", v.load_ledger)
        if v.first is None:
            v.run_check("entries", v.entries)
            v.run_check("chain", v.chain_and_tree)
            v.run_check("signatures", v.signatures)
        v.run_check("checkpoint_files", v.checkpoint_files)
        v.run_check("thumbnails", v.thumbnails)
        v.run_check("source_data", v.source_data)
    except duckdb.Error as exc:
        raise CorruptRunError(f"{layout.snapshot_db} is damaged ({first_line(exc)})") from None
    finally:
        con.close()
    v.progress(1.0, "done")
    return VerifyReport(
        run_dir=str(layout.root),
        run_id=v.meta.get("run_id"),
        ok=v.first is None,
        n_entries=v.n,
        tree_size=v.final[0],
        key_fingerprint=v.key_fingerprint,
        key_pinned=pinned is not None,
        seconds=time.perf_counter() - t0,
        checks=v.checks,
        first_failure=v.first,
    )
