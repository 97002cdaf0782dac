"""The targets a sample was trained on other than its registered label (`log_batch(targets=...)`): read per listed
sample through the batch_samples index, equal to what each sample's own uses say, and carried by the ranked lists
as `trained_as`."""

from __future__ import annotations

from pathlib import Path

from fgtrac_core.store import RunStore
from fgtrac_core.store.plans import statements
from tests.stages._loops import RELABEL_B, RELABEL_C


def _from_uses(store: RunStore, sample_id: int) -> list[int]:
    """The reference: the sample's own uses in order, their targets other than its label, each once."""
    label = store.sample(sample_id)["label"]
    used = store.sample_usage(sample_id)["target"].dropna().astype(int)
    return [t for t in dict.fromkeys(used) if t != label]


def test_trained_targets_equal_each_samples_uses(relabelled_run: Path) -> None:
    with RunStore(relabelled_run) as store:
        ids = [int(i) for i in store.samples("train")["sample_id"]]
        expected = {i: t for i in ids if (t := _from_uses(store, i))}
        assert expected == {0: [RELABEL_B[0], RELABEL_C[0]], 5: [RELABEL_B[5]]}
        assert store.trained_targets(ids) == expected
        assert store.trained_targets([]) == {}
        _, plans = statements(store, "trained_targets", ids[:20])
        scans = {(s.table, s.kind) for p in plans for s in p.scans}
        assert ("batch_samples", "Index Scan") in scans, scans


def test_ranked_lists_carry_the_trained_targets(relabelled_run: Path) -> None:
    with RunStore(relabelled_run) as store:
        aid = store.latest_analysis("influence")["analysis_id"]
        ranked = store.self_influence(aid)
        topk = store.influence_topk(aid, int(store.influence_tests(aid)["sample_id"][0]))
    trained = dict(zip(ranked["sample_id"], ranked["trained_as"], strict=True))
    assert trained[0] == [RELABEL_B[0], RELABEL_C[0]] and trained[5] == [RELABEL_B[5]] and trained[9] == []
    assert all(t == trained[i] for i, t in zip(topk["train_id"], topk["trained_as"], strict=True))
