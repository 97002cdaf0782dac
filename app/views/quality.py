"""Data quality (`?n=50`): training samples ranked by self-influence (a high value: hard to fit, often a wrong
label), with how well that ranking finds the recorded flipped labels when the run records them."""

from __future__ import annotations

from typing import Any

import streamlit as st

from app import data
from app.ui import is_flipped, sample_grid


def _detection(aid: int) -> None:
    table = data.query("mislabel_detection", aid)
    if table is None:
        st.caption(
            "No `label_flipped` annotations recorded in this run: nothing to score the ranking against."
        )
        return
    st.subheader("Finding the recorded flipped labels")
    st.caption(f"{int(table['flipped_total'].iloc[0])} training samples are annotated label_flipped = true. "
               "Inspecting the top of the ranking:")  # fmt: skip
    cols = st.columns(len(table))
    for col, row in zip(cols, table.itertuples(index=False), strict=True):
        col.metric(f"top {row.inspected_fraction:.0%} ({row.inspected} samples)", f"precision {row.precision:.2f}",
                   delta=f"recall {row.recall:.2f}", delta_color="off", delta_arrow="off")  # fmt: skip


def render() -> None:
    st.title("Data quality")
    analysis = data.influence()
    aid = analysis["analysis_id"]
    ranked = data.query("self_influence", aid)
    st.caption(f"Self-influence from influence analysis #{aid} over {len(ranked)} training samples; ⚠ marks a "
               "label recorded as flipped.")  # fmt: skip
    _detection(aid)
    st.subheader("Highest self-influence")
    n = st.segmented_control(
        "Show", [20, 50, 100, 200], default=50, required=True, key="n", bind="query-params"
    )

    def caption(row: Any) -> str:
        mark = " ⚠" if is_flipped(row.label_flipped) else ""
        return f"rank {row.rank}  \nlabel {row.label}{mark}  \n{row.value:.3g}"

    sample_grid(ranked.head(n), "sample_id", caption, key="open_sample", width=72)


render()
