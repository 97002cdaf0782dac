"""Sample lifecycle (`?sample=ID`): what was recorded about one sample, from ingest to its influence, and a
downloadable usage proof (the same bundle as `fgtrac prove`)."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import data
from app.data import EXPLORE
from app.ui import chart_text, display, md, sample_grid
from fgtrac_core._text import lr_text, or_dash
from fgtrac_core.errors import UnknownSampleError


def _record(sample_id: int) -> dict[str, Any]:
    try:
        return data.query("sample", sample_id)
    except UnknownSampleError:
        st.error(f"Sample #{sample_id} is not in this run.")
        st.stop()


def _header(record: dict[str, Any], mark: str) -> None:
    sid = record["sample_id"]
    thumb = data.thumbnails([sid]).get(sid)
    left, right = (st.columns([1, 4]) if thumb is not None else (None, st.container()))
    if thumb is not None:
        left.image(thumb, width=160)
    right.subheader(f"Sample #{sid}")
    cols = right.columns(3)
    cols[0].metric("split", record["split"])
    cols[1].metric("recorded label", "none" if record["label"] is None else int(record["label"]))
    cols[2].metric(
        "registered", record["registered_at"][:10], help=f"registered at {record['registered_at']} UTC"
    )
    if record["annotations"].get(mark) is True:
        right.warning(f"Annotated {md(mark)} = true: marked as suspect (e.g. its recorded label is known wrong).")
    with right:
        display(record["display"], key="display")
    right.caption("content sha256 (of the raw sample bytes)")
    right.text(record["content_sha256"])
    if record["source"]:
        right.caption(f"source: {md(record['source'])}")


def _hover_facts(uses: pd.DataFrame) -> list[list[str]]:
    """Epoch, lr, batch loss and position of each use as text; "-" where log_batch was not given one."""
    return [[or_dash(u.epoch, ".0f"), lr_text(u.lr, u.group_lrs), or_dash(u.loss, ".3f"), or_dash(u.position, "d")]
            for u in uses.itertuples()]  # fmt: skip


def _usage(sample_id: int) -> None:
    st.subheader("Uses in training")
    usage = data.query("sample_usage", sample_id)
    if usage.empty:
        st.caption("never used in a recorded batch")
        return
    stages = data.query("stages")
    names = [chart_text(n) for n in stages["name"]]
    shown = usage.assign(stage=usage["stage"].map(chart_text))
    fig = go.Figure(
        [
            go.Scatter(x=g["step"].tolist(), y=g["stage"].tolist(), mode="markers", name=name, marker={"size": 11},
                       customdata=_hover_facts(g),
                       hovertemplate="step %{x}<br>epoch %{customdata[0]}<br>lr %{customdata[1]}<br>batch loss "
                       "%{customdata[2]}<br>position %{customdata[3]}<extra></extra>")
            for name, g in shown.groupby("stage", sort=False)
        ],
        layout={"title": {"text": f"{len(usage)} uses, by step and stage"}, "xaxis": {"title": {"text": "step"}}},
    )  # fmt: skip
    # every stage's span as a band, so that uses read against the whole run, not only the stages that used it
    for name, r in zip(names, stages.itertuples(), strict=True):
        end = r.end_step if pd.notna(r.end_step) else usage["step"].max()
        fig.add_vrect(x0=r.start_step, x1=end, fillcolor="gray", opacity=0.08, line_width=0,
                      annotation_text=name, annotation_position="top left")  # fmt: skip
    fig.update_yaxes(categoryorder="array", categoryarray=names, range=[-0.5, len(names) - 0.5])
    fig.update_layout(height=260, margin={"t": 40, "b": 10}, showlegend=False)
    st.plotly_chart(fig, key="usage_chart")
    for r in data.query("sample_relabels", sample_id):
        st.warning(f"Relabelled: trained on target {r['to']} (was {r['from']}) from step {r['step']}, stage "
                   f"{md(r['stage'])}.")  # fmt: skip
    table = usage.assign(lr=[lr_text(u.lr, u.group_lrs) for u in usage.itertuples()]).drop(columns="group_lrs")
    st.dataframe(table, hide_index=True, height="auto" if len(usage) <= 10 else 300)


def _influence(sample_id: int, split: str, mark: str) -> None:
    analysis = data.pick_analysis("influence")
    if analysis is None:
        data.show_command("No influence results in this run yet: compute them with", "fgtrac influence {run}")
        return
    aid = analysis["analysis_id"]
    if split != "train":
        st.page_link(
            EXPLORE, label=f"Open test example #{sample_id} in Explore", query_params={"test": str(sample_id)}
        )
        return
    si = data.query("self_influence_of", aid, sample_id)
    if si is not None:
        st.metric("self-influence", f"{si['value']:.4g}", help="high: the model found this sample hard to fit",
                  delta=f"rank {si['rank']} of {si['n_train']}", delta_color="off", delta_arrow="off")  # fmt: skip
    st.subheader("Test examples it most influences")
    top = data.query("most_influenced", aid, sample_id, 10)
    if top.empty:
        st.caption(f"in no stored top-{md(analysis['params'].get('k', ''))} list")
        return

    known = data.query("labels_and_marks", [int(t) for t in top["test_id"]], mark).set_index("sample_id")

    def facts(row: Any) -> dict[str, str]:
        label, flagged = known.loc[int(row.test_id), ["label", "flagged"]]
        return {"label": f"{'-' if pd.isna(label) else int(label)}{' ⚠' if flagged else ''}",
                md(row.direction): f"#{row.rank}", "score": f"{row.score:+.3g}"}  # fmt: skip

    sample_grid(top, "test_id", facts, key="open_test", target=EXPLORE, reference=sample_id)


def render() -> None:
    st.title("Sample lifecycle")
    sample_id = st.number_input("Sample id", min_value=0, value=None, step=1, placeholder="e.g. 42", key="sample",
                                bind="query-params", width=240)  # fmt: skip
    if sample_id is None:
        st.info("Enter a sample id, or open one from the Explore or Data quality pages.")
        return
    sample_id = int(sample_id)
    record = _record(sample_id)
    mark = data.mark()
    _header(record, mark)
    st.download_button(
        "Download usage proof",
        data=lambda: data.usage_proof(sample_id),
        file_name=f"usage-proof-sample-{sample_id}.json",
        mime="application/json",
        key="proof",
        help="Registration, preprocessing and every recorded use, each with a Merkle inclusion proof against the "
        "signed tree head; check it offline with `fgtrac check-proof FILE --public-key KEY`.",
    )
    _usage(sample_id)
    _influence(sample_id, record["split"], mark)
    transforms = data.query("sample_transforms", sample_id)
    st.subheader("Preprocessing")
    if transforms.empty:
        st.caption("no recorded transforms")
    else:
        st.dataframe(transforms, hide_index=True)
    if record["annotations"]:
        st.subheader("Annotations")
        st.dataframe(
            pd.DataFrame([(k, json.dumps(v)) for k, v in record["annotations"].items()], columns=["key", "value (JSON)"]),
            hide_index=True,
        )


render()
