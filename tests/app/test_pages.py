"""Explore, Stages, Sample lifecycle, Data quality and Audit, driven by Streamlit's AppTest on the sample run."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
import torch

from fgtrac_core.store import RunStore
from tests.app._support import HURTING_STAGE, chart, open_page, plain
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def facts(digits_run: Path) -> dict:
    """What the tests expect, read straight from the store: a misclassified test example, its stored top-k, and
    the training sample with the highest self-influence."""
    with RunStore(digits_run) as store:
        analysis = store.latest_analysis("influence")
        aid = analysis["analysis_id"]
        tests = store.influence_tests(aid)
        wrong = tests[tests["misclassified"]]
        test_id = int(wrong["sample_id"].iloc[0])
        top = store.self_influence(aid).iloc[0]
        return {
            "analysis": analysis,
            "test_id": test_id,
            "n_wrong": len(wrong),
            "raw": store.influence_topk(aid, test_id, "raw"),
            "cosine": store.influence_topk(aid, test_id, "cosine"),
            "top_sample": int(top["sample_id"]),
            "top_value": float(top["value"]),
            "record": store.sample(int(top["sample_id"])),
        }


def _picks(at, key: str) -> list[int]:  # noqa: ANN001 (AppTest)
    """The sample ids a grid offers to open (its pills widget `key`), in display order."""
    return [int(str(o).lstrip("#")) for o in at.button_group(key=key).options]


def _grid_captions(at) -> list[str]:  # noqa: ANN001 (AppTest)
    """Captions of Explore's proponent then opponent thumbnails (the first image is the test example)."""
    return [c for img in at.image[1:] for c in img.captions]


