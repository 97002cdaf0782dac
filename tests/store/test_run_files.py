"""The one trusted path for run files: the checked loader, committed facts from the ledger, exclusive temporaries
and stale-temporary cleanup, and every command that reads checkpoints refusing files outside the run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
import torch

from fgtrac_core import Run
from fgtrac_core.checkpoint_files import load_checkpoint_payload
from fgtrac_core.errors import RunFileError
from fgtrac_core.ledger import chain_hashes, decode_entry, encode_entry, leaf_hash
from fgtrac_core.ledger.entries import entry_bytes
from fgtrac_core.store import run_files
from fgtrac_core.store.db import publish_snapshot
from fgtrac_core.store.layout import RunLayout
from fgtrac_core.store.run_files import (
    CommittedCheckpoint,
    checkpoint_file_problem,
    committed_checkpoints,
    read_run_file,
    remove_stale_temporaries,
    write_file_atomic,
)
from tests.conftest import run_cli

DATA = b"checkpoint bytes " * 64
SHA = hashlib.sha256(DATA).hexdigest()


def _tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (links as their target text) -> SHA-256 of its bytes."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = "link:" + os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _sentinel(tmp_path: Path) -> Path:
    """A directory tree outside any run, holding a copy of DATA (so size and hash match) and other files."""
    s = tmp_path / "sentinel"
    (s / "deep").mkdir(parents=True)
    (s / "secret.pt").write_bytes(DATA)
    (s / "deep" / "notes.txt").write_text("do not touch\n")
    return s


@pytest.fixture
def layout(tmp_path: Path) -> RunLayout:
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "a.pt").write_bytes(DATA)
    _sentinel(tmp_path)
    return RunLayout.of(root)


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail instead of hanging when a FIFO open blocks."""

    def fire(*_: object) -> None:
        raise TimeoutError("blocked")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _refused(layout: RunLayout, rel: str, needle: str, **kw: object) -> str:
    kw = {"sha256": SHA, "size_bytes": len(DATA), **kw}
    with pytest.raises(RunFileError) as info:
        read_run_file(layout, rel, **kw)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "\n" not in msg and repr(rel) in msg and needle in msg, msg
    problem = run_files.run_file_problem(layout, rel, sha256=kw["sha256"], size_bytes=kw["size_bytes"])  # type: ignore[arg-type]
    if "max_bytes" not in kw:
        assert problem is not None and "\n" not in problem
    return msg


# ------------------------------------------------------------------------------------------- the loader


def test_a_plain_checkpoint_is_read(layout: RunLayout) -> None:
    assert read_run_file(layout, "checkpoints/a.pt", sha256=SHA, size_bytes=len(DATA)) == DATA
    committed = CommittedCheckpoint(3, "checkpoints/a.pt", SHA, len(DATA))
    assert checkpoint_file_problem(layout, committed) is None


@pytest.mark.parametrize(
    ("rel", "needle"),
    [
        ("../sentinel/secret.pt", "'..' component"),
        ("checkpoints/../../sentinel/secret.pt", "'..' component"),
        ("/etc/passwd", "absolute path"),
        ("/dev/zero", "absolute path"),
        ("", "is not a path"),
        ("checkpoints//a.pt", "not a plain relative path"),
        ("./checkpoints/a.pt", "not a plain relative path"),
        ("checkpoints/missing.pt", "is missing"),
        ("checkpoints", "a directory"),
    ],
)
def test_paths_outside_or_not_files_are_refused(layout: RunLayout, rel: str, needle: str) -> None:
    _refused(layout, rel, needle)


def test_a_fifo_is_refused_without_blocking(layout: RunLayout, alarm: None) -> None:
    os.mkfifo(layout.root / "checkpoints" / "pipe.pt")
    _refused(layout, "checkpoints/pipe.pt", "a FIFO")


def test_a_symlink_pointing_outside_is_refused(layout: RunLayout, tmp_path: Path) -> None:
    (layout.root / "checkpoints" / "link.pt").symlink_to(tmp_path / "sentinel" / "secret.pt")
    _refused(layout, "checkpoints/link.pt", "outside the run directory")


