"""Full verification of a run's records against its ledger; one routine shared by the CLI, the dashboard and the
recorder (which verifies a run before it appends to it).

Nothing stored is trusted: the database must hold exactly fgtrac's tables (no views or macros that could answer
the verifier differently from everyone else), every entry is recomputed from the table rows, the hash chain and
Merkle roots are rebuilt from the recomputed entries and compared with the Ed25519-signed tree heads, and every
checkpoint file is re-hashed.  The stored entries serve only to say *which field* of a changed row differs.

Both databases of a run are checked: the published snapshot (what readers see) and, when no recorder holds it,
the live database (what the recorder would sign next); the snapshot's ledger must be a prefix of the live one.

Each check is a function of explicit inputs returning its `Check` and the first `Failure` it found (if any).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fgtrac_core.errors import CorruptRunError, FgtracError, RunFileError, RunLockedError, TamperedRunError
from fgtrac_core.ledger import (
    GENESIS,
    SignedTreeHead,
    chain_hashes,
    decode_entry,
    fingerprint,
    load_public_key,
    verify_consistency,
    verify_tree_head,
)
from fgtrac_core.ledger.entries import ENTRY_KINDS
from fgtrac_core.ledger.kinds import LINK_TABLES, ROW_KEYS
from fgtrac_core.ledger.merkle import consistency_proof_from_levels, perfect_subtree_levels, prefix_root
from fgtrac_core.ledger.pinned import pinned_head_problem, read_pinned_head
from fgtrac_core.store.db import connect, first_line
from fgtrac_core.store.entries import count_mismatches, iter_entries, table_of
from fgtrac_core.store.layout import LIVE_DB, SNAPSHOT_DB, RunLayout
from fgtrac_core.store.reader import RunStore
from fgtrac_core.store.run_files import checkpoint_file_problem, committed_checkpoints

Progress = Callable[[float, str], None]

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
    """The first thing found wrong: which check, database file, table, row and field, in one sentence."""

    check: str
    table: str | None
    row: str | None
    field: str | None
    message: str
    database: str | None = None

    def __str__(self) -> str:
        where = " ".join(x for x in (self.table, self.row) if x)
        fld = f" field {self.field}" if self.field else ""
        text = f"{where}{fld}: {self.message}" if where else self.message
        return f"{self.database}: {text}" if self.database else text


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
        """Time of the snapshot's ledger checks proper (not files, thumbnails, source data or the live copy)."""
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


Outcome = tuple[Check, Failure | None]


@dataclass(frozen=True)
class Tree:
    """The ledger as recomputed: leaf hashes, chain values after each leaf, Merkle subtree levels."""

    leaves: list[bytes]
    chains: list[bytes]
    levels: list[list[bytes]]

    @property
    def size(self) -> int:
        return len(self.leaves)

    def chain_at(self, size: int) -> bytes:
        return self.chains[size - 1] if size else GENESIS

    def root_at(self, size: int) -> bytes:
        return prefix_root(self.levels, size)


def _timed(name: str, fn: Callable[[], tuple[bool | None, int, str, Failure | None]]) -> Outcome:
    t0 = time.perf_counter()
    ok, count, detail, failure = fn()
    return Check(name, ok, count, time.perf_counter() - t0, detail), failure


def _row_name(table: str, ref_id: Any, ref_key: Any) -> str:
    id_name, key_name = ROW_KEYS.get(table, ("id", "key"))
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


def _noop(frac: float, label: str) -> None:
    return None


# ------------------------------------------------------------------------------------------- ledger checks


