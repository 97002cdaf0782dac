"""A reviewer's attacks on the ledger, each reproduced: split-brain views, objects that run logic, edits to the
live database or to the snapshot alone.  Each is refused or detected with one line naming it, and a refused
`Run.open` changes nothing in the run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import pytest

from fgtrac_core import Run
from fgtrac_core.errors import TamperedRunError
from fgtrac_core.ledger import chain_step, leaf_hash
from fgtrac_core.ledger.entries import entry_bytes
from fgtrac_core.store import RunStore
from fgtrac_core.verify import verify_run
from tests.conftest import run_cli

LIVE, SNAPSHOT = "fgtrac.duckdb", "snapshot.duckdb"


def _tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _split_brain(db: Path) -> None:
    """The reported attack: `samples` becomes a view that shows the recorded label to the verifier (whose
    queries format timestamps with strftime) and a forged label to everyone else."""
    with duckdb.connect(str(db)) as con:
        con.execute("ALTER TABLE samples RENAME TO samples_real")
        con.execute(
            """CREATE VIEW samples AS SELECT sample_id, split,
                   CASE WHEN current_query() LIKE '%strftime%' THEN label ELSE (label + 1) % 10 END AS label,
                   content_sha256, thumbnail, thumbnail_sha256, source, registered_at FROM samples_real"""
        )


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fgtrac: error:"), proc.stderr
    return lines[0]


def _first_test_id(run: Path) -> int:
    with RunStore(run) as store:
        return int(store.samples("train")["sample_id"].iloc[0])


@pytest.mark.parametrize("db", [SNAPSHOT, LIVE])
def test_split_brain_view_is_named_by_every_command(digits_copy: Path, db: str) -> None:
    sample = _first_test_id(digits_copy)
    _split_brain(digits_copy / db)
    code, text = _verify(digits_copy)
    assert code == 1 and db in text and "view" in text and "samples" in text, text
    if db == SNAPSHOT:  # readers open the snapshot: they refuse rather than show forged labels
        for args in (("sample", str(digits_copy), str(sample)), ("info", str(digits_copy)),
                     ("influence", str(digits_copy), "--k", "3")):  # fmt: skip
            line = _one_line_error(run_cli(*args))
            assert "view" in line and "tampering" in line, line
    before = _tree_hash(digits_copy)
    with pytest.raises(TamperedRunError, match="view"):
        Run.open(digits_copy)
    assert _tree_hash(digits_copy) == before


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        ("CREATE MACRO current_label(x) AS x + 1", "macro"),
        ("CREATE SEQUENCE s", "sequence"),
        ("CREATE TABLE extra (x INTEGER)", "table"),
        ("CREATE INDEX i ON samples (label)", "index"),
        # one of fgtrac's lookup indexes under its own name, on another column
        ("DROP INDEX batch_samples_by_sample; CREATE INDEX batch_samples_by_sample ON batch_samples (batch_id)",
         "index"),  # fmt: skip
        ("CREATE TYPE mood AS ENUM ('a')", "type"),
        ("CREATE SCHEMA evil", "schema"),
        ("ALTER TABLE samples ALTER COLUMN source SET DEFAULT 'x'", "column"),
        ("ALTER TABLE batches ALTER COLUMN lr TYPE FLOAT", "column"),
    ],
)
def test_any_object_fgtrac_never_creates_is_tampering(digits_copy: Path, sql: str, named: str) -> None:
    with duckdb.connect(str(digits_copy / SNAPSHOT)) as con:
        con.execute(sql)
    report = verify_run(digits_copy)
    assert not report.ok and report.first_failure.check == "schema", report.first_failure
    assert named in str(report.first_failure), report.first_failure


def test_a_run_without_the_lookup_indexes_verifies(digits_copy: Path) -> None:
    """They are built when a session closes: a crashed session's run (or one recorded before them) lacks them."""
    for db in (SNAPSHOT, LIVE):
        with duckdb.connect(str(digits_copy / db)) as con:
            con.execute("SELECT index_name FROM duckdb_indexes()")
            for (name,) in con.fetchall():
                con.execute(f"DROP INDEX {name}")
    report = verify_run(digits_copy)
    assert report.ok, report.first_failure


def _verify(run: Path) -> tuple[int, str]:
    proc = run_cli("verify", str(run))
    assert "Traceback" not in proc.stderr, proc.stderr
    tampered = [ln for ln in proc.stdout.splitlines() if ln.startswith("TAMPERED:")]
    return proc.returncode, tampered[0] if tampered else proc.stdout + proc.stderr


