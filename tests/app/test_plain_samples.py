"""Every page on a run without thumbnails (the tabular sample run, `fgtrac demo --pipeline tabular`): samples are
listed with id, label, score, ⚠ mark and feature values, never blank; analysis and mark pickers follow the URL;
unverified stage estimates and unfinished stages are flagged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fgtrac_core.store import RunStore
from fgtrac_core.tracking import Run
from tests.app._support import PAGES, open_page, plain
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def facts(tabular_run: Path) -> dict:
    with RunStore(tabular_run) as store:
        analysis = store.latest_analysis("influence")
        aid = analysis["analysis_id"]
        tests = store.influence_tests(aid)
        # a test example whose top-10 proponents or opponents hold a sample annotated label_flipped
        for test_id in tests["sample_id"]:
            ranked = store.influence_topk(aid, int(test_id), "raw")
            if (ranked["rank"].le(10) & ranked["flagged"]).any():
                break
        return {
            "aid": aid,
            "test_id": int(test_id),
            "ranked": ranked,
            "test_features": store.sample(int(test_id))["display"],
            "self_influence": store.self_influence(aid),
            "stage_analysis": store.latest_analysis("stages"),
            "n_thumbnails": store.df("SELECT count(thumbnail) AS n FROM samples")["n"][0],
        }


def _table(at, first_row: str):  # noqa: ANN001, ANN202 (AppTest)
    """The dataframe whose first row is labelled `first_row` (a sample table: index '#id' or 'test #id')."""
    for frame in at.dataframe:
        if len(frame.value) and str(frame.value.index[0]) == first_row:
            return frame.value
    raise AssertionError(f"no table starting at {first_row!r}")


def test_the_run_has_no_thumbnails(facts: dict) -> None:
    assert facts["n_thumbnails"] == 0 and isinstance(facts["test_features"], dict)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_opens(tabular_run: Path, page: str, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(tabular_run, page, monkeypatch)
    assert not at.exception and not at.error, [e.value for e in at.error]


def test_explore_lists_proponents_and_opponents_with_features(
    tabular_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    test_id = facts["test_id"]
    at = open_page(tabular_run, PAGES[0], monkeypatch, test=str(test_id))
    assert not at.get("imgs") and len(at.image) == 0  # nothing pretends to be an image
    ranked = facts["ranked"]
    header = at.dataframe[0].value  # the test example's own feature values under its header
    assert header.iloc[0].to_dict() == pytest.approx(facts["test_features"])
    first = (
        f"test #{test_id}"  # each list starts with the test example's own values, to read the others against
    )
    tables = [f.value for f in at.dataframe if len(f.value) and str(f.value.index[0]) == first]
    assert len(tables) == 2
    for direction, table in zip(("proponent", "opponent"), tables, strict=True):
        rows = ranked[(ranked["direction"] == direction) & (ranked["rank"] <= 10)]
        shown = table.iloc[1:]
        assert shown.index.tolist() == [f"#{i}" for i in rows["train_id"]]
        assert shown["score"].tolist() == [f"{s:+.3g}" for s in rows["score"]]
        marks = [f"{lbl}{' ⚠' if f else ''}" for lbl, f in zip(rows["label"], rows["flagged"], strict=True)]
        assert shown["label"].tolist() == marks
        features = [c for c in table.columns if c not in ("label", "score")]
        assert 1 <= len(features) <= 8 and set(features) <= set(facts["test_features"])
        assert table.loc[first, features].tolist() == pytest.approx(
            [facts["test_features"][f] for f in features]
        )
    assert any("⚠" in lbl for f in at.dataframe for lbl in f.value.get("label", []))


def test_stages_page_lists_helped_and_hurt_with_scores(
    tabular_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = open_page(tabular_run, "views/stages.py", monkeypatch)
    tables = [f.value for f in at.dataframe if "effect" in f.value.columns]
    assert len(tables) == 2, [f.value.columns.tolist() for f in at.dataframe]
    for table in tables:
        assert len(table) == 10 and table["effect"].str.match(r"^[+-]\d").all()
        assert table["label"].str.match(r"^\d").all() and table.index.str.match(r"^#\d+$").all()
    assert "later stages replayed exactly" in plain(at.caption[0].value)  # the demo's analysis is a replay


def test_data_quality_ranks_with_scores(
    tabular_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = open_page(tabular_run, "views/quality.py", monkeypatch, n="20")
    ranked = facts["self_influence"].head(20)
    table = _table(at, f"#{int(ranked['sample_id'].iloc[0])}")
    assert table["self-influence"].tolist() == [f"{v:.3g}" for v in ranked["value"]]
    assert table["rank"].tolist() == [str(r) for r in ranked["rank"]]
    assert [("⚠" in lbl) for lbl in table["label"]] == ranked["flagged"].tolist()
    assert any("precision" in m.value for m in at.metric)  # scored against the label_flipped annotation


def test_lifecycle_shows_feature_values(
    tabular_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_id = int(facts["ranked"]["train_id"].iloc[0])
    at = open_page(tabular_run, "views/lifecycle.py", monkeypatch, sample=str(train_id))
    with RunStore(tabular_run) as store:
        features = store.sample(train_id)["display"]
    values = at.dataframe[0].value
    assert values.columns.tolist() == list(features) and len(features) == 30
    assert values.iloc[0].tolist() == pytest.approx(list(features.values()))
    # the test examples it most influences are read against this training sample's values, named as such
    influenced = _table(at, f"train #{train_id}")
    assert influenced.iloc[0][list(influenced.columns[-3:])].tolist() == pytest.approx(
        [features[c] for c in influenced.columns[-3:]]
    )
    assert any(f"training sample \\#{train_id}" in c.value for c in at.caption), [c.value for c in at.caption]


def test_audit_says_the_run_stores_no_thumbnails(tabular_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(tabular_run, "views/audit.py", monkeypatch)
    at.button[0].click().run()
    checks = at.dataframe[0].value
    row = checks[checks["check"] == "thumbnails"]
    assert row["detail"].iloc[0] == "the run stores no thumbnails"


@pytest.fixture(scope="module")
def picked_run(tabular_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tabular run with a second influence analysis (checkpoint weighting, k 5), another boolean annotation,
    an unverified stage estimate and a stage that failed."""
    dst = tmp_path_factory.mktemp("picked") / "run"
    shutil.copytree(tabular_run, dst)
    run_cli("influence", str(dst), "--k", "5", "--weighting", "checkpoint", "--check", "2", check=True)
    run_cli("stages", str(dst), "--method", "fast", check=True)
    with RunStore(dst) as store:
        train = store.samples("train")["sample_id"].astype(int).tolist()
    run = Run.open(dst)
    try:
        run.annotate_samples(train, "reviewed", [i % 2 == 0 for i in range(len(train))])
        model = torch.nn.Linear(2, 2)
        with pytest.raises(RuntimeError), run.stage("broken", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                     model=model):  # fmt: skip
            raise RuntimeError("the loop crashed")
    finally:
        run.close()
    return dst


