"""The queries Explore runs per test example read samples through the primary key's index and never scan the
annotations, and what they return equals the direct joins they replaced (on the sample run)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fgtrac_core.store import RunStore
from fgtrac_core.store.plans import statements

MARK = "label_flipped"


@pytest.fixture(scope="module")
def store(digits_run: Path) -> RunStore:
    with RunStore(digits_run) as s:
        yield s


def _aid_and_tests(store: RunStore) -> tuple[int, list[int]]:
    aid = store.latest_analysis("influence")["analysis_id"]
    return aid, [int(t) for t in store.influence_tests(aid)["sample_id"]]


def test_per_example_queries_use_the_index_and_no_annotation_scan(store: RunStore) -> None:
    aid, tests = _aid_and_tests(store)
    store.marked_ids(MARK)  # read once per snapshot, as the first page of a session does
    test = tests[len(tests) // 2]
    ranked, plans = statements(store, "influence_topk", aid, test, "raw", MARK)
    ids = [int(i) for i in ranked["train_id"]]
    for method, args in (("thumbnails", (ids,)), ("labels_and_marks", (ids, MARK)), ("displays", (ids,))):
        plans += statements(store, method, *args)[1]
    scans = [(s.table, s.kind) for p in plans for s in p.scans]
    assert ("samples", "Index Scan") in scans
    assert [s for s in scans if s[0] == "samples" and s[1] != "Index Scan"] == []
    assert [s for s in scans if s[0] == "sample_annotations"] == []


def test_topk_and_self_influence_equal_the_direct_joins(store: RunStore) -> None:
    aid, tests = _aid_and_tests(store)
    for test in tests[::40]:
        for view in ("raw", "cosine"):
            direct = store.df(
                """SELECT k.direction, k.rank, k.train_id, k.score, k.cosine, k.contributions, s.label,
                          coalesce(a.value = 'true', false) AS flagged
                   FROM influence_topk k JOIN samples s ON s.sample_id = k.train_id
                   LEFT JOIN sample_annotations a ON a.sample_id = k.train_id AND a.key = ?
                   WHERE k.analysis_id = ? AND k.test_id = ? AND k.view = ? ORDER BY k.direction DESC, k.rank""",
                [MARK, aid, test, view],
            )
            ranked = store.influence_topk(aid, test, view, MARK)
            assert not any(len(t) for t in ranked["trained_as"])  # the loop trained on the registered labels
            pd.testing.assert_frame_equal(ranked.drop(columns="trained_as"), direct, check_dtype=False)
    direct = store.df(
        """SELECT si.rank, si.sample_id, si.value, s.label, coalesce(a.value = 'true', false) AS flagged
           FROM self_influence si JOIN samples s USING (sample_id)
           LEFT JOIN sample_annotations a ON a.sample_id = si.sample_id AND a.key = ?
           WHERE si.analysis_id = ? ORDER BY si.rank""",
        [MARK, aid],
    )
    assert direct["flagged"].any()
    ranked = store.self_influence(aid, MARK).drop(columns="trained_as")
    pd.testing.assert_frame_equal(ranked, direct, check_dtype=False)
    top = store.self_influence(aid, MARK, 20).drop(columns="trained_as")
    pd.testing.assert_frame_equal(top, direct.head(20), check_dtype=False)
    assert store.self_influence_count(aid) == len(direct)


def test_id_lists_of_any_length(store: RunStore) -> None:
    """Past DuckDB's index-scan limit (2,048 ids) the literal list still answers, by a scan; none is empty."""
    ids = [int(i) for i in store.samples()["sample_id"]]
    unknown = list(range(10**7, 10**7 + 2100))  # ids no sample has, to pass the limit
    assert len(store.thumbnails(ids + unknown)) == len(ids)
    assert store.labels_and_marks([], MARK).empty and store.thumbnails([]) == {}
    known = store.labels_and_marks(ids + ids[:5] + unknown, MARK)
    assert known["sample_id"].tolist() == sorted(ids)


