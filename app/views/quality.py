"""Data quality (`?n=50`): training samples ranked by self-influence (a high value: hard to fit, often a wrong
label), with how well that ranking finds the recorded flipped labels when the run records them."""

from __future__ import annotations

from typing import Any

import streamlit as st

from app import data
from app.ui import label_text, md, relabel_legend, sample_grid


def _detection(aid: int, mark: str) -> None:
    table = data.query("mislabel_detection", aid, (0.05, 0.10, 0.20), mark)
    if table is None:
        st.caption(
            "No boolean annotation recorded in this run (e.g. `label_flipped`, see `Run.annotate_samples`): "
            "nothing to score the ranking against."
        )
        return
    st.subheader(f"Finding the samples annotated {md(mark)}")
    if not table["flipped_total"].iloc[0]:  # recall is undefined: there is nothing to find
        st.caption(f"No training sample is annotated {md(mark)} = true: nothing for the ranking to find.")
        return
    st.caption(f"{int(table['flipped_total'].iloc[0])} training samples are annotated {md(mark)} = true. "
               "Inspecting the top of the ranking:")  # fmt: skip
    cols = st.columns(len(table))
    for col, row in zip(cols, table.itertuples(index=False), strict=True):
        col.metric(f"top {row.inspected_fraction:.0%} ({row.inspected} samples)", f"precision {row.precision:.2f}",
                   delta=f"recall {row.recall:.2f}", delta_color="off", delta_arrow="off")  # fmt: skip


def render() -> None:
    st.title("Data quality")
    analysis = data.influence()
    mark = data.mark()
    aid = analysis["analysis_id"]
    n_train = data.query("self_influence_count", aid)
    st.caption(f"Self-influence from influence analysis #{aid} over {n_train} training samples; ⚠ marks a "
               f"sample annotated {md(mark)} (pick another boolean annotation in the sidebar).")  # fmt: skip
    _detection(aid, mark)
    st.subheader("Highest self-influence")
    n = st.segmented_control(
        "Show", [20, 50, 100, 200], default=50, required=True, key="n", bind="query-params"
    )
    # only the rows shown: the whole ranking is a row per training sample (a million on a large run)
    ranked = data.query("self_influence", aid, mark, n)
    if legend := relabel_legend(ranked):
        st.caption(legend)

    def facts(row: Any) -> dict[str, str]:
        return {"rank": str(row.rank), "label": label_text(row),
                "self-influence": f"{row.value:.3g}"}  # fmt: skip

    sample_grid(ranked, "sample_id", facts, key="open_sample", width=72)


render()