def test_influence_analysis_is_picked_by_url(
    picked_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RunStore(picked_run) as store:
        ids = store.analyses("influence")["analysis_id"].astype(int).tolist()
    assert len(ids) == 2
    newest = open_page(picked_run, PAGES[0], monkeypatch, test=str(facts["test_id"]))
    assert plain(newest.caption[0].value).startswith(f"Influence analysis #{ids[1]}")
    assert newest.selectbox(key="influence").value == ids[1]
    older = open_page(picked_run, PAGES[0], monkeypatch, test=str(facts["test_id"]), influence=str(ids[0]))
    assert plain(older.caption[0].value).startswith(f"Influence analysis #{ids[0]}")
    shown = [f.value for f in older.dataframe if "score" in f.value.columns]
    assert len(shown[0]) == 11  # k 20 in the demo's analysis: top 10 shown (plus the test example's row)
    assert len([f.value for f in newest.dataframe if "score" in f.value.columns][0]) == 6  # k 5: top 5


def test_mark_is_picked_in_the_sidebar_and_by_url(
    picked_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RunStore(picked_run) as store:
        aid = store.latest_analysis("influence")["analysis_id"]
        ranked = store.self_influence(aid, "reviewed").head(20)
        topk = store.influence_topk(aid, facts["test_id"], "raw", "reviewed")
    at = open_page(picked_run, "views/quality.py", monkeypatch, n="20")
    assert at.selectbox(key="mark").options == ["label_flipped", "reviewed"]
    at.selectbox(key="mark").set_value("reviewed").run()
    assert at.query_params["mark"] == "reviewed"
    table = _table(at, f"#{int(ranked['sample_id'].iloc[0])}")
    assert [("⚠" in lbl) for lbl in table["label"]] == ranked["flagged"].tolist()
    assert ranked["flagged"].any() and not ranked["flagged"].all()
    # the same choice, opened from a shared address
    at = open_page(picked_run, PAGES[0], monkeypatch, test=str(facts["test_id"]), mark="reviewed", top="5")
    proponents = _table(at, f"test #{facts['test_id']}").iloc[1:]
    expected = topk[(topk["direction"] == "proponent") & (topk["rank"] <= 5)]["flagged"].tolist()
    assert [("⚠" in lbl) for lbl in proponents["label"]] == expected


def test_unverified_estimate_and_failed_stage_are_flagged(
    picked_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = open_page(picked_run, "views/stages.py", monkeypatch)
    warnings = [plain(w.value) for w in at.warning]
    assert any(w.startswith("Stage broken is failed: this run is incomplete") for w in warnings), warnings
    assert any(w.startswith("Not verified against exact replay: fast is an estimate") for w in warnings), (
        warnings
    )
    assert "nothing was replayed" in plain(at.caption[0].value)
    assert at.selectbox(key="method").label == "Method (an estimate: not replayed)"
    for page in PAGES:  # the incomplete run is said on every page
        at = open_page(picked_run, page, monkeypatch)
        assert any("is failed: this run is incomplete" in plain(w.value) for w in at.warning), page


def test_measured_lds_is_shown(picked_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    with RunStore(picked_run) as store:
        measured = store.latest_analysis("influence")["params"]["check"]
    at = open_page(picked_run, PAGES[0], monkeypatch, test=str(facts["test_id"]))
    badge = f"measured on this run: LDS {measured['lds']:.2f} (2 replays)"
    assert any(badge in plain(m.value) for m in at.markdown), [m.value for m in at.markdown]
    older = open_page(
        picked_run, PAGES[0], monkeypatch, test=str(facts["test_id"]), influence=str(facts["aid"])
    )
    assert not any(
        "measured on this run" in m.value for m in older.markdown
    )  # the demo's analysis has no check


def test_contributions_show_the_uses_behind_each_term(
    tabular_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under checkpoint weighting (the default) as under usage weighting, each checkpoint's bar is labelled with
    the proponent's uses in its steps, counted here by hand from the batches, and the caption names the
    weighting."""
    at = open_page(
        tabular_run, PAGES[0], monkeypatch, test=str(facts["test_id"]), tab="Per-checkpoint contributions"
    )
    pick = at.selectbox(key="proponent").value
    with RunStore(tabular_run) as store:
        analysis = store.latest_analysis("influence")
        steps = store.sample_usage(pick)["step"].tolist()
    expected = []
    for c in analysis["checkpoints"]:
        iv = c["interval"]
        n = 0 if iv["first_step"] is None else sum(iv["first_step"] <= s <= iv["last_step"] for s in steps)
        expected.append(f"{n} use{'' if n == 1 else 's'}")
    chart = json.loads(at.get("plotly_chart")[0].proto.spec)
    shown = [t for trace in chart["data"] for t in trace["text"]]
    assert shown == expected and any(t != "0 uses" for t in shown), shown
    assert analysis["params"]["weighting"] == "checkpoint"
    assert any(c.value.startswith("Checkpoint weighting: every checkpoint scores") for c in at.caption)
    assert any(" · checkpoint weighting · " in c.value for c in at.caption)  # the page header names it too


def test_lifecycle_hover_says_what_log_batch_was_not_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """epoch and loss are optional in log_batch: the uses chart shows "-" for them, not NaN."""
    import numpy as np

    from tests.app._support import chart

    run = Run.create(tmp_path / "run", name="plain")
    run.register_samples(np.arange(4), split="train", labels=np.zeros(4, int), raw=np.eye(4, dtype=np.uint8))
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with run.stage("only", optimizer=opt, model=model):
        for epoch in (None, 1):
            opt.zero_grad()
            loss = model(torch.eye(4)[:2]).pow(2).mean()
            loss.backward()
            opt.step()
            run.log_batch([2, 3], epoch=epoch, loss=None if epoch is None else loss)
    run.close()
    at = open_page(tmp_path / "run", "views/lifecycle.py", monkeypatch, sample="3")
    (trace,) = chart(at, 0)["data"]
    assert trace["customdata"][0] == ["-", "0.1", "-", "1"]
    assert trace["customdata"][1][:2] == ["1", "0.1"] and trace["customdata"][1][2] != "-"


def test_data_quality_with_a_mark_no_sample_carries(
    tabular_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A boolean annotation that is false everywhere: no recall to show, said so instead of a TypeError."""
    dst = tmp_path / "run"
    shutil.copytree(tabular_run, dst)
    with RunStore(dst) as store:
        train = store.samples("train")["sample_id"].astype(int).tolist()
    run = Run.open(dst)
    run.annotate_samples(train, "nothing_wrong", [False] * len(train))
    run.close()
    at = open_page(dst, "views/quality.py", monkeypatch)
    at.selectbox(key="mark").set_value("nothing_wrong").run()
    assert not at.exception and not at.error
    assert any("No training sample is annotated nothing_wrong" in plain(c.value) for c in at.caption)


def test_samples_without_thumbnails_or_display_say_how_to_show_them(
    tmp_path: Path, tabular_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run registered with raw bytes only (no thumbnails=, no display=): the lists give ids, labels and scores,
    and say what would show the samples themselves; a run with feature values does not."""
    from fgtrac_core.stages.replay import deterministic
    from tests.stages._loops import INPUTS_REF, MODEL_REF, StageCfg, record

    run = tmp_path / "run"
    with deterministic(1):
        record(run, [StageCfg("a", lambda m: torch.optim.SGD(m.parameters(), lr=0.1))])
    pipe = ("--model", MODEL_REF, "--inputs", INPUTS_REF, "--head-layer", "head")
    run_cli("influence", str(run), *pipe, "--checkpoints", "all", check=True)
    hint = "Only ids: these samples were registered without thumbnails= or display="
    at = open_page(run, PAGES[0], monkeypatch)
    assert not at.exception and sum(hint in c.value for c in at.caption) == 2  # proponents and opponents
    at = open_page(tabular_run, PAGES[0], monkeypatch, test=str(facts["test_id"]))
    assert not any(hint in c.value for c in at.caption)
