"""Small display helpers shared by the pages: safe text, image grids that link to a sample's page, stage bars."""

from __future__ import annotations

import html
import itertools
import re
from collections.abc import Callable
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.colors import qualitative

from app import data
from app.data import LIFECYCLE, thumbnails
from fgtrac_core.sample_display import feature_contrast

_MD_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")
# GFM autolinks (`https://x.y`, `www.x.y`, `a@x.y`) are found in the *parsed* text, after backslash escapes are
# resolved, so escaping cannot stop them: an invisible U+2060 WORD JOINER before every '.', ':' and '@' does
_AUTOLINK_BREAK = re.compile(r"(?=[.:@])")
WORD_JOINER = "\u2060"
GROUND_TRUTH = "replay (ground truth)"  # the legend name of exact replay's stage effects

# what a positive stage effect means, per behaviour (fgtrac_core.stages.behaviours)
EFFECT_MEANING = {
    "loss": "positive = the stage raised the loss (hurt), negative = it lowered the loss (helped)",
    "margin": "positive = the stage raised the margin (helped), negative = it lowered it (hurt)",
    "accuracy": "positive = the stage raised accuracy (fraction of the slice)",
}
# sign that turns an effect into "how much the stage helped" (loss: lower is better)
HELPED_SIGN = {"loss": -1.0, "margin": 1.0, "accuracy": 1.0}


def plural(n: int, word: str) -> str:
    """"1 checkpoint", "3 checkpoints"."""
    return f"{n} {word}{'' if n == 1 else 's'}"


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


def label_text(row: Any) -> str:
    """A listed training sample's label: the registered one, then "→t" for each other target the loop trained it
    on (`log_batch(targets=...)`), then ⚠ when the picked mark flags it; e.g. "0→1 ⚠"."""
    text = "-" if pd.isna(row.label) else str(int(row.label))
    return text + "".join(f"→{t}" for t in row.trained_as) + (" ⚠" if row.flagged else "")


def relabel_legend(frame: pd.DataFrame) -> str:
    """The legend of `label_text`'s arrows ("" when no listed sample was trained on another target)."""
    if not any(len(t) for t in frame["trained_as"]):
        return ""
    return "0→1 = registered label 0, trained on target 1"


def list_caption(effect: str, mark: str, listed: pd.DataFrame) -> str:
    """The caption over a list of training samples: what they did, what ⚠ marks (when a listed sample carries
    it), and `relabel_legend`."""
    marked = f"⚠ = annotated {md(mark)}" if listed["flagged"].any() else ""
    return "; ".join(filter(None, [effect, marked, relabel_legend(listed)]))


FEATURES_SHOWN = 8  # feature columns in a sample table: the ones that differ most from the reference
_ROW_PX = 35  # st.dataframe's row height: tables of listed samples are drawn whole, without a scrollbar


def caption(sample_id: int, facts: dict[str, str]) -> str:
    """A thumbnail's caption: the id, then one `name value` line per fact (markdown line breaks)."""
    return "  \n".join([f"#{sample_id}", *(f"{k} {v}" for k, v in facts.items())])


