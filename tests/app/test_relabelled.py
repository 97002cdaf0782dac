"""A training sample trained on another target than its label reads "label→target" in the dashboard's lists."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from app import ui
from fgtrac_core.store import RunStore
from tests.app._support import PAGES, open_page
from tests.stages._loops import RELABEL_B, RELABEL_C, dataset


def test_label_text_and_legend() -> None:
    row = pd.Series({"label": 2, "flagged": True, "trained_as": [0, 1]})
    assert ui.label_text(row) == "2→0→1 ⚠"
    assert ui.label_text(pd.Series({"label": 2, "flagged": False, "trained_as": []})) == "2"
    frame = pd.DataFrame({"trained_as": [[], [1]]})
    assert "trained on target" in ui.relabel_legend(frame) and ui.relabel_legend(frame.head(1)) == ""


def test_list_caption_explains_only_the_marks_it_shows() -> None:
    """⚠'s legend only over a list holding a marked sample (a run without annotations has none to explain)."""
    plain = pd.DataFrame({"flagged": [False, False], "trained_as": [[], []]})
    assert ui.list_caption("lowered this example's loss", "label_flipped", plain) == "lowered this example's loss"
    marked = pd.DataFrame({"flagged": [False, True], "trained_as": [[], [1]]})
    assert ui.list_caption("raised it", "label_flipped", marked) == (
        "raised it; ⚠ = annotated label\\_flipped; 0→1 = registered label 0, trained on target 1"
    )


def test_data_quality_shows_the_trained_targets(relabelled_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    label = int(dataset()[1][0])
    with RunStore(relabelled_run) as store:
        flagged = 0 in store.marked_ids()
    at = open_page(relabelled_run, PAGES[4], monkeypatch, n="200")  # Data quality: every training sample listed
    shown = pd.concat([f.value for f in at.dataframe if "label" in f.value.columns])
    assert shown.loc["#0", "label"] == f"{label}→{RELABEL_B[0]}→{RELABEL_C[0]}" + (" ⚠" if flagged else "")
    assert shown.loc["#5", "label"].startswith(f"{int(dataset()[1][5])}→{RELABEL_B[5]}")
    assert shown.loc["#9", "label"] == str(int(dataset()[1][9]))  # trained on its own label again: no arrow
    assert any("trained on target" in c.value for c in at.caption)
