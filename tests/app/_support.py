"""Helpers of the dashboard tests: opening a page under AppTest, and recording stage-accountability rows.

Stage results come from `fgtrac stages RUN`; the sample run does not hold them yet, so these tests record
deterministic synthetic rows of the same tables through `Run.record_analysis` (the ledger stays intact).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from fgtrac_core.store import RunStore
from fgtrac_core.tracking import Run

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")
PAGES = ["views/explore.py", "views/overview.py", "views/stages.py", "views/lifecycle.py", "views/quality.py",
         "views/audit.py"]  # fmt: skip


def plain(markdown: str) -> str:
    """Undo the app's markdown escaping of recorded text (backslashes, and the word joiners that break autolinks)."""
    return re.sub(r"\\(.)", r"\1", markdown).replace("\u2060", "")


def open_page(run: Path, page: str, monkeypatch: pytest.MonkeyPatch, **params: str) -> AppTest:
    """The app on `run`, opened on `page` (a file under app/) with these URL query parameters, as a browser
    opening that address would (bound widgets read the URL when they are first drawn)."""
    monkeypatch.setenv("FGTRAC_RUN", str(run))
    at = AppTest.from_file(APP, default_timeout=120)
    if page == PAGES[0]:
        at.query_params.update(params)
    else:
        at.run()  # registers the pages, so that switch_page can find them
        at.switch_page(page)
        at.query_params.clear()
        at.query_params.update(params)
    at.run()
    assert not at.exception, at.exception
    return at


# stage the synthetic effects single out: it raises the loss of the examples the final model gets wrong
HURTING_STAGE = "finetune"


def _effects(run_dir: Path) -> tuple[list[str], list[int], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Stage names and ids, test ids, their recorded labels, misclassified mask, and (methods, stages, tests)
    loss effects: 'replay' (the ground truth) and an estimate close to it."""
    with RunStore(run_dir) as store:
        stages = store.stages()
        tests = store.influence_tests(store.latest_analysis("influence")["analysis_id"])
    rng = np.random.default_rng(0)
    wrong = tests["misclassified"].to_numpy(bool)
    truth = rng.normal(-0.05, 0.05, (len(stages), len(tests)))
    truth[stages["name"].tolist().index(HURTING_STAGE)] += 0.5 * wrong
    estimate = truth + rng.normal(0.0, 0.02, truth.shape)
    return (
        stages["name"].tolist(),
        stages["stage_id"].astype(int).tolist(),
        tests["sample_id"].astype(int).tolist(),
        [f"class={int(c)}" for c in tests["label"]],
        wrong,
        np.stack([truth, estimate]),
    )


def record_stage_rows(run_dir: Path) -> None:
    """Record a 'stages' analysis (effects for behaviours loss and margin, slice aggregates, faithfulness)."""
    _, stage_ids, test_ids, classes, wrong, values = _effects(run_dir)
    methods = ["replay", "propagated"]
    effects: dict[str, list] = {"method": [], "behaviour": [], "test_id": [], "stage_id": [], "value": []}
    aggregates: dict[str, list] = {
        "method": [],
        "behaviour": [],
        "slice": [],
        "stage_id": [],
        "value": [],
        "n": [],
    }
    slices = {"all": np.ones(len(test_ids), bool), "misclassified": wrong}
    slices.update({c: np.array([x == c for x in classes]) for c in sorted(set(classes))})
    for m, method in enumerate(methods):
        for behaviour, scale in (("loss", 1.0), ("margin", -3.0)):
            for k, stage_id in enumerate(stage_ids):
                v = scale * values[m, k]
                effects["method"] += [method] * len(test_ids)
                effects["behaviour"] += [behaviour] * len(test_ids)
                effects["test_id"] += test_ids
                effects["stage_id"] += [stage_id] * len(test_ids)
                effects["value"] += v.tolist()
                for name, mask in slices.items():
                    aggregates["method"].append(method)
                    aggregates["behaviour"].append(behaviour)
                    aggregates["slice"].append(name)
                    aggregates["stage_id"].append(stage_id)
                    aggregates["value"].append(float(v[mask].mean()) if mask.any() else None)
                    aggregates["n"].append(int(mask.sum()))
    pearson = [float(np.corrcoef(values[0, k], values[1, k])[0, 1]) for k in range(len(stage_ids))]
    faithfulness = pa.table(
        {
            "method": pa.array(["propagated"] * len(stage_ids)),
            "horizon": pa.array([None] * len(stage_ids), pa.int32()),
            "stage_id": pa.array(stage_ids, pa.int32()),
            "pearson": pa.array(pearson, pa.float64()),
            "spearman": pa.array(pearson, pa.float64()),
            "sign_agreement": pa.array([0.9] * len(stage_ids), pa.float64()),
            "top1_agreement": pa.array([0.8] * len(stage_ids), pa.float64()),
            "aggregate_error": pa.array([0.01] * len(stage_ids), pa.float64()),
            "seconds": pa.array([0.5] * len(stage_ids), pa.float64()),
            "reference_seconds": pa.array([5.0] * len(stage_ids), pa.float64()),
            "confidence": pa.array([None] * len(stage_ids), pa.float64()),
        }
    )
    run = Run.open(run_dir)
    try:
        run.record_analysis(
            "stages",
            "replay",
            {"behaviours": ["loss", "margin"], "compare": True, "synthetic": "dashboard tests"},
            [],
            {
                "stage_effects": pa.table(
                    {
                        "method": pa.array(effects["method"]),
                        "behaviour": pa.array(effects["behaviour"]),
                        "test_id": pa.array(effects["test_id"], pa.int64()),
                        "stage_id": pa.array(effects["stage_id"], pa.int32()),
                        "value": pa.array(effects["value"], pa.float64()),
                    }
                ),
                "stage_aggregates": pa.table(
                    {
                        "method": pa.array(aggregates["method"]),
                        "behaviour": pa.array(aggregates["behaviour"]),
                        "slice": pa.array(aggregates["slice"]),
                        "stage_id": pa.array(aggregates["stage_id"], pa.int32()),
                        "value": pa.array(aggregates["value"], pa.float64()),
                        "n": pa.array(aggregates["n"], pa.int32()),
                    }
                ),
                "stage_faithfulness": faithfulness,
            },
        )
    finally:
        run.close()


def chart(at: AppTest, index: int = 0) -> dict:
    """The plotly figure of the page's `index`-th chart, with typed arrays (plotly's {"bdata", "dtype"}) decoded
    to lists."""
    import base64
    import json

    def decode(value: object) -> object:
        if isinstance(value, dict):
            if "bdata" in value and "dtype" in value:
                return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).tolist()
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    return decode(json.loads(at.get("plotly_chart")[index].proto.spec))
