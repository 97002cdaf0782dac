"""Small display helpers shared by the pages: safe text, image grids that link to a sample's page, stage bars."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import data
from app.data import LIFECYCLE, thumbnails

_MD_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")
# GFM autolinks (`https://x.y`, `www.x.y`, `a@x.y`) are found in the *parsed* text, after backslash escapes are
# resolved, so escaping cannot stop them: an invisible U+2060 WORD JOINER before every '.', ':' and '@' does
_AUTOLINK_BREAK = re.compile(r"(?=[.:@])")
WORD_JOINER = "\u2060"

# what a positive stage effect means, per behaviour (fgtrac_core.stages.behaviours)
EFFECT_MEANING = {
    "loss": "positive = the stage raised the loss (hurt), negative = it lowered the loss (helped)",
    "margin": "positive = the stage raised the margin (helped), negative = it lowered it (hurt)",
    "accuracy": "positive = the stage raised accuracy (fraction of the slice)",
}
# sign that turns an effect into "how much the stage helped" (loss: lower is better)
HELPED_SIGN = {"loss": -1.0, "margin": 1.0, "accuracy": 1.0}


def md(text: Any) -> str:
    """Recorded text (anything read from the run database) made literal for Streamlit markdown — st.markdown,
    st.caption, st.title, st.error... — the one helper every page uses for it.

    Every ASCII punctuation character is backslash-escaped, so the text can never become markdown or HTML (a
    link, an image, LaTeX, a directive, an icon or emoji shortcode), and a WORD JOINER (invisible) goes before
    every '.', ':' and '@', so it can never become a GFM autolink either.  It reads the same on the page.
    """
    return _MD_SPECIAL.sub(r"\\\1", _AUTOLINK_BREAK.sub(WORD_JOINER, str(text)))


def chart_text(text: Any) -> str:
    """Recorded text made literal for plotly, which reads a few HTML tags (<a>, <b>, <br>) in labels."""
    return html.escape(str(text))


def is_flipped(value: Any) -> bool:
    """True when a `label_flipped` annotation says the recorded label is known to be wrong."""
    return isinstance(value, str) and value.lower() == "true"


def sample_grid(
    frame: pd.DataFrame,
    id_column: str,
    caption: Callable[[Any], str],
    *,
    key: str,
    target: str = LIFECYCLE,
    width: int = 88,
) -> None:
    """Thumbnails captioned with their id and `caption(row)` (markdown: callers build it from numbers only), and
    below them one row of ids: picking one opens that sample's page, `target` LIFECYCLE (`?sample=`) or EXPLORE
    (`?test=`).

    All thumbnails go into one image element and all ids into one widget: drawn as one element per sample (in
    columns, each with its own link), the grids were about a third of the browser's time to draw Explore.
    """
    if frame.empty:
        st.caption("none")
        return
    ids = [int(i) for i in frame[id_column]]
    thumbs = thumbnails(ids)
    shown = [(sid, row) for sid, row in zip(ids, frame.itertuples(index=False), strict=True) if sid in thumbs]
    if shown:
        st.image([thumbs[sid] for sid, _ in shown], width=width,
                 caption=[f"#{sid}  \n{caption(row)}" for sid, row in shown])  # fmt: skip
    param, label = ("sample", "Open the lifecycle of") if target == LIFECYCLE else ("test", "Open in Explore")
    pick = st.pills(label, ids, format_func=lambda i: f"#{i}", key=key, wrap=True)
    if pick is not None:
        st.switch_page(target, query_params={param: str(pick)})


def bars(
    frame: pd.DataFrame, x: str, y: str, color: str, *, title: str, y_title: str, height: int = 300
) -> go.Figure:
    """Grouped bars, one trace per value of `color` in order of appearance.  Built with graph_objects: plotly
    express costs ~10x more per figure, which showed in the time to switch test example."""
    traces = [
        go.Bar(x=group[x].tolist(), y=group[y].tolist(), name=name)
        for name, group in frame.groupby(color, sort=False)
    ]
    return go.Figure(
        traces,
        layout={"barmode": "group", "title": {"text": title}, "height": height, "margin": {"t": 40, "b": 10},
                "yaxis": {"title": {"text": y_title}}, "xaxis": {"type": "category"}, "legend": {"title": {"text": color}}},
    )  # fmt: skip


def lines(
    frame: pd.DataFrame, x: str, y: str, color: str, *, title: str, mode: str = "lines", height: int = 280
) -> go.Figure:
    """One line (or marker) trace per value of `color`, in order of appearance (graph_objects, see `bars`)."""
    traces = [
        go.Scatter(x=group[x].tolist(), y=group[y].tolist(), name=name, mode=mode)
        for name, group in frame.groupby(color, sort=False)
    ]
    return go.Figure(
        traces,
        layout={"title": {"text": title}, "height": height, "margin": {"t": 40, "b": 10},
                "xaxis": {"title": {"text": x}}, "yaxis": {"title": {"text": y}}, "legend": {"title": {"text": color}}},
    )  # fmt: skip


def stage_bars(
    effects: pd.DataFrame,
    behaviour: str,
    *,
    key: str,
    title: str,
    height: int = 300,
    on_select: Callable[[], None] | None = None,
) -> None:
    """Grouped bars of stage effects (x stage, one colour per method; replay is the ground truth); `on_select`
    runs when the user clicks a bar (the selection is in st.session_state[key])."""
    shown = effects.assign(
        stage=effects["stage"].map(chart_text),
        method=effects["method"].map(lambda m: "replay (ground truth)" if m == "replay" else chart_text(m)),
    ).sort_values("method", key=lambda m: m != "replay (ground truth)", kind="stable")
    fig = bars(
        shown, "stage", "value", "method", title=title, y_title=f"effect on {chart_text(behaviour)}", height=height
    )
    if on_select is None:
        st.plotly_chart(fig, key=key)
    else:
        st.plotly_chart(fig, key=key, on_select=on_select, selection_mode="points")


def ledger_metrics() -> dict[str, Any]:
    """The ledger's entry count and latest signed tree size as two metrics; returns the signing facts."""
    signing = data.query("signing")
    cols = st.columns(2)
    cols[0].metric("ledger entries", signing["n_entries"])
    cols[1].metric("latest signed tree size", signing["tree_size"] or 0)
    return signing
