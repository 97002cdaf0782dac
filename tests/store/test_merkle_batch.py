"""The array-built Merkle hashes (`store.merkle_batch`) and what is built on them (id-set roots of batch and
transform entries, the usage index) equal the pure-Python reference in `fgtrac_core.ledger`, leaf for leaf."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch

from fgtrac_core import Run
from fgtrac_core.ledger.entries import members_root
from fgtrac_core.ledger.merkle import EMPTY_ROOT, leaf_hash, root_from_leaf_hashes
from fgtrac_core.ledger.usage_index import index_roots, uses_hash
from fgtrac_core.store.entries import _link_roots
from fgtrac_core.store.merkle_batch import forest_roots, leaf_hashes, rows_as_bytes, tree_root
from fgtrac_core.store.usage_index import read_usage_index


def test_leaf_hashes_equal_the_reference() -> None:
    rows = np.random.default_rng(0).integers(0, 256, (50, 13), dtype=np.uint8)
    assert rows_as_bytes(leaf_hashes(rows)) == [leaf_hash(r.tobytes()) for r in rows]
    assert leaf_hashes(np.zeros((0, 13), np.uint8)).shape == (0, 32)


@pytest.mark.parametrize("width", [8, 16, 13])
def test_repeated_rows_hashed_once_each_equal_the_reference(width: int) -> None:
    """`repeated=True` hashes each distinct row once (rows of whole 8-byte words sorted as integers, others as
    bytes): the same hashes, in the rows' order."""
    rng = np.random.default_rng(width)
    distinct = rng.integers(0, 256, (20, width), dtype=np.uint8)
    rows = distinct[rng.integers(0, 20, 300)]
    assert rows_as_bytes(leaf_hashes(rows, repeated=True)) == [leaf_hash(r.tobytes()) for r in rows]
    assert leaf_hashes(rows[:0], repeated=True).shape == (0, 32)


