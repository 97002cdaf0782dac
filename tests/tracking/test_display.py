"""`register_samples(display=...)`: text and feature values per sample, committed, verified, read back typed;
annotations keep their JSON types; `feature_contrast` against a hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from fgtrac_core.errors import FgtracError
from fgtrac_core.sample_display import MAX_TEXT, decode, encode, feature_contrast
from fgtrac_core.store import RunStore
from fgtrac_core.tracking import Run
from fgtrac_core.verify import verify_run
from tests.conftest import run_cli

FEATURES = [{"age": 41.0, "income": 52000, "city": "Lyon"}, {"age": 29.5, "income": 31000, "city": "Nice"}]


@pytest.fixture
def shown_run(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    with Run.create(out, name="display") as run:
        run.register_samples([0, 1], split="train", labels=[1, 0], raw=np.arange(8.0).reshape(2, 4),
                             display=FEATURES)  # fmt: skip
        run.register_samples([2, 3, 4], split="test", labels=[0, 1, 1], content_sha256=["ab" * 32] * 3,
                             display=["a short review: great", None, "naïve ‮text"])  # fmt: skip
        frame = pd.DataFrame({"x": [1.5, 2.5], "y": [np.int64(3), np.int64(4)]})
        run.register_samples([5, 6], split="val", raw=[b"a", b"b"], display=frame)
        run.annotate_samples([0, 1], "label_flipped", [True, False])
        run.annotate_samples([0, 1], "score", [0.5, 2])
        run.annotate_samples([0, 1], "note", ["x", None])
    return out


def test_display_reads_back_with_types(shown_run: Path) -> None:
    with RunStore(shown_run) as store:
        assert store.sample(0)["display"] == FEATURES[0]
        assert list(store.sample(0)["display"]) == ["age", "income", "city"]  # recorded order kept
        assert store.sample(2)["display"] == "a short review: great"
        assert store.sample(3)["display"] is None
        assert store.displays([4, 5, 3, 99]) == {4: "naïve ‮text", 5: {"x": 1.5, "y": 3}}
        annotations = store.sample(0)["annotations"]
        assert annotations == {"label_flipped": True, "note": "x", "score": 0.5}
        assert store.sample(1)["annotations"] == {"label_flipped": False, "note": None, "score": 2}
        assert store.marks() == ["label_flipped"]  # the only all-boolean annotation


def test_display_is_committed_and_verified(shown_run: Path) -> None:
    assert verify_run(shown_run).ok
    snap = shown_run / "snapshot.duckdb"
    with duckdb.connect(str(snap)) as con:
        con.execute("""UPDATE samples SET display = '{"text": "a short review: awful"}' WHERE sample_id = 2""")
    report = verify_run(shown_run)
    assert not report.ok
    failure = report.first_failure
    assert (failure.table, failure.row, failure.field) == ("samples", "row sample_id=2", "display"), failure


def test_sample_command_shows_display(shown_run: Path) -> None:
    proc = run_cli("sample", str(shown_run), "0", check=True)
    assert "features        age=41.0, income=52000, city=Lyon" in proc.stdout
    assert "annotation      label_flipped = true" in proc.stdout
    proc = run_cli("sample", str(shown_run), "4", check=True)
    assert "text            naïve \\u202etext" in proc.stdout  # a bidi override is shown, not obeyed
    assert json.loads(run_cli("sample", str(shown_run), "0", "--json", check=True).stdout)["display"] == FEATURES[0]


@pytest.mark.parametrize(
    ("display", "message"),
    [
        ("abc", "one value per sample"),
        (["a"], "display has 1 entries for 2 sample ids"),
        (["a", 3], "entry 1 is a int"),
        (["a", "x" * (MAX_TEXT + 1)], f"at most {MAX_TEXT}"),
        ([{"a": 1}, {}], "entry 1 has 0 features"),
        ([{"a": [1, 2]}, {"a": 1}], "feature 'a' of entry 0 is not a single value"),
    ],
)
def test_bad_display_is_refused_and_nothing_recorded(tmp_path: Path, display: object, message: str) -> None:
    with Run.create(tmp_path / "run", name="bad") as run:
        with pytest.raises(FgtracError, match=message):
            run.register_samples([0, 1], split="train", raw=[b"a", b"b"], display=display)
        run.register_samples([0, 1], split="train", raw=[b"a", b"b"])  # the ids were not taken
    assert verify_run(tmp_path / "run").ok


def test_encode_decode_round_trip() -> None:
    values = ["t", {"f": 1.25, "g": "a", "h": None, "i": True}, None]
    assert [decode(e) for e in encode(values, 3)] == values


def test_float32_features_keep_the_digits_they_print_with() -> None:
    """A float32 column (features loaded as float32, as torch pipelines do) is stored as the shortest decimal that
    reads back as that float32, as numpy and pandas print it, not as the digits of its float64 widening."""
    frame = pd.DataFrame({"radius": np.array([21.72, 0.1], np.float32), "area": np.array([1.5, np.inf], np.float16)})
    assert [decode(s) for s in encode(frame, 2)] == [{"radius": 21.72, "area": 1.5}, {"radius": 0.1, "area": "Infinity"}]
    assert decode(encode([{"radius": np.float32(21.72), "wide": np.float64(21.72)}], 1)[0]) == {"radius": 21.72, "wide": 21.72}
    assert float(np.float32(21.72)) != 21.72  # what the plain conversion would have stored


def test_feature_contrast_matches_hand_computation() -> None:
    ref = {"a": 0.0, "b": 10.0, "c": "x"}
    rows = {7: {"a": 2.0, "b": 10.0, "c": "y"}, 9: {"a": -1.0, "b": 13.0, "c": "z"}}
    got = feature_contrast(ref, rows)
    std_a = np.std([2.0, -1.0, 0.0])
    std_b = np.std([10.0, 13.0, 10.0])
    expected = pd.DataFrame(
        {"b": [0.0, 3.0 / std_b], "a": [2.0 / std_a, 1.0 / std_a], "c": [np.nan, np.nan]}, index=[7, 9]
    )
    # numeric features by mean distance, largest first; a text feature has no distance and goes last
    order = sorted(["a", "b"], key=lambda c: -expected[c].mean()) + ["c"]
    pd.testing.assert_frame_equal(got, expected[order])
    without_ref = feature_contrast(None, rows)  # distance from the listed samples' mean
    mean_a = 0.5
    assert without_ref.loc[7, "a"] == pytest.approx(1.5 / np.std([2.0, -1.0, mean_a]))


def test_feature_contrast_in_units_of_a_given_spread(shown_run: Path) -> None:
    """With the training set's spread (RunStore.feature_spread, checked against numpy) as the unit."""
    with RunStore(shown_run) as store:
        spread = store.feature_spread()
    assert spread == pytest.approx({"age": np.std([41.0, 29.5]), "income": np.std([52000, 31000])})
    got = feature_contrast({"age": 30.0, "income": 50000}, {0: FEATURES[0]}, spread)
    assert got.loc[0, "age"] == pytest.approx(11.0 / spread["age"])
    assert got.loc[0, "income"] == pytest.approx(2000 / spread["income"])
    assert np.isnan(got.loc[0, "city"])