def check_sequence(con: duckdb.DuckDBPyConnection) -> Outcome:
    """Ledger sequence numbers run 0..n-1 and every entry kind is known."""

    def run() -> tuple[bool, int, str, Failure | None]:
        n, lo, hi, distinct = con.execute(
            "SELECT count(*), min(seq), max(seq), count(DISTINCT seq) FROM ledger"
        ).fetchall()[0]
        if n and (lo != 0 or hi != n - 1 or distinct != n):
            bad = con.execute(
                """SELECT seq FROM (SELECT seq, row_number() OVER (ORDER BY seq) - 1 AS pos FROM ledger)
                   WHERE seq <> pos ORDER BY pos LIMIT 1"""
            ).fetchall()
            s = bad[0][0] if bad else hi
            msg = "sequence numbers must run 0..n-1 without gaps"
            return False, n, "sequence gap, duplicate or reordering", Failure("ledger", "ledger", f"row seq={s}", "seq", msg)
        unknown = con.execute(
            "SELECT seq, kind FROM ledger WHERE kind NOT IN (SELECT unnest(?)) ORDER BY seq LIMIT 1",
            [list(ENTRY_KINDS)],
        ).fetchall()
        if unknown:
            seq, kind = unknown[0]
            failure = Failure("ledger", "ledger", f"row seq={seq}", "kind", f"unknown entry kind {kind!r}")
            return False, n, "unknown entry kind", failure
        return True, n, "contiguous sequence", None

    return _timed("ledger", run)


def check_entries(con: duckdb.DuckDBPyConnection, progress: Progress = _noop) -> Outcome:
    """Recompute every entry from its row and compare with the stored entry; find rows without entries.

    Fast path: DuckDB encodes and compares whole tables (`count_mismatches`).  Kinds it cannot do (Merkle roots
    over id sets) or where it reports any difference go through the Python reference encoder, which also names
    the row and field.  Of several problems, broken batch positions are reported first (the direct evidence: the
    usage index derived from them differs as a consequence), then the one earliest in the ledger.
    """

    def run() -> tuple[bool, int, str, Failure | None]:
        problems: list[tuple[float, Failure]] = []
        kinds = list(ENTRY_KINDS)
        for j, kind in enumerate(kinds):
            progress(0.05 + 0.5 * j / len(kinds), f"recomputing {kind} entries")
            if count_mismatches(con, kind) != 0:
                problems += _entries_reference(con, kind)
        for link, (parent, col) in LINK_TABLES.items():
            orphans = con.execute(
                f"SELECT DISTINCT {col} FROM {link} EXCEPT SELECT {col} FROM {parent} ORDER BY 1 LIMIT 1"
            ).fetchall()
            if orphans:
                msg = f"rows reference a {parent} row that does not exist"
                problems.append((math.inf, Failure("entries", link, f"rows {col}={orphans[0][0]}", col, msg)))
        # the batch root commits to the order of ids, so positions must number that order 0..n-1
        gap = con.execute(
            """SELECT batch_id, position FROM (
                   SELECT batch_id, position, row_number() OVER (PARTITION BY batch_id ORDER BY position) - 1 AS want
                   FROM batch_samples) WHERE position IS DISTINCT FROM want ORDER BY batch_id LIMIT 1"""
        ).fetchall()
        if gap:
            msg = "positions within the batch must run 0..n-1 in batch order"
            problems.append(
                (-1, Failure("entries", "batch_samples", f"rows batch_id={gap[0][0]}", "position", msg))
            )
        n = con.execute("SELECT count(*) FROM ledger").fetchall()[0][0]
        if problems:
            first = min(problems, key=lambda p: p[0])[1]
            return False, n, f"{len(problems)} rows differ from the ledger", first
        return True, n, "every row recomputed and matched", None

    return _timed("entries", run)