def test_per_sample_lifecycle_queries_use_the_lookup_indexes(store: RunStore) -> None:
    """A closed run holds the lookup indexes; a sample's uses, self-influence, annotations and transforms are read
    through them, and equal what the whole tables say (read into pandas, or filtered on an expression no index can
    answer)."""
    aid, _ = _aid_and_tests(store)
    uses = store.df("SELECT bs.sample_id, b.step, bs.position FROM batch_samples bs JOIN batches b USING (batch_id)")
    si = store.df("SELECT sample_id, value, rank FROM self_influence WHERE analysis_id = ?", [aid])
    train = int(uses["sample_id"].value_counts().index[0])  # the most used sample
    mine = uses[uses["sample_id"] == train]
    usage, plans = statements(store, "sample_usage", train)
    assert usage.sort_values("step")[["step", "position"]].to_numpy().tolist() == (
        mine.sort_values("step")[["step", "position"]].to_numpy().tolist()
    )
    mid = int(mine["step"].median())
    counts, more = statements(store, "uses_in_steps", train, [(0, mid), (mid + 1, 10**9), (None, None)])
    assert counts == [int((mine["step"] <= mid).sum()), int((mine["step"] > mid).sum()), 0]
    own, most = statements(store, "self_influence_of", aid, train)
    row = si[si["sample_id"] == train].iloc[0]
    assert own == {"value": row["value"], "rank": row["rank"], "n_train": len(si)}
    noted = int(store.df("SELECT max(sample_id) AS i FROM sample_annotations")["i"][0])  # not every sample has one
    record, notes = statements(store, "sample", noted)
    transforms, logged = statements(store, "sample_transforms", noted)
    known = store.df("SELECT key FROM sample_annotations WHERE sample_id + 0 = ? ORDER BY key", [noted])
    assert list(record["annotations"]) == known["key"].tolist() and len(known)
    applied = store.df("SELECT transform_id FROM transform_samples WHERE sample_id + 0 = ?", [noted])
    assert sorted(transforms["transform_id"]) == sorted(applied["transform_id"]) and len(applied)
    scans = {(s.table, s.kind) for p in plans + more + most + notes + logged for s in p.scans}
    large = ("batch_samples", "self_influence", "sample_annotations", "transform_samples")
    assert {t for t, k in scans if k == "Index Scan"} >= set(large)
    assert {k for t, k in scans if t in large} == {"Index Scan"}


def test_self_influence_is_stored_highest_first(store: RunStore) -> None:
    """Rows in rank order, so that the quality page's top n reads the first row groups only (zone maps)."""
    aid, _ = _aid_and_tests(store)
    stored = store.df("SELECT rank, value FROM self_influence WHERE analysis_id = ? ORDER BY row_id", [aid])
    assert stored["rank"].tolist() == list(range(1, len(stored) + 1))
    assert stored["value"].is_monotonic_decreasing


def test_mislabel_detection_equals_a_count_over_the_whole_tables(store: RunStore) -> None:
    aid, _ = _aid_and_tests(store)
    si = store.df("SELECT sample_id, rank FROM self_influence WHERE analysis_id = ?", [aid])
    notes = store.df("SELECT sample_id, value FROM sample_annotations WHERE key = ?", [MARK])
    marked = set(notes.loc[notes["value"] == "true", "sample_id"])
    flipped = si.sort_values("rank")["sample_id"].isin(marked).to_numpy()
    table = store.mislabel_detection(aid, (0.05, 0.5), MARK)
    for row in table.itertuples():
        inspected = max(1, round(row.inspected_fraction * len(si)))
        assert (row.inspected, row.flipped_found) == (inspected, int(flipped[:inspected].sum()))
        assert (row.flipped_total, row.recall) == (int(flipped.sum()), flipped[:inspected].sum() / flipped.sum())
        assert row.precision == flipped[:inspected].sum() / inspected
    assert 0 < table["flipped_found"].iloc[0] < table["flipped_found"].iloc[1]
    assert store.mislabel_detection(aid, (0.1,), "no_such_annotation") is None


def test_lookup_indexes_stay_complete_when_a_run_is_reopened(tmp_path: Path) -> None:
    """Built at the first close, kept up to date by DuckDB through a second session's inserts: a sample's uses read
    through the index equal those of a scan, before and after."""
    import numpy as np
    import torch

    from fgtrac_core.tracking import Run

    def train(run: Run, epochs: int) -> None:
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with run.stage(f"stage{epochs}", optimizer=opt, model=model):
            for epoch in range(epochs):
                for batch in np.arange(8).reshape(4, 2)[::-1] if epoch % 2 else np.arange(8).reshape(4, 2):
                    opt.zero_grad()
                    model(torch.ones(2, 4)).sum().backward()
                    opt.step()
                    run.log_batch(batch, epoch=epoch)

    run = Run.create(tmp_path / "run", name="reopened")
    run.register_samples(np.arange(8), split="train", labels=np.zeros(8, int), raw=np.eye(8, dtype=np.uint8))
    train(run, 2)
    run.close()
    run = Run.open(tmp_path / "run")
    train(run, 3)
    run.close()
    with RunStore(tmp_path / "run") as s:
        uses, plans = statements(s, "sample_usage", 5)
        scanned = s.df(
            "SELECT b.step FROM batch_samples bs JOIN batches b USING (batch_id) WHERE bs.sample_id + 0 = 5"
        )  # an expression on the column: no index can answer it
    assert sorted(uses["step"]) == sorted(scanned["step"]) and len(uses) == 5
    assert ("batch_samples", "Index Scan") in {(sc.table, sc.kind) for p in plans for sc in p.scans}