def sample_grid(
    frame: pd.DataFrame,
    id_column: str,
    facts: Callable[[Any], dict[str, str]],
    *,
    key: str,
    target: str = LIFECYCLE,
    width: int = 88,
    reference: int | None = None,
) -> None:
    """The listed samples, each with its id and `facts(row)` (name -> text, e.g. label, score, ⚠; callers build
    the text from numbers only), then one row of ids: picking one opens that sample's page, `target` LIFECYCLE
    (`?sample=`) or EXPLORE (`?test=`).

    Samples with a thumbnail are drawn as images; the others as one table row each, with the text or feature
    values recorded by `register_samples(display=...)`.  Feature columns are ordered by how far the listed
    samples are from sample `reference` (the test example, or the training sample whose influence is listed; else
    from their mean) and shaded where they are far.
    All thumbnails go into one image element and all ids into one widget: drawn as one element per sample (in
    columns, each with its own link), the grids were about a third of the browser's time to draw Explore.
    """
    if frame.empty:
        st.caption("none")
        return
    ids = [int(i) for i in frame[id_column]]
    thumbs = thumbnails(ids)
    rows = list(zip(ids, frame.itertuples(index=False), strict=True))
    imaged = [(sid, facts(row)) for sid, row in rows if sid in thumbs]
    if imaged:
        st.image([thumbs[sid] for sid, _ in imaged], width=width, caption=[caption(sid, f) for sid, f in imaged])
    plain = [(sid, facts(row)) for sid, row in rows if sid not in thumbs]
    if plain:
        # the listed samples open in the lifecycle page when they are training samples, whose reference is then
        # the test example; listed test examples are read against the training sample whose page this is
        _sample_table(plain, reference, target == LIFECYCLE, key=f"{key}_table")
    param, label = ("sample", "Open the lifecycle of") if target == LIFECYCLE else ("test", "Open in Explore")
    pick = st.pills(label, ids, format_func=lambda i: f"#{i}", key=key, wrap=True)
    if pick is not None:
        st.switch_page(target, query_params={param: str(pick)})


def _sample_table(
    rows: list[tuple[int, dict[str, str]]], reference: int | None, reference_is_test: bool, *, key: str
) -> None:
    """Samples without a thumbnail as a table: id, facts, then their recorded text or feature values."""
    short, name = ("test", "test example") if reference_is_test else ("train", "training sample")
    wanted = [sid for sid, _ in rows] + ([reference] if reference is not None else [])
    shown = data.query("displays", wanted)
    table = pd.DataFrame([f for _, f in rows], index=[f"#{sid}" for sid, _ in rows])
    texts = {sid: d for sid, d in shown.items() if isinstance(d, str)}
    if texts:
        table["text"] = [texts.get(sid, "") for sid, _ in rows]
    features = {sid: shown[sid] for sid, _ in rows if isinstance(shown.get(sid), dict)}
    if not features:
        st.dataframe(table, key=key, height=_ROW_PX * (len(table) + 1) + 3)
        if not texts:
            st.caption("Only ids: these samples were registered without thumbnails= or display= "
                       "(`run.register_samples(..., display=texts or a DataFrame of features)` shows them here).")  # fmt: skip
        return
    ref = shown.get(reference) if reference is not None else None
    ref = ref if isinstance(ref, dict) else None
    distance = feature_contrast(ref, features, data.query("feature_spread"))
    columns = list(distance.columns[:FEATURES_SHOWN])
    values = pd.DataFrame.from_dict(features, orient="index").reindex(columns=columns)
    values.index = distance.index = [f"#{sid}" for sid in values.index]
    values, distance = values.reindex(table.index), distance.reindex(table.index)
    if ref is not None:  # the reference's own values first, to read the others against
        first = pd.DataFrame([{c: ref.get(c) for c in columns}], index=[f"{short} #{reference}"])
        values = pd.concat([first, values])
        distance = pd.concat([pd.DataFrame(0.0, index=first.index, columns=columns), distance])
        table = pd.concat([pd.DataFrame([dict.fromkeys(table.columns, "")], index=first.index), table])
    styled = (
        pd.concat([table, values.astype(object)], axis=1)
        .style.format(lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v)))
        .apply(lambda col: [_shade(d) for d in distance[col.name]], subset=columns, axis=0)
    )
    n = len(next(iter(features.values())))
    against = f"{name} #{reference}" if ref is not None else "the listed samples' mean"
    st.caption(f"{len(columns)} of {n} features, those furthest from {md(against)} first; shaded: more than "
               "one standard deviation (over the training set) away, darker further")  # fmt: skip
    st.dataframe(styled, key=key, height=_ROW_PX * (len(values) + 1) + 3)


def display(shown: Any, *, key: str | None = None) -> None:
    """One sample's recorded text (plain, never markdown) or feature values (a one-row table); nothing when it
    has none."""
    if isinstance(shown, dict):
        st.dataframe(pd.DataFrame([shown]).astype(object), hide_index=True, key=key)
    elif shown is not None:
        st.text(shown)