def test_a_symlink_inside_the_run_is_refused(layout: RunLayout) -> None:
    (layout.root / "checkpoints" / "inner.pt").symlink_to("a.pt")
    _refused(layout, "checkpoints/inner.pt", "symbolic link")


def test_a_symlink_to_a_device_is_refused(layout: RunLayout) -> None:
    (layout.root / "checkpoints" / "zero.pt").symlink_to("/dev/zero")
    _refused(layout, "checkpoints/zero.pt", "outside the run directory")


def test_a_symlinked_checkpoints_directory_is_refused(layout: RunLayout, tmp_path: Path) -> None:
    real = layout.root / "checkpoints"
    real.rename(layout.root / "elsewhere")
    real.symlink_to("elsewhere")  # inside the run, still a link
    _refused(layout, "checkpoints/a.pt", "symbolic link")
    real.unlink()
    real.symlink_to(tmp_path / "sentinel")  # outside, holding a file with the committed size and hash
    _refused(layout, "checkpoints/secret.pt", "outside the run directory")


def test_a_link_swapped_in_after_the_path_check_is_still_refused(
    layout: RunLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The open walks the path with O_NOFOLLOW from the run directory's descriptor: no check-then-use race."""
    real = layout.root / "checkpoints"
    real.rename(layout.root / "elsewhere")
    real.symlink_to(tmp_path / "sentinel")
    (tmp_path / "sentinel" / "a.pt").write_bytes(DATA)
    monkeypatch.setattr(run_files.os.path, "realpath", lambda p: str(p))  # the lexical check sees no link
    _refused(layout, "checkpoints/a.pt", "symbolic link or a non-directory")
    (layout.root / "elsewhere" / "b.pt").symlink_to(tmp_path / "sentinel" / "secret.pt")
    _refused(layout, "elsewhere/b.pt", "symbolic link")


def test_sizes_and_hashes_must_match_the_committed_ones(layout: RunLayout) -> None:
    _refused(layout, "checkpoints/a.pt", "too large to load", max_bytes=100)
    _refused(layout, "checkpoints/a.pt", "does not match the ledger: it is", size_bytes=len(DATA) - 1)
    _refused(layout, "checkpoints/a.pt", "does not match the ledger: its SHA-256", sha256="0" * 64)
    _refused(layout, "checkpoints/a.pt", "no valid committed size", size_bytes=-1)
    _refused(layout, "checkpoints/a.pt", "no valid committed SHA-256", sha256="abc")


def test_a_huge_committed_size_is_refused_before_reading(layout: RunLayout) -> None:
    _refused(layout, "checkpoints/a.pt", "too large to load", size_bytes=1 << 50)


def test_the_torch_loader_turns_a_bad_pickle_into_one_line(layout: RunLayout) -> None:
    committed = CommittedCheckpoint(7, "checkpoints/a.pt", SHA, len(DATA))
    with pytest.raises(RunFileError, match=r"^checkpoint 7 file 'checkpoints/a.pt' cannot be loaded: ") as info:
        load_checkpoint_payload(layout, committed)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- committed facts


def _ledger_db(*, entry_path: str, table_path: str, with_entry: bool = True) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("CREATE TABLE checkpoints (checkpoint_id INTEGER, path VARCHAR, sha256 VARCHAR, size_bytes BIGINT)")
    con.execute("CREATE TABLE ledger (seq BIGINT, kind VARCHAR, ref_id BIGINT, ref_key VARCHAR, entry BLOB)")
    con.execute("INSERT INTO checkpoints VALUES (0, ?, ?, ?)", [table_path, SHA, len(DATA)])
    row = {
        "checkpoint_id": 0, "step": 5, "stage_id": 0, "epoch": 0, "kind": "periodic", "lr": 0.1, "val_loss": None,
        "metrics": "{}", "optimizer": "SGD", "path": entry_path, "sha256": SHA, "size_bytes": len(DATA),
        "created_at": "2026-01-01T00:00:00.000000",
    }  # fmt: skip
    if with_entry:
        con.execute("INSERT INTO ledger VALUES (0, 'checkpoint', 0, NULL, ?)", [entry_bytes("checkpoint", row)])
    return con


def test_committed_facts_come_from_the_ledger_entry() -> None:
    con = _ledger_db(entry_path="checkpoints/a.pt", table_path="checkpoints/a.pt")
    assert committed_checkpoints(con) == {0: CommittedCheckpoint(0, "checkpoints/a.pt", SHA, len(DATA))}
    assert run_files.committed_checkpoint(con, 0).path == "checkpoints/a.pt"


def test_a_table_row_that_disagrees_with_its_entry_is_refused() -> None:
    con = _ledger_db(entry_path="checkpoints/a.pt", table_path="../sentinel/secret.pt")
    with pytest.raises(RunFileError, match="checkpoint 0: the checkpoints table's path '../sentinel/secret.pt' differs"):
        committed_checkpoints(con)
    con = _ledger_db(entry_path="checkpoints/a.pt", table_path="checkpoints/a.pt", with_entry=False)
    with pytest.raises(RunFileError, match="checkpoint 0 .* has no ledger entry"):
        run_files.committed_checkpoint(con, 0)


# ------------------------------------------------------------------------------------------- writing


def test_atomic_writes_never_follow_planted_links(layout: RunLayout, tmp_path: Path) -> None:
    before = _tree_digest(tmp_path / "sentinel")
    ck = layout.root / "checkpoints"
    for name in ("b.pt.tmp", "b.pt.tmp-1", f"b.pt.tmp-{os.getpid()}"):
        (ck / name).symlink_to(tmp_path / "sentinel" / "secret.pt")
    (ck / "b.pt").symlink_to(tmp_path / "sentinel" / "deep" / "notes.txt")
    write_file_atomic(ck / "b.pt", b"new")
    assert not (ck / "b.pt").is_symlink() and (ck / "b.pt").read_bytes() == b"new"
    assert _tree_digest(tmp_path / "sentinel") == before
    (layout.root / "linked").symlink_to(tmp_path / "sentinel")
    with pytest.raises(OSError):
        write_file_atomic(layout.root / "linked" / "c.pt", b"x")
    assert _tree_digest(tmp_path / "sentinel") == before


def test_stale_temporaries_are_unlinked_without_following_links(layout: RunLayout, tmp_path: Path) -> None:
    before = _tree_digest(tmp_path / "sentinel")
    (layout.root / "snapshot.duckdb.tmp-123").write_bytes(b"stale")
    (layout.root / "snapshot.duckdb.tmp-456").symlink_to(tmp_path / "sentinel" / "secret.pt")
    (layout.root / "checkpoints" / "a.pt.tmp").symlink_to(tmp_path / "sentinel")
    (layout.root / "checkpoints" / "b.pt.tmp-abc").write_bytes(b"stale")
    (layout.root / "keep.tmp").write_bytes(b"not ours")
    removed = remove_stale_temporaries(layout)
    assert sorted(removed) == [
        "checkpoints/a.pt.tmp", "checkpoints/b.pt.tmp-abc", "snapshot.duckdb.tmp-123", "snapshot.duckdb.tmp-456"
    ]  # fmt: skip
    assert (layout.root / "keep.tmp").exists() and (layout.root / "checkpoints" / "a.pt").exists()
    assert _tree_digest(tmp_path / "sentinel") == before
    # a linked checkpoints directory is never entered
    (tmp_path / "sentinel" / "x.pt.tmp").write_bytes(b"outside")
    before = _tree_digest(tmp_path / "sentinel")
    (layout.root / "checkpoints").rename(layout.root / "old")
    (layout.root / "checkpoints").symlink_to(tmp_path / "sentinel")
    assert remove_stale_temporaries(layout) == []
    assert _tree_digest(tmp_path / "sentinel") == before


def test_publish_snapshot_writes_through_an_exclusive_temporary(tmp_path: Path) -> None:
    sentinel = _sentinel(tmp_path)
    before = _tree_digest(sentinel)
    root = tmp_path / "run"
    root.mkdir()
    live, snap = root / "fgtrac.duckdb", root / "snapshot.duckdb"
    for name in (f"snapshot.duckdb.tmp-{os.getpid()}", "snapshot.duckdb.tmp-1", "snapshot.duckdb.tmp"):
        (root / name).symlink_to(sentinel / "secret.pt")
    con = duckdb.connect(str(live))
    con.execute("CREATE TABLE t AS SELECT range AS x FROM range(1000)")
    publish_snapshot(con, live, snap)
    con.execute("INSERT INTO t VALUES (1000)")
    publish_snapshot(con, live, snap)  # over an existing snapshot
    snap.unlink()
    snap.symlink_to(sentinel / "deep" / "notes.txt")  # a planted link at the snapshot itself is replaced
    publish_snapshot(con, live, snap)
    assert not snap.is_symlink()
    with duckdb.connect(str(snap), read_only=True) as reader:
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (1001,)
    # the live database is still locked against a second writer (the copy ran in a child process)
    other = subprocess.run(
        [sys.executable, "-c", f"import duckdb; duckdb.connect({str(live)!r})"], capture_output=True, text=True
    )
    assert other.returncode != 0 and "lock" in other.stderr.lower(), other.stderr
    con.close()
    assert _tree_digest(sentinel) == before
    left = sorted(p.name for p in root.iterdir())
    assert left == ["fgtrac.duckdb", "snapshot.duckdb", "snapshot.duckdb.tmp", "snapshot.duckdb.tmp-1",
                    f"snapshot.duckdb.tmp-{os.getpid()}"]  # fmt: skip


def test_recording_with_planted_links_leaves_the_targets_alone(tmp_path: Path) -> None:
    sentinel = _sentinel(tmp_path)
    before = _tree_digest(sentinel)
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "snapshot.duckdb.tmp-99999").symlink_to(sentinel / "secret.pt")  # stale, removed at create
    model = torch.nn.Linear(3, 2)
    run = Run.create(root, name="planted")
    assert not (root / "snapshot.duckdb.tmp-99999").is_symlink()
    planted = [
        f"snapshot.duckdb.tmp-{os.getpid()}", "snapshot.duckdb.tmp-1", "snapshot.duckdb.tmp",
        "checkpoints/00000-step00000000-periodic.pt.tmp", f"checkpoints/00000-step00000000-periodic.pt.tmp-{os.getpid()}",
        "checkpoints/00001-step00000000-periodic.pt.tmp",
    ]  # fmt: skip
    for name in planted:
        (root / name).symlink_to(sentinel / "secret.pt")
    (root / "checkpoints" / "00000-step00000000-periodic.pt").symlink_to(sentinel / "deep" / "notes.txt")
    run.publish()
    rec = run.checkpoint(model)
    run.checkpoint(model)
    run.close()
    assert _tree_digest(sentinel) == before
    ck = root / rec.path
    assert not ck.is_symlink() and torch.load(ck, weights_only=True)["checkpoint_id"] == 0
    assert all((root / name).is_symlink() for name in planted)  # not ours to remove while recording
    run = Run.open(root)
    try:
        assert not any(os.path.lexists(root / name) for name in planted)
        assert not list(root.glob("snapshot.duckdb.tmp*")) and not list(root.glob("checkpoints/*.tmp*"))
    finally:
        run.close()
    assert _tree_digest(sentinel) == before
    with duckdb.connect(str(root / "snapshot.duckdb"), read_only=True) as con:
        facts = committed_checkpoints(con)
    assert all(checkpoint_file_problem(RunLayout.of(root), c) is None for c in facts.values())


