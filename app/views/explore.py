"""Explore (the main page): one test example, the training samples that pushed its prediction either way, and the
training stages accountable for it.

Every selection is bound to the URL, so a view can be shared by copying the address: `test`, `view` (raw |
cosine), `top`, `tab` (`Stage+effects`, `Per-checkpoint+contributions`), `proponent`, `behaviour`, and the
filters `cls`, `wrong`, `conf` and `browse`.  Explore is the default page: `http://HOST/?test=123&view=cosine`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st

from app import data
from app.ui import (
    EFFECT_MEANING,
    bars,
    chart_text,
    display,
    label_text,
    list_caption,
    md,
    plural,
    sample_grid,
    stage_bars,
    stage_method,
)

TOP_CHOICES = (5, 10, 20, 50)
# tab labels are their URL values (`?tab=Stage+effects`)
TABS = ["Proponents and opponents", "Stage effects", "Per-checkpoint contributions"]


def _pick_test(tests: pd.DataFrame) -> pd.Series:
    """Filters (class, misclassified, confidence) and the test-example picker; stops when nothing matches."""
    asked = st.query_params.get("test")  # as the URL gave it, before the bound picker replaces an unknown id
    c1, c2, c3 = st.columns([1, 1, 2])
    classes = sorted(int(c) for c in tests["label"].dropna().unique())
    cls = c1.selectbox(
        "Class", classes, index=None, placeholder="all classes", key="cls", bind="query-params"
    )
    wrong = c2.checkbox("Misclassified only", key="wrong", bind="query-params")
    conf = c3.slider("Confidence", 0.0, 1.0, (0.0, 1.0), step=0.05, key="conf", bind="query-params")
    shown = tests
    if cls is not None:
        shown = shown[shown["label"] == cls]
    if wrong:
        shown = shown[shown["misclassified"]]
    shown = shown[shown["confidence"].between(conf[0], conf[1])]
    if shown.empty:
        st.info("No test example matches these filters.")
        st.stop()
    by_id = shown.set_index("sample_id")
    ids = [int(i) for i in by_id.index]
    if asked is not None and asked.isdigit() and int(asked) not in by_id.index:
        _not_shown(int(asked), tests, ids[0])
    # plain ids as options: a bound widget writes its displayed option text into the URL
    test_id = st.selectbox(
        f"Test example id ({len(shown)} of {len(tests)} match; type to search)",
        ids,
        key="test",
        bind="query-params",
        filter_mode="prefix",  # ids are searched by their leading digits
    )
    # the table only when asked for: with thousands of test examples it is most of what the browser has to draw
    if st.toggle("Browse the matching test examples", key="browse", bind="query-params"):
        st.dataframe(
            shown,
            hide_index=True,
            height=240,
            key="test_table",
            on_select=functools.partial(_test_row_picked, ids),
            selection_mode="single-row",
        )
    return by_id.loc[test_id].rename(test_id)


def _not_shown(sample_id: int, tests: pd.DataFrame, instead: int) -> None:
    """Say why the example a shared URL names is not the one shown (rather than silently showing another)."""
    if sample_id in set(tests["sample_id"]):
        st.warning(f"Test example #{sample_id} does not match the filters above; showing #{instead}.")
        return
    st.warning(
        f"Sample #{sample_id} is not a test example of this influence analysis; showing #{instead}. A training "
        f"sample's uses and influence are on its lifecycle page."
    )
    st.page_link(data.LIFECYCLE, label=f"Open the lifecycle of #{sample_id}", query_params={"sample": str(sample_id)})


def _test_row_picked(ids: list[int]) -> None:
    """A row picked in the browse table becomes the selected test example (and so the URL's `?test=`)."""
    rows = st.session_state["test_table"]["selection"]["rows"]
    if rows:
        st.session_state["test"] = ids[rows[0]]


def _show_test(test: pd.Series) -> None:
    test_id = int(test.name)
    thumb = data.thumbnails([test_id]).get(test_id)
    left, right = (st.columns([1, 4]) if thumb is not None else (None, st.container()))
    if thumb is not None:
        left.image(thumb, width=160)
    right.subheader(f"Test example #{test_id}")
    cols = right.columns(4)
    cols[0].metric("recorded label", int(test["label"]))
    cols[1].metric("prediction", int(test["prediction"]), delta="wrong" if test["misclassified"] else "right",
                   delta_color="inverse" if test["misclassified"] else "normal", delta_arrow="off")  # fmt: skip
    cols[2].metric("confidence", f"{test['confidence']:.1%}")
    cols[3].metric("loss", f"{test['loss']:.3f}")
    if thumb is None:
        display(data.query("displays", [test_id]).get(test_id))


def _facts(view: str) -> Callable[[Any], dict[str, str]]:
    def facts(row: Any) -> dict[str, str]:
        value = f"{row.score:+.3g}" if view == "raw" else f"{row.cosine:+.2f}"
        return {"label": label_text(row), "score" if view == "raw" else "cos": value}

    return facts


def _contributions(proponents: pd.DataFrame, analysis: dict[str, Any]) -> None:
    """How much each influence checkpoint added to one proponent's raw score."""
    if proponents.empty:
        st.caption("no proponents stored for this example")
        return
    if analysis["params"].get("mode") == "influence_function":
        st.caption("The influence function has one term, at the final checkpoint (the whole run's effect through "
                   "the head's Hessian): there is nothing to split over checkpoints.")  # fmt: skip
        return
    ids = [int(i) for i in proponents["train_id"]]
    pick = st.selectbox("Proponent id", ids, key="proponent", bind="query-params")
    row = proponents[proponents["train_id"] == pick].iloc[0]
    ckpts = analysis["checkpoints"]
    intervals = [c.get("interval") for c in ckpts]
    frame = pd.DataFrame(
        {
            "checkpoint": [chart_text(f"#{c['checkpoint_id']} step {c['step']}") for c in ckpts],
            "stage": [chart_text(c["stage"]) for c in ckpts],
            "contribution": json.loads(row["contributions"]),
        }
    )
    title = f"#{pick}: raw score {row['score']:+.4g} split over the influence checkpoints"
    fig = bars(frame, "checkpoint", "contribution", "stage", title=title, y_title="contribution", height=300)
    if all(intervals):  # the run recorded its batches: label each term with the uses behind it
        uses = data.query("uses_in_steps", pick, [(i["first_step"], i["last_step"]) for i in intervals])
        by_checkpoint = dict(zip(frame["checkpoint"], uses, strict=True))
        for trace in fig.data:
            trace.text = [plural(by_checkpoint[x], "use") for x in trace.x]
        if analysis["params"].get("weighting") == "usage":
            st.caption(f"Usage weighting: each checkpoint's term counts #{pick}'s uses in the steps that checkpoint "
                       "stands for (bar labels); a checkpoint whose steps never used it adds exactly 0.")  # fmt: skip
        else:
            st.caption(f"Checkpoint weighting: every checkpoint scores #{pick} at its learning rate, used in its "
                       "steps or not (bar labels: its uses there), by gradient similarity at that checkpoint.")  # fmt: skip
    st.plotly_chart(fig, key="contrib_chart")


def _stage_panel(test_id: int) -> None:
    analysis = data.stage_analysis()
    if analysis is None:
        data.no_stages()
        return
    stage_method(analysis)
    effects = data.query("stage_effects", analysis["analysis_id"], test_id)
    if effects.empty:
        st.info(f"The stage analysis (#{analysis['analysis_id']}) did not cover test example #{test_id}.")
        return
    behaviours = sorted(effects["behaviour"].unique(), key=lambda b: (b != "loss", b))
    behaviour = st.selectbox("Behaviour", behaviours, key="behaviour", bind="query-params", width=240)
    stage_bars(effects[effects["behaviour"] == behaviour], behaviour, key="stage_bars",
               title=f"Stage effects on test example #{test_id}")  # fmt: skip
    st.caption(
        f"Effect = f(final model) − f(model trained without the stage); {EFFECT_MEANING.get(behaviour, '')}."
    )


def render() -> None:
    analysis = data.influence()
    mark = data.mark()
    aid = analysis["analysis_id"]
    st.title("Explore")
    weighting = analysis["params"].get("weighting")
    st.caption(f"Influence analysis #{aid} · {md(analysis['method'])} · "
               f"{plural(len(analysis['checkpoints']), 'checkpoint')}{f' · {md(weighting)} weighting' if weighting else ''} · "
               "positive score = proponent")  # fmt: skip
    measured = analysis["params"].get("check")
    if measured:
        st.badge(f"measured on this run: LDS {measured['lds']:.2f} ({measured['replays']} replays)",
                 icon=":material/verified:", color="blue")  # fmt: skip
    tests = data.query("influence_tests", aid)
    test = _pick_test(tests)
    test_id = int(test.name)
    _show_test(test)

    c1, c2 = st.columns(2)
    view = c1.segmented_control("Ranking (raw score or normalised cosine)", ["raw", "cosine"], default="raw",
                                required=True, key="view", bind="query-params")  # fmt: skip
    k = int(analysis["params"].get("k", max(TOP_CHOICES)))
    choices = [n for n in TOP_CHOICES if n <= k] or [k]
    top = c2.segmented_control("Show top", choices, default=min(10, choices[-1]), required=True, key="top",
                               bind="query-params")  # fmt: skip
    ranked = data.query("influence_topk", aid, test_id, view, mark)
    ranked = ranked[ranked["rank"] <= top]
    proponents = ranked[ranked["direction"] == "proponent"]
    opponents = ranked[ranked["direction"] == "opponent"]
    # Charts only when their tab is open (tabs bound to the URL run lazily): Plotly's script is most of the
    # browser's work on a first visit, and the proponent and opponent images should not wait for it.
    samples, stages, checkpoints = st.tabs(TABS, key="tab", bind="query-params")
    if samples.open:
        with samples:
            left, right = st.columns(2, gap="large")
            with left:
                st.subheader("Proponents")
                st.caption(list_caption("lowered this example's loss", mark, proponents))
                sample_grid(proponents, "train_id", _facts(view), key="open_proponent", reference=test_id)
            with right:
                st.subheader("Opponents")
                st.caption(list_caption("raised this example's loss", mark, opponents))
                sample_grid(opponents, "train_id", _facts(view), key="open_opponent", reference=test_id)
    if stages.open:
        with stages:
            _stage_panel(test_id)
    if checkpoints.open:
        with checkpoints:
            _contributions(proponents, analysis)


render()