def _shade(distance: float) -> str:
    if not distance >= 1.0:  # NaN included
        return ""
    return f"background-color: rgba(255, 140, 0, {min(distance / 3.0, 1.0) * 0.55:.2f})"


def bars(
    frame: pd.DataFrame,
    x: str,
    y: str,
    color: str,
    *,
    title: str,
    y_title: str,
    height: int = 300,
    colors: Callable[[str], str | None] = lambda name: None,
) -> go.Figure:
    """Grouped bars, one trace per value of `color` in order of appearance (`colors(name)`: its bar colour, None
    for the theme's next).  Built with graph_objects: plotly express costs ~10x more per figure, which showed in
    the time to switch test example."""
    traces = [
        go.Bar(x=group[x].tolist(), y=group[y].tolist(), name=name, marker_color=colors(name))
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


def _method_order(method: str) -> tuple[bool, str, float]:
    """The ground truth first, then estimators by name, partial-replay horizons in numeric order (5 before 20)."""
    name, _, horizon = method.partition(":")
    return (method != GROUND_TRUTH, name, float(horizon) if horizon.isdigit() else -1.0)


def method_colours(methods: list[str]) -> dict[str, str]:
    """A distinct bar colour per method, the ground truth near-black: a comparison shows up to 11 methods, past the
    theme's 10 colours, where the last one took the ground truth's."""
    estimators = [m for m in methods if m != GROUND_TRUTH]
    palette = [c for c in qualitative.Dark24 if c != "#222A2A"]  # its near-black would pass for the ground truth
    return {GROUND_TRUTH: "#262730", **dict(zip(estimators, itertools.cycle(palette), strict=False))}


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
        method=effects["method"].map(lambda m: GROUND_TRUTH if m == "replay" else chart_text(m)),
    ).sort_values("method", key=lambda col: col.map(_method_order), kind="stable")
    colours = method_colours(shown["method"].unique().tolist())
    fig = bars(
        shown, "stage", "value", "method", title=title, y_title=f"effect on {chart_text(behaviour)}", height=height,
        colors=colours.get,
    )  # fmt: skip
    if on_select is None:
        st.plotly_chart(fig, key=key)
    else:
        st.plotly_chart(fig, key=key, on_select=on_select, selection_mode="points")


def stage_method(analysis: dict[str, Any]) -> None:
    """What a stage analysis's effects are (replayed or estimated, by which method) and, when it is not verified
    against exact replay, a warning that says why."""
    method = analysis["method"]
    if method in ("replay", "compare"):
        how = "later stages replayed exactly" + (", estimators measured against it" if method == "compare" else "")
        st.caption(f"Stage analysis #{analysis['analysis_id']} · method {md(method)} · effect = f(final model) − "
                   f"f(model trained without the stage, {how})")  # fmt: skip
    else:
        st.caption(f"Stage analysis #{analysis['analysis_id']} · method {md(method)} · effect = f(final model) − "
                   f"f(the {md(method)} estimate of the model trained without the stage); nothing was replayed")  # fmt: skip
    if analysis["params"].get("verified") is False:
        st.warning(f"Not verified against exact replay: {md(analysis['params'].get('verified_reason'))}")
    deviation = analysis["params"].get("replay_deviation")
    if analysis["params"].get("replay_verified") and deviation:
        st.caption(f"Replay reproduced the recorded parameters within a relative difference of {deviation:.2g}, "
                   f"not bit for bit (tolerance {analysis['params'].get('replay_tolerance'):g}: this pipeline's "
                   f"kernels round differently from run to run)")  # fmt: skip
    for stage, names in (analysis["params"].get("replaced") or {}).items():
        st.caption(f"Stage {md(stage)} started from {md(', '.join(names))} as the loop replaced them (a new head?): "
                   f"every counterfactual keeps those values, so a stage's effect is what it trained")  # fmt: skip


def ledger_metrics() -> dict[str, Any]:
    """The ledger's entry count and latest signed tree size as two metrics; returns the signing facts."""
    signing = data.query("signing")
    cols = st.columns(2)
    cols[0].metric("ledger entries", signing["n_entries"])
    cols[1].metric("latest signed tree size", signing["tree_size"] or 0)
    return signing