# ------------------------------------------------------------------------------------------- end to end


def _rewrite_checkpoint_paths(db: Path, new_path: str) -> None:
    """Point every checkpoint at `new_path` in its table row and its ledger entry (leaf and chain hashes
    recomputed), so a command reaches the file itself."""
    import pyarrow as pa

    with duckdb.connect(str(db)) as con:
        con.execute("UPDATE checkpoints SET path = ?", [new_path])
        rows = con.execute("SELECT seq, kind, entry FROM ledger ORDER BY seq").fetchall()
        entries, leaves = {}, []
        for seq, kind, entry in rows:
            data = bytes(entry)
            if kind == "checkpoint":
                k, body = decode_entry(data)
                body["path"] = new_path
                entries[seq] = data = encode_entry(k, body)
            leaves.append(leaf_hash(data))
        new = pa.table(
            {
                "seq": [r[0] for r in rows],
                "entry": [entries.get(r[0], bytes(r[2])) for r in rows],
                "leaf": leaves,
                "chain": chain_hashes(leaves),
            }
        )
        con.from_arrow(new).create("_new")
        con.execute(
            "UPDATE ledger SET entry = n.entry, leaf_hash = n.leaf, chain_hash = n.chain FROM _new n "
            "WHERE ledger.seq = n.seq"
        )
        con.execute("DROP TABLE _new")