def _entries_reference(con: duckdb.DuckDBPyConnection, kind: str) -> list[tuple[float, Failure]]:
    """Compare one kind entry by entry with the reference encoder; (ledger position, failure) per problem."""
    table = table_of(kind)
    recomputed = {(r, k): e for r, k, e in iter_entries(con, kind)}
    stored = con.execute(
        "SELECT seq, ref_id, ref_key, entry FROM ledger WHERE kind = ? ORDER BY seq", [kind]
    ).fetchall()
    out: list[tuple[float, Failure]] = []
    seen: set[tuple[Any, Any]] = set()
    for seq, ref_id, ref_key, entry in stored:
        key = (ref_id, ref_key)
        row = _row_name(table, *key)
        if key in seen:
            msg = f"second ledger entry for {table} {row}"
            out.append((seq, Failure("entries", "ledger", f"row seq={seq}", None, msg)))
            continue
        seen.add(key)
        mine = recomputed.pop(key, None)
        if mine is None:
            msg = f"the row of ledger entry #{seq} ({kind}) is missing (deleted)"
            out.append((seq, Failure("entries", table, row, None, msg)))
        elif mine != bytes(entry):
            fld = _field_diff(bytes(entry), mine)
            msg = f"value differs from ledger entry #{seq} ({kind})"
            out.append((seq, Failure("entries", table, row, fld, msg)))
    for key in sorted(recomputed, key=repr):
        msg = f"row has no ledger entry ({kind}): inserted after recording"
        out.append((math.inf, Failure("entries", table, _row_name(table, *key), None, msg)))
    return out


def check_chain(con: duckdb.DuckDBPyConnection) -> tuple[Check, Failure | None, Tree]:
    """Leaf and chain hashes over the stored entries (the recomputed ones once `check_entries` passed) must equal
    the stored hashes; returns the recomputed tree for the signed-head check."""
    t0 = time.perf_counter()
    # Two halves in parallel: DuckDB recomputes every leaf hash from its entry and compares it with the stored one
    # (vectorised, GIL released) while Python runs the sequential chain and the Merkle levels over the stored leaf
    # hashes; the comparison is what makes those leaves the recomputed ones.
    mismatch: list[Any] = []
    cursor = con.cursor()

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
    table = con.sql("SELECT leaf_hash, chain_hash FROM ledger ORDER BY seq").to_arrow_table()
    leaves = table.column("leaf_hash").to_pylist()
    stored_chain = table.column("chain_hash").to_pylist()
    try:
        chains = chain_hashes(leaves)
        levels = perfect_subtree_levels(leaves)
    except ValueError:  # a stored leaf hash of the wrong length: the leaf check names it
        chains, levels = [], [[]]
    worker.join()
    cursor.close()
    if isinstance(mismatch[0], BaseException):
        raise mismatch[0]
    tree = Tree(leaves, chains, levels)
    failure = None
    if mismatch[0] is not None:
        failure = Failure(
            "chain", "ledger", f"row seq={mismatch[0]}", "leaf_hash", "stored leaf hash does not match its entry"
        )
    elif chains != stored_chain:
        i = next((i for i, (x, y) in enumerate(zip(chains, stored_chain, strict=True)) if x != y), len(chains))
        msg = "stored chain hash does not match the recomputed chain"
        failure = Failure("chain", "ledger", f"row seq={i}", "chain_hash", msg)
    head = chains[-1] if chains else GENESIS
    detail = f"chain head {head.hex()[:16]}…, root {tree.root_at(tree.size).hex()[:16]}…" if not failure else ""
    check = Check("chain", failure is None, tree.size, time.perf_counter() - t0, detail)
    return check, failure, tree


def _heads(con: duckdb.DuckDBPyConnection) -> list[tuple]:
    return con.execute(
        "SELECT sth_id, run_id, tree_size, root, chain_head, timestamp, key_fingerprint, signature "
        "FROM tree_heads ORDER BY sth_id"
    ).fetchall()


def check_heads(
    heads: Sequence[tuple],
    tree: Tree,
    key: Ed25519PublicKey,
    run_id: str | None,
    *,
    who: str,
    allow_unsigned_tail: bool = False,
) -> Outcome:
    """Every signed tree head verifies with `key`, names this run, matches the recomputed tree at its size and is
    RFC 9162-consistent with the head before it; the last head covers the whole ledger (unless
    `allow_unsigned_tail`: a recorder that crashed may leave entries it never got to sign)."""

    def run() -> tuple[bool, int, str, Failure | None]:
        if not heads:
            return False, 0, "no signed tree heads", Failure("signatures", "tree_heads", None, None, "the run has no signed tree head")
        prev_size, prev_root = -1, b""
        for h in heads:
            problem = _head_problem(h, key, who, run_id, tree, prev_size, prev_root)
            if problem is not None:
                fld, message, summary = problem
                return False, len(heads), summary, Failure("signatures", "tree_heads", f"row sth_id={h[0]}", fld, message)
            prev_size, prev_root = int(h[2]), bytes.fromhex(h[3])
        if prev_size != tree.size and not allow_unsigned_tail:
            msg = f"{tree.size - prev_size} entries are not covered by any signed tree head"
            return False, len(heads), "unsigned tail", Failure("signatures", "ledger", f"rows seq>={prev_size}", None, msg)
        detail = "every head verifies and matches the recomputed tree; each is RFC 9162-consistent with the one before"
        return True, len(heads), detail, None

    return _timed("signatures", run)


