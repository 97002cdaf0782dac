"""Stages (`?behaviour=loss&slice=misclassified&stage=finetune&method=replay`): which training stage is
accountable, over the whole test set and over slices; pick a stage to see the examples it most helped and hurt."""

from __future__ import annotations

import functools
from typing import Any

import pandas as pd
import streamlit as st

from app import data
from app.data import EXPLORE
from app.ui import EFFECT_MEANING, HELPED_SIGN, chart_text, md, sample_grid, stage_bars, stage_method

PER_LIST = 10


def _stage_clicked(stages: list[str]) -> None:
    """A click on a bar picks its stage: copied into the bound stage picker before the rerun draws it (a
    callback, so that a later manual pick is not overwritten by the chart's lingering selection)."""
    points = st.session_state["aggregate_chart"]["selection"]["points"]
    by_label = {chart_text(s): s for s in stages}
    if points and points[0].get("x") in by_label:
        st.session_state["stage"] = by_label[points[0]["x"]]


def _slice_name(name: str) -> str:
    return {"all": "all test examples", "misclassified": "misclassified by the final model"}.get(
        name, name.replace("class=", "recorded class ")
    )


def _extremes(effects: pd.DataFrame, behaviour: str, stage: str, method: str, mark: str) -> None:
    """The test examples this stage most helped and most hurt under one method."""
    rows = effects[
        (effects["behaviour"] == behaviour) & (effects["stage"] == stage) & (effects["method"] == method)
    ]
    helped = rows.assign(helped=rows["value"] * HELPED_SIGN.get(behaviour, 1.0)).dropna(subset=["helped"])
    left, right = st.columns(2)

    # only examples the stage actually helped (hurt): a stage that helped every example hurt none of them
    best = helped[helped["helped"] > 0].nlargest(PER_LIST, "helped")
    worst = helped[helped["helped"] < 0].nsmallest(PER_LIST, "helped")
    shown = pd.concat([best, worst])
    known = data.query("labels_and_marks", [int(t) for t in shown["test_id"]], mark).set_index("sample_id")

    def facts(row: Any) -> dict[str, str]:
        label, flagged = known.loc[int(row.test_id), ["label", "flagged"]]
        return {"label": f"{'-' if pd.isna(label) else int(label)}{' ⚠' if flagged else ''}",
                "effect": f"{row.value:+.3g}"}  # fmt: skip

    for column, rows, verb, key in ((left, best, "helped", "open_helped"), (right, worst, "hurt", "open_hurt")):
        with column:
            st.markdown(f"**Most {verb} by {md(stage)}**")
            if rows.empty:
                st.caption(f"No test example in this list was {verb} by {md(stage)} ({behaviour}, {method}).")
            else:
                sample_grid(rows, "test_id", facts, key=key, target=EXPLORE)


def render() -> None:
    st.title("Stages")
    analysis = data.stage_analysis()
    if analysis is None:
        data.no_stages()
        return
    aid = analysis["analysis_id"]
    stage_method(analysis)
    aggregates = data.query("stage_aggregates", aid)
    if aggregates.empty:
        st.info(f"Stage analysis #{aid} stored no aggregates.")
        return
    c1, c2 = st.columns(2)
    behaviours = sorted(aggregates["behaviour"].unique(), key=lambda b: (b != "loss", b))
    behaviour = c1.selectbox("Behaviour", behaviours, key="behaviour", bind="query-params")
    slices = sorted(aggregates["slice"].unique(), key=lambda s: (s != "all", s != "misclassified", s))
    slice_ = c2.selectbox(
        "Slice (all, misclassified or a recorded class)", slices, key="slice", bind="query-params"
    )
    shown = aggregates[(aggregates["behaviour"] == behaviour) & (aggregates["slice"] == slice_)]
    n = int(shown["n"].max()) if not shown.empty else 0
    on_click = functools.partial(_stage_clicked, list(dict.fromkeys(shown["stage"])))
    stage_bars(shown, behaviour, key="aggregate_chart", on_select=on_click,
               title=f"Mean stage effect over {chart_text(_slice_name(slice_))} (n = {n}); click a bar to pick its stage")  # fmt: skip
    st.caption(md(EFFECT_MEANING.get(behaviour, "")))

    faith = data.query("stage_faithfulness", aid)
    if not faith.empty:
        with st.expander("Faithfulness: estimates against exact replay"):
            st.dataframe(faith, hide_index=True)
            for method, why in (analysis["params"].get("not_run") or {}).items():
                st.caption(f"{md(method)} not run: {md(why)}")

    st.subheader("Examples a stage most helped and hurt")
    effects = data.query("stage_effects", aid)
    per_example = effects[effects["behaviour"] == behaviour]
    if per_example.empty:
        st.caption(f"no per-example effects stored for behaviour {md(behaviour)}")
        return
    stages = list(dict.fromkeys(per_example["stage"]))
    methods = sorted(per_example["method"].unique(), key=lambda m: (m != "replay", m))
    c1, c2 = st.columns(2)
    stage = c1.selectbox("Stage", stages, key="stage", bind="query-params")
    label = "Method (replay is the ground truth)" if "replay" in methods else "Method (an estimate: not replayed)"
    method = c2.selectbox(label, methods, key="method", bind="query-params")
    _extremes(per_example, behaviour, stage, method, data.mark())


render()