def test_explore_opens_a_test_example_by_url(
    digits_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    test_id = facts["test_id"]
    at = open_page(digits_run, "views/explore.py", monkeypatch, test=str(test_id), view="cosine", top="5")
    assert f"Test example #{test_id}" in [s.value for s in at.subheader]
    assert at.selectbox(key="test").value == test_id
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["prediction"] != metrics["recorded label"]
    # 5 proponents then 5 opponents, in the stored cosine order, each linking to its lifecycle page
    cosine = facts["cosine"]
    expected = [*cosine[cosine["direction"] == "proponent"]["train_id"][:5],
                *cosine[cosine["direction"] == "opponent"]["train_id"][:5]]  # fmt: skip
    assert _picks(at, "open_proponent") + _picks(at, "open_opponent") == [int(i) for i in expected]
    captions = _grid_captions(at)
    assert len(captions) == 10 and all("cos " in c for c in captions)
    assert [c.split()[0] for c in captions] == [f"#{i}" for i in expected]
    assert not at.get("plotly_chart")  # charts wait until their tab is opened
    # the analysis picker names the parameters an analysis differs by, not its raw JSON
    side = [plain(c.value) for c in at.sidebar.caption]
    assert any(c.startswith("tracin/last_layer") and "weighting checkpoint, k 20" in c for c in side), side
    assert not any("{" in c for c in side), side


def test_explore_on_an_influence_function_analysis(digits_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_cli("influence", str(digits_copy), "--mode", "influence_function", "--k", "10", check=True)
    at = open_page(digits_copy, "views/explore.py", monkeypatch, tab="Per-checkpoint contributions")
    header = plain(at.caption[0].value)
    assert "influence_function" in header and "1 checkpoint ·" in header and "weighting" not in header
    assert any("nothing to split over checkpoints" in c.value for c in at.caption)
    assert not at.get("plotly_chart")
    assert any("damping 0.001" in plain(c.value) for c in at.sidebar.caption)


def test_explore_opens_a_training_sample(
    digits_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Picking a proponent's id switches to its lifecycle page, with the id in the URL."""
    at = open_page(digits_run, "views/explore.py", monkeypatch, test=str(facts["test_id"]))
    pick = _picks(at, "open_proponent")[1]
    at.button_group(key="open_proponent").set_value(pick).run()
    assert not at.exception
    assert f"Sample #{pick}" in [s.value for s in at.subheader]
    assert at.query_params == {"sample": str(pick)}


def test_without_stage_results_the_command_is_named(
    digits_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with duckdb.connect(str(digits_copy / "snapshot.duckdb")) as con:
        con.execute("DELETE FROM analyses WHERE kind = 'stages'")
    for page, params in (("views/explore.py", {"tab": "Stage effects"}), ("views/stages.py", {})):
        at = open_page(digits_copy, page, monkeypatch, **params)
        assert "No stage results yet" in at.info[0].value
        assert any(t.value == f"fgtrac stages {digits_copy}" for t in at.text)


def test_explore_marks_flipped_labels(digits_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mark follows the stored `label_flipped` annotation exactly."""
    raw = facts["raw"]
    with RunStore(digits_run) as store:
        aid = facts["analysis"]["analysis_id"]
        for test_id in store.influence_tests(aid)["sample_id"]:
            raw = store.influence_topk(aid, int(test_id), "raw")
            if (raw["rank"].le(10) & raw["flagged"]).any():
                break
    at = open_page(digits_run, "views/explore.py", monkeypatch, test=str(int(test_id)))
    shown = raw[raw["rank"] <= 10].sort_values(["direction", "rank"], ascending=[False, True])
    captions = _grid_captions(at)
    assert ["⚠" in c for c in captions] == shown["flagged"].tolist()
    assert any("⚠" in c for c in captions)


def test_explore_filters(digits_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(digits_run, "views/explore.py", monkeypatch, wrong="true")
    assert len(at.selectbox(key="test").options) == facts["n_wrong"]
    at.checkbox(key="wrong").uncheck().run()
    at.selectbox(key="cls").select(3).run()
    assert not at.exception
    with RunStore(digits_run) as store:
        tests = store.influence_tests(facts["analysis"]["analysis_id"])
    assert [int(o) for o in at.selectbox(key="test").options] == tests[tests["label"] == 3][
        "sample_id"
    ].tolist()


def test_explore_switches_view_and_proponent(
    digits_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    test_id = facts["test_id"]
    at = open_page(digits_run, "views/explore.py", monkeypatch, test=str(test_id))
    raw = facts["raw"]
    proponents = raw[raw["direction"] == "proponent"]
    assert _picks(at, "open_proponent")[:3] == proponents["train_id"][:3].tolist()
    at.button_group(key="view").set_value("cosine").run()
    cosine = facts["cosine"]
    assert (
        _picks(at, "open_proponent")[:3]
        == cosine[cosine["direction"] == "proponent"]["train_id"][:3].tolist()
    )
    # the contributions chart of the third proponent, one bar per influence checkpoint
    tab = "Per-checkpoint contributions"
    at = open_page(digits_run, "views/explore.py", monkeypatch, test=str(test_id), tab=tab)
    pick = int(proponents["train_id"].iloc[2])
    at.selectbox(key="proponent").select(pick).run()
    assert not at.exception
    fig = chart(at, -1)
    assert f"#{pick}" in fig["layout"]["title"]["text"]
    bars = [y for trace in fig["data"] for y in trace["y"]]
    assert len(bars) == len(facts["analysis"]["checkpoints"])
    contributions = json.loads(proponents["contributions"].iloc[2])
    assert sorted(bars) == pytest.approx(sorted(contributions))


def test_explore_stage_bars(staged_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    test_id = facts["test_id"]
    at = open_page(staged_run, "views/explore.py", monkeypatch, test=str(test_id), tab="Stage effects")
    assert not at.image[1:]  # the grids wait until their tab is opened again
    fig = chart(at, 0)
    assert f"#{test_id}" in fig["layout"]["title"]["text"]
    assert {t["name"] for t in fig["data"]} == {"replay (ground truth)", "propagated"}
    assert list(fig["data"][0]["x"]) == ["pretrain", "finetune", "adapt"]
    truth = next(t for t in fig["data"] if t["name"] == "replay (ground truth)")
    with RunStore(staged_run) as store:
        effects = store.stage_effects(store.latest_analysis("stages")["analysis_id"], test_id)
    stored = effects[(effects["method"] == "replay") & (effects["behaviour"] == "loss")]["value"].tolist()
    assert list(truth["y"]) == pytest.approx(stored)
    assert "raised the loss (hurt)" in at.caption[-1].value or any(
        "raised the loss" in c.value for c in at.caption
    )
    at.selectbox(key="behaviour").select("margin").run()
    assert not at.exception
    assert chart(at, 0)["layout"]["yaxis"]["title"]["text"] == "effect on margin"


def test_lifecycle_of_a_training_sample(
    digits_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = facts["top_sample"]
    at = open_page(digits_run, "views/lifecycle.py", monkeypatch, sample=str(sid))
    assert f"Sample #{sid}" in [s.value for s in at.subheader]
    assert facts["record"]["content_sha256"] in [c.value for c in at.text]
    with RunStore(digits_run) as store:
        usage = store.sample_usage(sid)
        most = store.most_influenced(facts["analysis"]["analysis_id"], sid, 10)
    usage_fig = chart(at, 0)
    assert sorted(x for t in usage_fig["data"] for x in t["x"]) == sorted(usage["step"])
    metric = next(m for m in at.metric if m.label == "self-influence")
    assert metric.value == f"{facts['top_value']:.4g}"
    # the test examples it most influences link to Explore
    assert _picks(at, "open_test") == most["test_id"].tolist()
    assert [b.label for b in at.get("download_button")] == ["Download usage proof"]


def test_usage_proof_download_is_the_cli_bundle(
    digits_run: Path, facts: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bytes behind "Download usage proof" are exactly `fgtrac prove`'s, and `fgtrac check-proof` accepts them."""
    from app import data

    sid = facts["top_sample"]
    monkeypatch.setenv("FGTRAC_RUN", str(digits_run))
    bundle = data.usage_proof(sid)
    assert bundle == run_cli("prove", str(digits_run), "--sample", str(sid), check=True).stdout.encode()
    (tmp_path / "proof.json").write_bytes(bundle)
    assert "Proof valid" in run_cli("check-proof", str(tmp_path / "proof.json"), check=True).stdout


def test_lifecycle_unknown_and_test_samples(
    digits_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = open_page(digits_run, "views/lifecycle.py", monkeypatch, sample="987654")
    assert "not in this run" in at.error[0].value
    at = open_page(digits_run, "views/lifecycle.py", monkeypatch)
    assert "Enter a sample id" in at.info[0].value
    at = open_page(digits_run, "views/lifecycle.py", monkeypatch, sample=str(facts["test_id"]))
    assert [p.proto.query_string for p in at.page_link] == [f"test={facts['test_id']}"]


def test_stages_page(staged_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(staged_run, "views/stages.py", monkeypatch, slice="misclassified")
    fig = chart(at, 0)
    truth = next(t for t in fig["data"] if t["name"] == "replay (ground truth)")
    hurting = list(truth["x"]).index(HURTING_STAGE)
    # the synthetic truth makes `finetune` raise the loss of the misclassified examples
    assert truth["y"][hurting] == max(truth["y"]) and truth["y"][hurting] > 0.3
    assert at.dataframe[0].value["method"].eq("propagated").all()  # faithfulness table
    at.selectbox(key="stage").select(HURTING_STAGE).run()
    assert not at.exception
    with RunStore(staged_run) as store:
        effects = store.stage_effects(store.latest_analysis("stages")["analysis_id"])
    rows = effects[
        (effects["method"] == "replay")
        & (effects["behaviour"] == "loss")
        & (effects["stage"] == HURTING_STAGE)
    ]
    # loss lowered most / raised most, only examples whose loss the stage lowered / raised
    assert _picks(at, "open_helped") == rows[rows["value"] < 0].nsmallest(10, "value")["test_id"].tolist()
    assert _picks(at, "open_hurt") == rows[rows["value"] > 0].nlargest(10, "value")["test_id"].tolist()
    assert _picks(at, "open_hurt")
    assert [plain(m.value) for m in at.markdown if "by" in m.value] == [
        f"**Most helped by {HURTING_STAGE}**", f"**Most hurt by {HURTING_STAGE}**"]  # fmt: skip


def test_data_quality(digits_run: Path, facts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(digits_run, "views/quality.py", monkeypatch, n="20")
    assert len(at.image[0].captions) == 20
    assert _picks(at, "open_sample")[0] == facts["top_sample"]
    with RunStore(digits_run) as store:
        table = store.mislabel_detection(facts["analysis"]["analysis_id"])
    metrics = [m for m in at.metric if m.label.startswith("top ")]
    assert [m.label for m in metrics] == [f"top {f:.0%} ({n} samples)" for f, n in
                                          zip(table["inspected_fraction"], table["inspected"], strict=True)]  # fmt: skip
    assert metrics[1].value == f"precision {table['precision'][1]:.2f}"


def test_audit_verifies_and_names_the_tampered_row(
    digits_run: Path, digits_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = open_page(digits_run, "views/audit.py", monkeypatch)
    at.button(key="verify_ledger").click().run()
    assert not at.exception
    assert at.success[0].value.startswith("Ledger intact")
    checks = at.dataframe[0].value
    assert set(checks["result"]) <= {"pass", "skipped"} and "signatures" in checks["check"].tolist()

    for db in ("snapshot.duckdb", "fgtrac.duckdb"):
        with duckdb.connect(str(digits_copy / db)) as con:
            con.execute("UPDATE influence_topk SET score = score + 1 WHERE row_id = 5")
    at = open_page(digits_copy, "views/audit.py", monkeypatch)
    at.button(key="verify_ledger").click().run()
    assert not at.exception
    assert "influence_topk row row_id=5 field score" in plain(at.error[0].value)
    assert "FAIL" in at.dataframe[0].value["result"].tolist()


def test_audit_with_a_pinned_key(digits_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = run_cli("key", "export", check=True).stdout.encode()
    at = open_page(digits_run, "views/audit.py", monkeypatch)
    at.file_uploader(key="pinned_key").upload("signer.pub", key).run()
    at.button(key="verify_ledger").click().run()
    assert at.success[0].value.startswith("Ledger intact")
    assert any("pinned by you" in c.value for c in at.caption)

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    at = open_page(digits_run, "views/audit.py", monkeypatch)
    at.file_uploader(key="pinned_key").upload("other.pub", other).run()
    at.button(key="verify_ledger").click().run()
    assert not at.exception
    assert at.error and "Ledger check failed" in at.error[0].value


def test_stages_page_on_the_sample_run(digits_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage analysis `fgtrac demo` stores (exact replay, loss), as the Stages page shows it."""
    with RunStore(digits_run) as store:
        analysis = store.latest_analysis("stages")
        if analysis is None:
            pytest.skip("this build of the sample run stores no stage analysis")
        aggregates = store.stage_aggregates(analysis["analysis_id"])
    at = open_page(digits_run, "views/stages.py", monkeypatch)
    truth = next(t for t in chart(at, 0)["data"] if t["name"] == "replay (ground truth)")
    stored = aggregates[(aggregates["method"] == "replay") & (aggregates["behaviour"] == "loss")
                        & (aggregates["slice"] == "all")]  # fmt: skip
    assert list(truth["x"]) == stored["stage"].tolist()
    assert list(truth["y"]) == pytest.approx(stored["value"].tolist())
    with RunStore(digits_run) as store:
        effects = store.stage_effects(analysis["analysis_id"])
    first = effects[(effects["method"] == "replay") & (effects["behaviour"] == "loss")]
    first = first[first["stage"] == first["stage"].iloc[0]]["value"]  # the page's first stage
    assert len(_picks(at, "open_helped")) == min(10, int((first < 0).sum())) > 0
    assert len(_picks(at, "open_hurt")) == min(10, int((first > 0).sum()))
    hurt_none = [c.value for c in at.caption if "No test example in this list was hurt" in c.value]
    assert bool(hurt_none) == (not (first > 0).any())
    # accuracy is stored per slice only: the page says so instead of listing examples
    at.selectbox(key="behaviour").select("accuracy").run()
    assert not at.exception
    assert any("no per-example effects" in c.value for c in at.caption)


def test_a_url_naming_no_shown_test_example_says_so(digits_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared URL whose ?test= is a training sample, or a test example the URL's filters exclude: Explore says
    which example it shows instead (and links a training sample's lifecycle), rather than silently showing
    another."""
    with RunStore(digits_run) as store:
        train_id = int(store.df("SELECT min(sample_id) AS i FROM samples WHERE split = 'train'")["i"][0])
        aid = int(store.df("SELECT max(analysis_id) AS a FROM analyses WHERE kind = 'influence'")["a"][0])
        right = store.influence_tests(aid).query("not misclassified")["sample_id"].iloc[0]
    at = open_page(digits_run, "views/explore.py", monkeypatch, test=str(train_id))
    shown = int(at.selectbox(key="test").value)
    assert [plain(w.value) for w in at.warning] == [
        f"Sample #{train_id} is not a test example of this influence analysis; showing #{shown}. A training "
        f"sample's uses and influence are on its lifecycle page."
    ]
    at = open_page(digits_run, "views/explore.py", monkeypatch, test=str(int(right)), wrong="true")
    shown = int(at.selectbox(key="test").value)
    assert shown != right
    assert [plain(w.value) for w in at.warning] == [
        f"Test example #{right} does not match the filters above; showing #{shown}."
    ]
    at = open_page(digits_run, "views/explore.py", monkeypatch, test=str(shown))
    assert not at.warning


def test_every_method_of_a_comparison_has_its_own_colour() -> None:
    """`stages --compare` draws 11 methods, one more than the theme's colours: the ground truth stays near-black
    and no estimator shares a colour with it or with another."""
    from app.ui import GROUND_TRUTH, method_colours

    methods = [GROUND_TRUTH, "fast", "fast:linear", "propagated", "propagated:linear"]
    methods += [f"partial-replay:{h}" for h in (1, 5, 20, 50, 100, 120)]
    colours = method_colours(methods)
    assert colours[GROUND_TRUTH] == "#262730" and len(set(colours.values())) == len(methods) == 11


def test_stages_page_names_what_the_loop_replaced_between_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose loop re-initialised the head between its stages, analysed by `fgtrac stages`: the Stages page
    says which entries stage b started from and what the counterfactuals do with them."""
    from fgtrac_core.stages.replay import deterministic
    from tests.conftest import run_cli
    from tests.stages._loops import INPUTS_REF, MODEL_REF, StageCfg, record

    def sgd(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    run = tmp_path / "run"
    with deterministic(1):
        record(run, [StageCfg("a", sgd), StageCfg("b", sgd, reset=lambda m: m.head.reset_parameters())])
    proc = run_cli("stages", str(run), "--model", MODEL_REF, "--inputs", INPUTS_REF)
    assert proc.returncode == 0, proc.stderr
    assert "stage 'b' starts from head.weight, head.bias as the loop replaced them" in proc.stdout
    at = open_page(run, "views/stages.py", monkeypatch)
    said = [plain(c.value) for c in at.caption if "as the loop replaced them" in c.value]
    assert said == [
        "Stage b started from head.weight, head.bias as the loop replaced them (a new head?): every counterfactual "
        "keeps those values, so a stage's effect is what it trained"
    ]