def _head_problem(
    h: tuple, key: Ed25519PublicKey, who: str, run_id: str | None, tree: Tree, prev_size: int, prev_root: bytes
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
        return "signature", f"signature does not verify with {who} ({fingerprint(key)})", "bad signature"
    if sth.run_id != run_id:
        return "run_id", f"head is for run {sth.run_id}, not {run_id}", "head of another run"
    if size < prev_size or size > tree.size:
        msg = f"size {size} is not between the previous head's {prev_size} and the ledger's {tree.size} entries (truncated?)"
        return "tree_size", msg, "tree size out of order"
    if sth.root != tree.root_at(size):
        return "root", f"signed root differs from the root of the first {size} recomputed entries", "root mismatch"
    if sth.chain_head != tree.chain_at(size):
        return "chain_head", f"signed chain head differs from the chain over the first {size} entries", "chain head mismatch"
    # what a reviewer holding only the two signed heads would check: an RFC 9162 consistency proof
    if prev_size >= 0:
        proof = consistency_proof_from_levels(tree.levels, prev_size, size)
        if not verify_consistency(prev_size, size, prev_root, sth.root, proof):
            return "root", f"not consistent with the previous head (size {prev_size})", "inconsistent heads"
    return None


def check_thumbnails(con: duckdb.DuckDBPyConnection) -> Outcome:
    """Every stored thumbnail hashes to its committed SHA-256."""

    def run() -> tuple[bool, int, str, Failure | None]:
        rows = con.execute(
            "SELECT sample_id, thumbnail, thumbnail_sha256 FROM samples "
            "WHERE thumbnail IS NOT NULL OR thumbnail_sha256 IS NOT NULL ORDER BY sample_id"
        ).fetchall()
        for sid, blob, sha in rows:
            if blob is None or sha is None or hashlib.sha256(blob).hexdigest() != sha:
                msg = "thumbnail image does not match its committed SHA-256"
                return False, len(rows), "thumbnail changed", Failure("thumbnails", "samples", f"row sample_id={sid}", "thumbnail", msg)
        detail = "every thumbnail matches its committed hash" if rows else "the run stores no thumbnails"
        return (True if rows else None), len(rows), detail, None

    return _timed("thumbnails", run)


@dataclass
class LedgerResult:
    """What the ledger checks of one database found."""

    checks: list[Check]
    failure: Failure | None
    meta: dict[str, str]
    tree: Tree | None
    key_fingerprint: str | None
    n_entries: int


def ledger_checks(
    con: duckdb.DuckDBPyConnection,
    *,
    pinned: Ed25519PublicKey | None,
    progress: Progress = _noop,
    allow_unsigned_tail: bool = False,
) -> LedgerResult:
    """Sequence, entries, chain, signed heads and thumbnails of one database; stops at the first failing ledger
    check (later ones would only repeat it).  Without `pinned`, the run's own recorded key checks the heads."""
    meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    checks: list[Check] = []
    check, failure = check_sequence(con)
    checks.append(check)
    tree = None
    fp = None
    if failure is None:
        check, failure = check_entries(con, progress)
        checks.append(check)
    if failure is None:
        progress(0.6, "rebuilding hash chain and Merkle tree")
        check, failure, tree = check_chain(con)
        checks.append(check)
    if failure is None and tree is not None:
        progress(0.7, "checking signed tree heads")
        try:
            key = pinned if pinned is not None else load_public_key(meta["signer_public_key"].encode())
        except (KeyError, ValueError) as exc:
            msg = f"no usable public key ({first_line(exc)})"
            failure = Failure("signatures", "meta", "row key=signer_public_key", "value", msg)
            checks.append(Check("signatures", False, 0, 0.0, "no public key"))
        else:
            fp = fingerprint(key)
            who = "the pinned key" if pinned is not None else "the run's recorded key"
            check, failure = check_heads(
                _heads(con), tree, key, meta.get("run_id"), who=who, allow_unsigned_tail=allow_unsigned_tail
            )
            checks.append(check)
    check, thumb_failure = check_thumbnails(con)
    checks.append(check)
    n = checks[0].count
    return LedgerResult(checks, failure or thumb_failure, meta, tree, fp, n)


def check_prefix(snapshot: Tree, live: Tree) -> Failure | None:
    """The snapshot's ledger must be a prefix of the live ledger (the recorder only ever appends)."""
    if snapshot.size > live.size or snapshot.chain_at(snapshot.size) != live.chain_at(snapshot.size):
        msg = (
            f"its first {snapshot.size} ledger entries are not the first {snapshot.size} of {LIVE_DB} "
            f"({live.size} entries): one of the two files was replaced or rewritten"
        )
        return Failure("live_database", "ledger", None, None, msg, SNAPSHOT_DB)
    return None


def check_pinned_heads(
    heads: Sequence[tuple[str, SignedTreeHead]], tree: Tree | None, key: Ed25519PublicKey | None, run_id: str | None
) -> Outcome:
    """Every head the reviewer pinned earlier (name, head) is consistent with the current tree (RFC 9162): the
    run was neither truncated nor rewritten since."""

    def run() -> tuple[bool | None, int, str, Failure | None]:
        if tree is None or key is None or run_id is None:
            return None, len(heads), "the ledger did not verify: pinned heads not checked", None
        for name, head in heads:
            proof = (
                consistency_proof_from_levels(tree.levels, head.tree_size, tree.size)
                if 0 < head.tree_size <= tree.size
                else []
            )
            problem = pinned_head_problem(
                head, key, run_id=run_id, tree_size=tree.size, root=tree.root_at(tree.size), proof=proof, name=name
            )
            if problem is not None:
                return False, len(heads), "not consistent", Failure("pinned_heads", None, None, None, problem)
        return True, len(heads), "the current tree extends every pinned head (RFC 9162 consistency)", None

    return _timed("pinned_heads", run)


# ------------------------------------------------------------------------------------------- run files


def check_checkpoint_files(layout: RunLayout, con: duckdb.DuckDBPyConnection) -> Outcome:
    """Every checkpoint file passes the one trusted loader's checks (`fgtrac_core.store.run_files`): inside the
    run, no links, a regular file of the size and SHA-256 its ledger entry committed."""

    def run() -> tuple[bool | None, int, str, Failure | None]:
        rows = con.execute("SELECT checkpoint_id FROM checkpoints ORDER BY checkpoint_id").fetchall()
        try:
            committed = committed_checkpoints(con)
        except RunFileError as exc:  # a row and its entry disagree: the entries check names the field
            return False, len(rows), "checkpoint rows differ from the ledger", Failure("checkpoint_files", "checkpoints", None, None, str(exc))
        total = 0
        for cid in sorted(committed):
            problem = checkpoint_file_problem(layout, committed[cid])
            if problem is not None:
                fld = "sha256" if "SHA-256" in problem else "path"
                failure = Failure("checkpoint_files", "checkpoints", f"row checkpoint_id={cid}", fld, problem)
                return False, len(rows), f"checkpoint {cid} file refused", failure
            total += committed[cid].size_bytes
        return True, len(rows), f"{total / 1e6:.1f} MB hashed", None

    return _timed("checkpoint_files", run)


def check_source_data(con: duckdb.DuckDBPyConnection, meta: dict[str, str], progress: Progress = _noop) -> Outcome:
    """Re-hash the samples' source data when the run's pipeline is a bundled one that can reload it."""

    def run() -> tuple[bool | None, int, str, Failure | None]:
        try:
            pipeline = json.loads(meta.get("config", "{}")).get("pipeline")
        except (ValueError, AttributeError):
            pipeline = None
        if not isinstance(pipeline, str) or not pipeline.startswith(_SOURCE_PIPELINES):
            return None, 0, "source data not available to re-hash", None
        try:
            module = importlib.import_module(pipeline)
            hashes: dict[int, str] = module.source_content_hashes()
        except (ImportError, AttributeError) as exc:
            return None, 0, f"source data not available ({first_line(exc)})", None
        progress(0.92, "re-hashing source data")
        rows = con.execute("SELECT sample_id, content_sha256 FROM samples ORDER BY sample_id").fetchall()
        for sid, sha in rows:
            if hashes.get(sid) != sha:
                msg = "the source sample's bytes hash differently"
                return False, len(rows), "source differs", Failure("source_data", "samples", f"row sample_id={sid}", "content_sha256", msg)
        return True, len(rows), f"re-hashed from {pipeline}", None

    return _timed("source_data", run)


# ------------------------------------------------------------------------------------------- the run


def _recorded_key(meta: dict[str, str]) -> Ed25519PublicKey | None:
    try:
        return load_public_key(meta["signer_public_key"].encode())
    except (KeyError, ValueError):
        return None


def _last_session_closed(con: duckdb.DuckDBPyConnection) -> bool:
    row = con.execute("SELECT closed_at FROM run_sessions ORDER BY session_id DESC LIMIT 1").fetchall()
    return bool(row) and row[0][0] is not None


def _tampered(database: str, exc: TamperedRunError) -> Outcome:
    return Check("schema", False, 0, 0.0, "unexpected database objects"), Failure(
        "schema", None, None, None, str(exc), database
    )


def _check_live(layout: RunLayout, snapshot: Tree | None, pinned: Ed25519PublicKey | None) -> Outcome:
    """The live database, when no recorder holds it: the same ledger checks, and the snapshot a prefix of it."""
    t0 = time.perf_counter()

    def done(ok: bool | None, detail: str, failure: Failure | None = None) -> Outcome:
        return Check("live_database", ok, 0, time.perf_counter() - t0, detail), failure

    if not layout.live_db.exists():
        return done(None, f"no {LIVE_DB} (a copied or published run): the snapshot was checked")
    try:
        con = connect(layout.live_db, read_only=True)
    except RunLockedError:
        return done(None, f"{LIVE_DB} is held by a recorder: its published snapshot was checked")
    except TamperedRunError as exc:
        return done(False, "unexpected database objects", Failure("schema", None, None, None, str(exc), LIVE_DB))
    try:
        result = ledger_checks(con, pinned=pinned, allow_unsigned_tail=not _last_session_closed(con))
    except duckdb.Error as exc:
        raise CorruptRunError(f"{layout.live_db} is damaged ({first_line(exc)})") from None
    finally:
        con.close()
    if result.failure is not None:
        result.failure.database = LIVE_DB
        return done(False, f"{LIVE_DB} differs from its ledger", result.failure)
    if snapshot is not None and result.tree is not None and (prefix := check_prefix(snapshot, result.tree)):
        return done(False, "snapshot is not a prefix of the live ledger", prefix)
    n = result.tree.size if result.tree else 0
    return done(True, f"{LIVE_DB}: {n} entries verified; the snapshot is a prefix of its ledger")


def verify_run(
    run_dir: str | Path,
    *,
    public_key: str | Path | bytes | None = None,
    since: Sequence[str | Path] = (),
    progress: Progress | None = None,
) -> VerifyReport:
    """Verify a run end to end (reads its published snapshot, its live database when no recorder holds it, and
    its checkpoint files; writes nothing).

    `public_key`: a file (or bytes) holding the Ed25519 public key the reviewer expects (pinned). Without it the
    run's own recorded key is used, which proves integrity only against accidental change, not against someone
    able to rewrite and re-sign the whole run; the report says which.
    `since`: files of signed tree heads the reviewer kept (`fgtrac head`); each must be consistent with the
    current tree, or the run was truncated or rewritten since (named in the report).
    Raises FgtracError subclasses for unusable input (missing run, unreadable key or head file).
    """
    t0 = time.perf_counter()
    report = progress or _noop
    layout = RunLayout.of(run_dir)
    pinned = None
    if public_key is not None:
        try:
            pinned = load_public_key(public_key)
        except (ValueError, OSError) as exc:
            raise CorruptRunError(f"cannot read public key {public_key}: {first_line(exc)}") from None
    try:
        heads = [(f"pinned head {Path(f).name}", read_pinned_head(f)) for f in since]
    except ValueError as exc:
        raise FgtracError(str(exc)) from None
    checks: list[Check] = []
    failures: list[Failure | None] = []
    meta: dict[str, str] = {}
    n, size, fp = 0, 0, None
    try:
        RunStore(layout.root).close()  # one-line errors for a missing or unreadable run
        con = connect(layout.snapshot_db, read_only=True)
    except TamperedRunError as exc:
        check, failure = _tampered(SNAPSHOT_DB, exc)
        checks.append(check)
        failures.append(failure)
    else:
        try:
            result = ledger_checks(con, pinned=pinned, progress=report)
            checks += result.checks
            failures.append(result.failure)
            meta, n, fp = result.meta, result.n_entries, result.key_fingerprint
            size = result.tree.size if result.tree else 0
            report(0.8, "checking the live database")
            tree = result.tree if result.failure is None else None
            key = pinned if pinned is not None else _recorded_key(meta)
            for check, failure in (
                *([check_pinned_heads(heads, tree, key, meta.get("run_id"))] if heads else []),
                _check_live(layout, tree, pinned),
                check_checkpoint_files(layout, con),
                check_source_data(con, meta, report),
            ):
                checks.append(check)
                failures.append(failure)
        except duckdb.Error as exc:
            raise CorruptRunError(f"{layout.snapshot_db} is damaged ({first_line(exc)})") from None
        finally:
            con.close()
    report(1.0, "done")
    first = next((f for f in failures if f is not None), None)
    return VerifyReport(
        run_dir=str(layout.root),
        run_id=meta.get("run_id"),
        ok=first is None,
        n_entries=n,
        tree_size=size,
        key_fingerprint=fp,
        key_pinned=pinned is not None,
        seconds=time.perf_counter() - t0,
        checks=checks,
        first_failure=first,
    )


def check_before_write(layout: RunLayout, con: duckdb.DuckDBPyConnection, key: Ed25519PublicKey) -> None:
    """What the recorder checks before it appends to (and later signs) an existing run: the live database's rows
    against its ledger, its chain and signed heads (with the key it will sign with), and the published snapshot
    against its own ledger and as a prefix of the live one.  Raises TamperedRunError naming the first difference;
    entries a crashed recorder appended after its last signed head are accepted (they are signed next)."""
    live = ledger_checks(con, pinned=key, allow_unsigned_tail=not _last_session_closed(con))
    if live.failure is not None:
        live.failure.database = LIVE_DB
        raise TamperedRunError(f"{layout.root}: {live.failure}; refusing to record into it (nothing was written)")
    if not layout.snapshot_db.exists():
        return
    try:
        snap_con = connect(layout.snapshot_db, read_only=True)
    except TamperedRunError as exc:
        raise TamperedRunError(f"{exc}; refusing to record into it (nothing was written)") from None
    try:
        snap = ledger_checks(snap_con, pinned=key)
    finally:
        snap_con.close()
    failure = snap.failure
    if failure is not None:
        failure.database = SNAPSHOT_DB
    elif snap.tree is not None and live.tree is not None:
        failure = check_prefix(snap.tree, live.tree)
    if failure is not None:
        raise TamperedRunError(
            f"{layout.root}: {failure}; refusing to record into it, which would overwrite the evidence "
            "(nothing was written)"
        )