def test_forest_roots_equal_one_tree_at_a_time() -> None:
    rng = np.random.default_rng(1)
    lengths = np.r_[0, 1, 2, 3, 4, 5, 7, 8, 9, 0, 16, 17, 31, 33, 64, 65, 100, rng.integers(0, 40, 30), 0]
    hashes = rng.integers(0, 256, (int(lengths.sum()), 32), dtype=np.uint8)
    got = rows_as_bytes(forest_roots(hashes, lengths))
    starts = np.r_[0, np.cumsum(lengths)]
    want = [root_from_leaf_hashes(rows_as_bytes(hashes[a:b])) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    assert got == want
    assert got[0] == EMPTY_ROOT and got[1] == hashes[0].tobytes()
    assert tree_root(hashes[:1000]) == root_from_leaf_hashes(rows_as_bytes(hashes[:1000]))
    with pytest.raises(ValueError):
        forest_roots(hashes[:3], np.array([2, 2]))


def test_id_set_roots_equal_the_reference() -> None:
    """Batch entries commit each batch's (id, target) members; NULL targets leave the id alone (a batch of NULL
    targets only commits its ids, as a transform does); negative ids are signed."""
    rng = np.random.default_rng(2)
    sizes = [1, 5, 8, 3, 13, 2]
    keys = np.repeat(np.arange(len(sizes)) * 7, sizes)
    ids = rng.integers(-50, 1_000_000, len(keys))
    values: list[int | None] = [int(v) for v in rng.integers(-3, 10, len(keys))]
    for i in range(sizes[0], sizes[0] + sizes[1]):  # the second set: all NULL
        values[i] = None
    values[-1] = values[7] = None  # and some NULLs among values
    roots = _link_roots(keys, ids, pa.chunked_array([pa.array(values, pa.int32())]))
    id_roots = _link_roots(keys, ids, None)
    starts = np.r_[0, np.cumsum(sizes)]
    for k, (a, b) in zip(np.arange(len(sizes)) * 7, zip(starts[:-1], starts[1:], strict=True), strict=True):
        assert roots[int(k)] == members_root(ids[a:b].tolist(), values[a:b])
        assert id_roots[int(k)] == members_root(ids[a:b].tolist())
    assert roots[7] == id_roots[7]  # NULL targets only: the ids alone
    assert roots[0] != id_roots[0]


def test_id_set_roots_of_samples_used_again_and_again_equal_the_reference() -> None:
    """Batches drawn from few samples (each in many batches, some twice in one, as with sampling with
    replacement), targets that differ between uses of one sample: each distinct leaf is hashed once."""
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 12, 40)
    keys = np.repeat(np.arange(len(sizes)), sizes)
    ids = rng.integers(0, 15, len(keys))
    values = [int(v) for v in rng.integers(0, 3, len(keys))]
    roots = _link_roots(keys, ids, pa.chunked_array([pa.array(values, pa.int32())]))
    id_roots = _link_roots(keys, ids, None)
    starts = np.r_[0, np.cumsum(sizes)]
    for k, (a, b) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        assert roots[k] == members_root(ids[a:b].tolist(), values[a:b])
        assert id_roots[k] == members_root(ids[a:b].tolist())
    assert _link_roots(np.array([], np.int64), np.array([], np.int64), None) == {}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Negative and positive ids, some never used, one used twice in a batch, a second session."""
    out = tmp_path_factory.mktemp("ui") / "run"
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ids = np.r_[-7, -1, np.arange(0, 30, 3)]
    x, y = torch.randn(len(ids), 3), torch.randint(0, 2, (len(ids),))
    run = Run.create(out, name="ui")
    run.register_samples(ids, split="train", labels=y.numpy(), raw=x.numpy())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with run.stage("s", optimizer=opt, model=model):
        for rows in ([0, 1, 2, 2], [3, 0, 5], [1, 7, 8, 0]):
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log_batch(ids[rows], loss=loss)
    run.close()
    return out


def _reference(con: duckdb.DuckDBPyConnection, size: int) -> tuple[bytes, bytes, dict[int, list[tuple[int, int]]]]:
    samples = con.execute(
        "SELECT s.sample_id, s.content_sha256 FROM samples s JOIN ledger l ON l.kind = 'sample' "
        "AND l.ref_id = s.sample_id WHERE l.seq < ?",
        [size],
    ).fetchall()
    uses: dict[int, list[tuple[int, int]]] = {}
    for sid, seq, pos in con.execute(
        "SELECT bs.sample_id, l.seq, bs.position FROM batch_samples bs JOIN ledger l ON l.kind = 'batch' "
        "AND l.ref_id = bs.batch_id WHERE l.seq < ? ORDER BY l.seq, bs.position",
        [size],
    ).fetchall():
        uses.setdefault(sid, []).append((seq, pos))
    usage_root, content_root, _, _ = index_roots(samples, uses)
    return usage_root, content_root, uses


def test_usage_index_equals_the_reference(run: Path) -> None:
    con = duckdb.connect(str(run / "fgtrac.duckdb"), read_only=True)
    size = con.execute("SELECT count(*) FROM ledger").fetchone()[0]
    for at in (size, size // 2):
        ui = read_usage_index(con, at)
        usage_root, content_root, uses = _reference(con, at)
        assert (ui.usage_root, ui.content_root) == (usage_root, content_root)
        assert ui.n_uses == sum(len(u) for u in uses.values())
        for sid in ui.sample_ids.tolist():
            assert ui.uses_of(sid) == uses.get(sid, [])
        assert [leaf[16:] for leaf in ui.usage_leaves] == [uses_hash(uses.get(s, [])) for s in ui.sample_ids.tolist()]
    ui = read_usage_index(con, size)
    assert ui.uses_of(0) and len(ui.uses_of(-1)) == 2 and ui.uses_of(27) == [] and ui.uses_of(12345) == []
    committed = con.execute(
        "SELECT entry FROM ledger WHERE kind = 'usage_index' ORDER BY seq DESC LIMIT 1"
    ).fetchone()[0]
    assert ui.usage_root.hex().encode() in committed and ui.content_root.hex().encode() in committed


def test_an_edited_content_hash_changes_the_root_without_failing(run: Path, tmp_path: Path) -> None:
    db = tmp_path / "x.duckdb"
    shutil.copy(run / "fgtrac.duckdb", db)
    con = duckdb.connect(str(db))
    size = con.execute("SELECT count(*) FROM ledger").fetchone()[0]
    before = read_usage_index(con, size).content_root
    con.execute("UPDATE samples SET content_sha256 = 'not a hash' WHERE sample_id = 3")
    assert read_usage_index(con, size).content_root != before