@pytest.mark.parametrize("target", ["../outside.pt", "/etc/passwd", "/dev/zero", "checkpoints/link.pt"])
def test_commands_that_read_checkpoints_refuse_files_outside_the_run(
    digits_copy: Path, tmp_path: Path, target: str
) -> None:
    sentinel = _sentinel(tmp_path)
    with duckdb.connect(str(digits_copy / "snapshot.duckdb"), read_only=True) as con:
        first = con.execute("SELECT path FROM checkpoints ORDER BY checkpoint_id LIMIT 1").fetchone()[0]
    # the file outside holds the very bytes recorded: only its place gives it away
    (tmp_path / "outside.pt").write_bytes((digits_copy / first).read_bytes())
    (sentinel / "copy.pt").write_bytes((digits_copy / first).read_bytes())
    (digits_copy / "checkpoints" / "link.pt").symlink_to(sentinel / "copy.pt")
    before = _tree_digest(sentinel), hashlib.sha256((tmp_path / "outside.pt").read_bytes()).hexdigest()
    for db in ("fgtrac.duckdb", "snapshot.duckdb"):
        _rewrite_checkpoint_paths(digits_copy / db, target)
    for args in (["verify"], ["influence", "--k", "3"], ["stages"]):
        proc = run_cli(args[0], str(digits_copy), *args[1:])
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, (args, out)
        assert "Traceback" not in out and "MemoryError" not in out, (args, out)
        assert len(proc.stderr.strip().splitlines()) <= 1, (args, proc.stderr)
        if args[0] != "verify":  # verify reports on stdout; the lead's checks may name an earlier failure
            assert proc.stderr.strip(), (args, out)
    assert (_tree_digest(sentinel), hashlib.sha256((tmp_path / "outside.pt").read_bytes()).hexdigest()) == before


def test_loaders_refuse_a_rewritten_path_before_reading(digits_copy: Path, tmp_path: Path) -> None:
    """In-process: stages and influence name the recorded path and the problem, never read the file."""
    from fgtrac_core.influence.run_influence import _chosen_checkpoints
    from fgtrac_core.stages._records import load_training
    from fgtrac_core.store.reader import RunStore

    _rewrite_checkpoint_paths(digits_copy / "snapshot.duckdb", "/dev/zero")
    with RunStore(digits_copy) as store:
        with pytest.raises(RunFileError, match=r"checkpoint \d+ file '/dev/zero' is an absolute path"):
            load_training(store)
        with pytest.raises(RunFileError, match=r"checkpoint \d+ file '/dev/zero' is an absolute path"):
            _chosen_checkpoints(store, "all", 0.0)
    # a table row edited without its ledger entry
    with duckdb.connect(str(digits_copy / "snapshot.duckdb")) as con:
        con.execute("UPDATE checkpoints SET path = 'checkpoints/other.pt' WHERE checkpoint_id = 0")
    with RunStore(digits_copy) as store, pytest.raises(RunFileError, match="checkpoints table's path 'checkpoints/"):
        _chosen_checkpoints(store, "all", 0.0)