def test_live_only_edit_is_detected_and_never_signed(digits_copy: Path) -> None:
    with duckdb.connect(str(digits_copy / LIVE)) as con:
        sid = con.execute("SELECT min(sample_id) FROM samples").fetchall()[0][0]
        con.execute("UPDATE samples SET label = (label + 1) % 10 WHERE sample_id = ?", [sid])
    code, text = _verify(digits_copy)
    assert code == 1 and text.startswith(f"TAMPERED: {LIVE}: samples row sample_id={sid} field label"), text
    before = _tree_hash(digits_copy)
    with pytest.raises(TamperedRunError, match=f"{LIVE}: samples row sample_id={sid} field label"):
        Run.open(digits_copy)
    assert _tree_hash(digits_copy) == before


def test_live_only_insert_with_a_forged_entry_is_refused(digits_copy: Path) -> None:
    """An inserted row with a well-formed ledger entry (leaf and chain hash recomputed: no key needed) would be
    signed by the owner's next session; after a clean close there may be no unsigned entries."""
    with duckdb.connect(str(digits_copy / LIVE)) as con:
        row = {"sample_id": 10**9, "split": "train", "label": 3, "content_sha256": "0" * 64,
               "thumbnail_sha256": None, "display": None, "source": "forged",
               "registered_at": "2026-01-01T00:00:00.000000"}  # fmt: skip
        con.execute("INSERT INTO samples VALUES (?, ?, ?, ?, NULL, NULL, NULL, ?, ?)",
                    [row["sample_id"], "train", 3, "0" * 64, "forged", "2026-01-01 00:00:00"])  # fmt: skip
        seq, chain = con.execute("SELECT seq, chain_hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchall()[0]
        entry = entry_bytes("sample", row)
        lh = leaf_hash(entry)
        con.execute(
            "INSERT INTO ledger VALUES (?, 'sample', ?, NULL, ?, ?, ?)",
            [seq + 1, row["sample_id"], entry, lh, chain_step(bytes(chain), lh)],
        )
    code, text = _verify(digits_copy)
    assert code == 1 and LIVE in text and "not covered by any signed tree head" in text, text
    with pytest.raises(TamperedRunError, match="not covered by any signed tree head"):
        Run.open(digits_copy)


def test_live_only_insert_without_entry_is_refused(digits_copy: Path) -> None:
    with duckdb.connect(str(digits_copy / LIVE)) as con:
        con.execute("INSERT INTO sample_annotations VALUES ((SELECT min(sample_id) FROM samples), 'forged', 'x')")
    code, text = _verify(digits_copy)
    assert code == 1 and "no ledger entry" in text and LIVE in text, text
    with pytest.raises(TamperedRunError, match="no ledger entry"):
        Run.open(digits_copy)


def test_snapshot_only_edit_is_not_overwritten_by_reopening(digits_copy: Path) -> None:
    with duckdb.connect(str(digits_copy / SNAPSHOT)) as con:
        con.execute("UPDATE batches SET lr = lr * 2 WHERE batch_id = 3")
    evidence = hashlib.sha256((digits_copy / SNAPSHOT).read_bytes()).hexdigest()
    code, text = _verify(digits_copy)
    assert code == 1 and text.startswith("TAMPERED: batches row batch_id=3 field lr"), text
    with pytest.raises(TamperedRunError, match=f"{SNAPSHOT}: batches row batch_id=3 field lr"):
        Run.open(digits_copy)
    assert hashlib.sha256((digits_copy / SNAPSHOT).read_bytes()).hexdigest() == evidence


def test_replaced_snapshot_of_another_history_is_not_a_prefix(digits_copy: Path, tmp_path: Path) -> None:
    """Both files verify on their own, but the snapshot is not an earlier state of the live database."""
    other = tmp_path / "other"
    run = Run.create(other, name="other")
    run.close()
    (digits_copy / SNAPSHOT).write_bytes((other / SNAPSHOT).read_bytes())
    report = verify_run(digits_copy)
    assert not report.ok


def test_intact_run_reopens_and_verifies_both_files(digits_copy: Path) -> None:
    run = Run.open(digits_copy)
    run.close()
    report = verify_run(digits_copy)
    assert report.ok, report.first_failure
    live = next(c for c in report.checks if c.name == "live_database")
    assert live.ok is True, live
