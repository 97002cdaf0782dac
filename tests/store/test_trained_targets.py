"""The targets a sample was trained on other than its registered label (`log_batch(targets=...)`): read per listed
sample through the batch_samples index, equal to what each sample's own uses say, carried by the ranked lists as
`trained_as` and shown by the dashboard as "label→target"."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from app import ui
from fgtrac_core.stages.replay import deterministic
from fgtrac_core.store import RunStore
from fgtrac_core.store.plans import statements
from tests.app._support import PAGES, open_page
from tests.conftest import run_cli
from tests.stages._loops import INPUTS_REF, MODEL_REF, StageCfg, dataset, record


def _sgd(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.1)


LABELS = dataset()[1]
# sample 0 is trained on two other targets in turn, sample 5 on one, sample 9 on its own label again
RELABEL_B = {0: (int(LABELS[0]) + 1) % 3, 5: (int(LABELS[5]) + 1) % 3, 9: int(LABELS[9])}
RELABEL_C = {0: (int(LABELS[0]) + 2) % 3}


@pytest.fixture(scope="module")
def relabelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("relabelled") / "run"
    stages = [
        StageCfg("a", _sgd, None, epochs=1),
        StageCfg("b", _sgd, None, epochs=1, labels=RELABEL_B),
        StageCfg("c", _sgd, None, epochs=1, labels=RELABEL_C),
    ]
    with deterministic(1):
        record(run_dir, stages, targets=True)
    proc = run_cli("influence", str(run_dir), "--model", MODEL_REF, "--inputs", INPUTS_REF, "--head-layer", "head")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dir


def _from_uses(store: RunStore, sample_id: int) -> list[int]:
    """The reference: the sample's own uses in order, their targets other than its label, each once."""
    label = store.sample(sample_id)["label"]
    used = store.sample_usage(sample_id)["target"].dropna().astype(int)
    return [t for t in dict.fromkeys(used) if t != label]


def test_trained_targets_equal_each_samples_uses(relabelled: Path) -> None:
    with RunStore(relabelled) as store:
        ids = [int(i) for i in store.samples("train")["sample_id"]]
        expected = {i: t for i in ids if (t := _from_uses(store, i))}
        assert expected == {0: [RELABEL_B[0], RELABEL_C[0]], 5: [RELABEL_B[5]]}
        assert store.trained_targets(ids) == expected
        assert store.trained_targets([]) == {}
        _, plans = statements(store, "trained_targets", ids[:20])
        scans = {(s.table, s.kind) for p in plans for s in p.scans}
        assert ("batch_samples", "Index Scan") in scans, scans


def test_ranked_lists_carry_it_and_the_pages_show_it(relabelled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with RunStore(relabelled) as store:
        aid = store.latest_analysis("influence")["analysis_id"]
        ranked = store.self_influence(aid)
    trained = dict(zip(ranked["sample_id"], ranked["trained_as"], strict=True))
    assert trained[0] == [RELABEL_B[0], RELABEL_C[0]] and trained[5] == [RELABEL_B[5]] and trained[9] == []
    row = ranked[ranked["sample_id"] == 0].iloc[0]
    assert ui.label_text(row) == f"{int(LABELS[0])}→{RELABEL_B[0]}→{RELABEL_C[0]}" + (" ⚠" if row.flagged else "")
    assert ui.relabel_legend(ranked) and not ui.relabel_legend(ranked[ranked["sample_id"] == 9])
    at = open_page(relabelled, PAGES[4], monkeypatch, n="200")  # Data quality: every training sample listed
    shown = pd.concat([f.value for f in at.dataframe if "label" in f.value.columns])
    assert shown.loc["#0", "label"] == ui.label_text(row)
    assert shown.loc["#9", "label"] == str(int(LABELS[9]))
    assert any("trained on target" in c.value for c in at.caption)
