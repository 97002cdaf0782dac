"""`fgtrac influence RUN`: what the sample run stores, that it is committed, and refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from fgtrac_core import RunStore
from fgtrac_core.influence import influence_function, tracin
from fgtrac_core.verify import verify_run
from sample_runs import digits
from tests.conftest import run_cli


def _one_line_error(proc, *needles: str) -> None:  # noqa: ANN001
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fgtrac: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_demo_stores_a_committed_influence_analysis(digits_run: Path) -> None:
    with RunStore(digits_run) as store:
        a = store.latest_analysis("influence")
        assert a is not None and a["method"] == "tracin/last_layer"
        assert a["params"]["weighting"] == "checkpoint"  # the default
        # the demo's run recorded its batches: each checkpoint's interval and uses are stored beside its term
        assert all(c["interval"]["n_steps"] > 0 for c in a["checkpoints"])
        tests = store.influence_tests(a["analysis_id"])
        n_train = len(store.samples("train"))
        k = a["params"]["k"]
        assert len(tests) == len(store.samples("test")) == a["params"]["n_test"]
        some = int(tests.sample_id.iloc[17])
        raw, cos = (
            store.influence_topk(a["analysis_id"], some),
            store.influence_topk(a["analysis_id"], some, "cosine"),
        )
        si = store.self_influence(a["analysis_id"])
    assert (
        len(si) == n_train
        and si["value"].is_monotonic_decreasing
        and list(si["rank"]) == list(range(1, n_train + 1))
    )
    for table in (raw, cos):
        assert len(table) == 2 * k
    pro, opp = raw[raw.direction == "proponent"], raw[raw.direction == "opponent"]
    assert pro.score.is_monotonic_decreasing and opp.score.is_monotonic_increasing
    assert pro.score.iloc[0] > 0 > opp.score.iloc[0]
    assert cos[cos.direction == "proponent"].cosine.is_monotonic_decreasing
    assert cos.cosine.abs().max() <= 1 + 1e-9
    # per-checkpoint contributions: one per chosen checkpoint, summing to the raw score
    parts = np.array([json.loads(c) for c in raw.contributions])
    assert parts.shape == (2 * k, len(a["checkpoints"]))
    assert np.allclose(parts.sum(1), raw.score, rtol=1e-5, atol=1e-9)
    # the chosen checkpoints carry their file hashes, and the final checkpoint is among them
    for c in a["checkpoints"]:
        assert len(c["sha256"]) == 64 and c["reason"]
    assert (
        a["checkpoints"][-1]["reason"] in ("final checkpoint",)
        or "below the best" in a["checkpoints"][-1]["reason"]
    )


def test_stored_scores_equal_the_functional_api(digits_run: Path) -> None:
    with RunStore(digits_run) as store:
        a = store.latest_analysis("influence")
        train = store.samples("train")
        test_ids = [int(t) for t in store.influence_tests(a["analysis_id"]).sample_id.iloc[:3]]
        stored = [store.influence_topk(a["analysis_id"], t) for t in test_ids]
        labels = dict(zip(store.samples().sample_id, store.samples().label, strict=True))
        assert a["params"]["weighting"] == "checkpoint"  # one lr per checkpoint, as the functional API's default
    model = digits.DigitsCNN()
    x_tr = digits.model_inputs({"seed": 0}, train.sample_id.to_numpy())
    y_tr = torch.as_tensor(train.label.to_numpy(np.int64))
    x_te = digits.model_inputs({"seed": 0}, np.array(test_ids))
    y_te = torch.as_tensor([labels[t] for t in test_ids])
    ckpts = [(str(digits_run / c["path"]), c["lr"]) for c in a["checkpoints"]]
    full = tracin(model, "head", (x_tr, y_tr), (x_te, y_te), ckpts)
    ids = train.sample_id.to_numpy()
    for row, table in enumerate(stored):
        pro = table[table.direction == "proponent"]
        expected = full[row].topk(len(pro))
        assert list(ids[expected.indices.numpy()]) == list(pro.train_id)
        assert np.allclose(pro.score, expected.values.double().numpy(), rtol=1e-5)


_USAGE_MISSES = (
    "usage weighting finds 0/10 (2026-11-29, again 2026-12-03): the flipped labels are in the AdamW finetune stage "
    "(lr 1e-3, per use lr/32), the clean pretrain subset's SGD steps (lr up to 0.05) dominate every raw top-5.  "
    "Replays of the run (bench/run_faithfulness.py, 2026-12-03) say those top-5 are not the real proponents: "
    "removing them moved the misclassified losses by +0.04 on average, against +0.54 for checkpoint weighting's "
    "top-5 and -0.09 for 5 random samples; LDS (16 replays) 0.04 against 0.24"
)


@pytest.mark.parametrize(
    "form",
    [
        "checkpoint",
        pytest.param("usage", marks=pytest.mark.xfail(strict=True, reason=_USAGE_MISSES)),
        "influence_function",
    ],
)
def test_misclassified_examples_have_mislabelled_proponents(digits_copy: Path, form: str) -> None:
    """The review the product exists for: a misclassified test digit's top proponents include training digits
    whose label was flipped (recorded ground truth, read by no algorithm)."""
    # the demo stored a checkpoint-weighted TracIn analysis; the other forms are computed here
    if form == "usage":
        run_cli("influence", str(digits_copy), "--k", "20", "--weighting", form, check=True)
    elif form == "influence_function":
        run_cli("influence", str(digits_copy), "--k", "20", "--mode", form, check=True)
    with RunStore(digits_copy) as store:
        analysis = store.latest_analysis("influence")
        assert analysis["params"].get("weighting") == (None if form == "influence_function" else form)
        aid = analysis["analysis_id"]
        wrong = store.influence_tests(aid).query("misclassified")
        hits = []
        for t in wrong.sample_id:
            top = store.influence_topk(aid, int(t))
            top5 = top[(top.direction == "proponent") & (top["rank"] <= 5)]
            hits.append(bool(top5.flagged.any()))
    assert len(wrong) >= 3
    print(
        f"{form}: {sum(hits)}/{len(hits)} misclassified test digits have a flipped-label proponent "
        "in their top 5"
    )
    assert sum(hits) >= 0.5 * len(hits)


def test_edited_score_fails_verification_naming_it(digits_copy: Path) -> None:
    for db in ("snapshot.duckdb", "fgtrac.duckdb"):
        with duckdb.connect(str(digits_copy / db)) as con:
            con.execute("UPDATE influence_topk SET score = score * 1.001 WHERE row_id = 1234")
    report = verify_run(digits_copy)
    f = report.first_failure
    assert not report.ok and f is not None
    assert (f.table, f.row, f.field) == ("influence_topk", "row row_id=1234", "score")
    proc = run_cli("verify", str(digits_copy))
    assert proc.returncode == 1 and "influence_topk" in proc.stdout and "row_id=1234" in proc.stdout


def test_adamw_mode_through_the_cli_is_stored_and_verifies(digits_copy: Path) -> None:
    with RunStore(digits_copy) as store:
        test_ids = store.samples("test").sample_id.iloc[:4].tolist()
    proc = run_cli(
        "influence", str(digits_copy), "--mode", "adamw", "--k", "5", "--test-ids", ",".join(map(str, test_ids)),
        "--json", "--weighting", "checkpoint",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["method"] == "tracin/adamw" and out["n_test"] == 4 and out["k"] == 5
    assert out["weighting"] == "checkpoint"
    weights = {c["stage"]: c["weight"] / c["lr"] for c in out["checkpoints"]}
    assert weights["pretrain"] == pytest.approx(1.0) and weights["adapt"] == pytest.approx(1.0)
    assert weights["finetune"] != pytest.approx(1.0)  # AdamW checkpoints carry the momentum factor κ
    with RunStore(digits_copy) as store:
        assert len(store.influence_tests(out["analysis_id"])) == 4
    assert verify_run(digits_copy).ok


def test_influence_function_mode_is_stored_equal_to_the_functional_api_and_verifies(
    digits_copy: Path,
) -> None:
    with RunStore(digits_copy) as store:
        train = store.samples("train")
        test_ids = [int(t) for t in store.samples("test").sample_id.iloc[:5]]
        labels = dict(zip(store.samples().sample_id, store.samples().label, strict=True))
        final = store.checkpoints().iloc[-1]
    proc = run_cli(
        "influence", str(digits_copy), "--mode", "influence_function", "--damping", "0.01", "--k", "6",
        "--test-ids", ",".join(map(str, test_ids)), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["method"] == "influence_function" and out["weighting"] is None
    # one term, at the final checkpoint, of weight 1/n; no interval: it stands for the whole run
    [c] = out["checkpoints"]
    assert c["step"] == int(final.step) and "interval" not in c  # (a stage's end and the next start share it)
    assert c["weight"] == pytest.approx(1 / len(train))
    model = digits.DigitsCNN()
    x_tr = digits.model_inputs({"seed": 0}, train.sample_id.to_numpy())
    y_tr = torch.as_tensor(train.label.to_numpy(np.int64))
    x_te = digits.model_inputs({"seed": 0}, np.array(test_ids))
    y_te = torch.as_tensor([labels[t] for t in test_ids])
    full = influence_function(
        model, "head", (x_tr, y_tr), (x_te, y_te), str(digits_copy / c["path"]), damping=0.01
    )
    ids = train.sample_id.to_numpy()
    with RunStore(digits_copy) as store:
        a = store.analysis(out["analysis_id"], "influence")
        assert a["params"]["damping"] == 0.01 and a["params"]["mode"] == "influence_function"
        for row, t in enumerate(test_ids):
            table = store.influence_topk(out["analysis_id"], t)
            for direction, largest in (("proponent", True), ("opponent", False)):
                part = table[table.direction == direction]
                expected = full[row].topk(6, largest=largest)
                assert list(ids[expected.indices.numpy()]) == list(part.train_id)
                assert np.allclose(part.score, expected.values.numpy(), rtol=1e-5)  # ranked in float32
                assert np.allclose([json.loads(x)[0] for x in part.contributions], part.score, rtol=1e-9)
            cos = store.influence_topk(out["analysis_id"], t, "cosine")
            assert cos.cosine.abs().max() <= 1 + 1e-9
    assert verify_run(digits_copy).ok


def test_a_checkpoint_that_differs_from_the_ledger_is_refused(digits_copy: Path) -> None:
    with RunStore(digits_copy) as store:
        path = store.latest_analysis("influence")["checkpoints"][0]["path"]
        before = len(store.analyses())
    with open(digits_copy / path, "ab") as fh:
        fh.write(b"\0")
    _one_line_error(run_cli("influence", str(digits_copy)), path, "does not match the ledger")
    with RunStore(digits_copy) as store:
        assert len(store.analyses()) == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--test-ids", "999999"], "not in this run"),
        (["--layer", "conv1"], "must be an nn.Linear"),
        (["--layer", "nope"], "no layer named"),
        (["--checkpoints", "99"], "no checkpoint 99"),
        (["--k", "0"], "--k: 0 is not between 1"),
        (["--mode", "influence_function", "--weighting", "usage"], "--weighting usage does not apply"),
        (["--mode", "influence_function", "--ray"], "--ray does not apply to influence_function"),
        (["--mode", "influence_function", "--damping", "0"], "--damping: 0 is not a finite number in (0"),
    ],
)
def test_bad_input_is_one_line_and_records_nothing(digits_run: Path, args: list[str], needle: str) -> None:
    with RunStore(digits_run) as store:
        before = len(store.analyses())
    _one_line_error(run_cli("influence", str(digits_run), *args), needle)
    with RunStore(digits_run) as store:
        assert len(store.analyses()) == before


def test_a_training_id_is_not_a_test_example(digits_run: Path) -> None:
    with RunStore(digits_run) as store:
        train_id = int(store.samples("train").sample_id.iloc[0])
    _one_line_error(run_cli("influence", str(digits_run), "--test-ids", str(train_id)), "not a test example")


@pytest.mark.parametrize("mode", ["exact", "adamw_influence"])
def test_the_replaying_modes_refuse_another_device_than_the_cpu(digits_run: Path, mode: str) -> None:
    """They replay the recorded steps, bit for bit on the CPU only: asked for CUDA they say so, before any work
    (the CLI's --device accepts cuda only on a machine that has it, so the library is called directly)."""
    from fgtrac_core.errors import FgtracError
    from fgtrac_core.influence.run_influence import run_influence

    with RunStore(digits_run) as store:
        before = len(store.analyses())
    with pytest.raises(FgtracError, match=f"--device cuda does not apply to {mode} mode"):
        run_influence(digits_run, mode=mode, device="cuda")
    with RunStore(digits_run) as store:
        assert len(store.analyses()) == before
