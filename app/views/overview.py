"""Overview: what was recorded — samples, stages on a timeline, checkpoints with validation loss."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from app.data import run_dir, store
from fgtrac_core.errors import FgtracError
from fgtrac_core.verify import verify_run


def render() -> None:
    s = store()
    summary = s.summary()
    st.title(f"Run {summary['name']}")
    st.caption(f"run id {summary['run_id']} · schema v{summary['schema_version']} · {summary['run_dir']}")
    if summary["snapshot_stale"]:
        st.warning("The live run is newer than this snapshot: recording is in progress or was interrupted.")
    cols = st.columns(5)
    for col, split in zip(cols[:3], ("train", "val", "test"), strict=True):
        col.metric(f"{split} samples", summary["samples"].get(split, 0))
    cols[3].metric("optimizer steps", summary["n_steps"])
    cols[4].metric("checkpoints", len(summary["checkpoints"]))

    st.subheader("Stages")
    stages = s.stages()
    st.dataframe(
        stages[
            [
                "name",
                "optimizer",
                "start_step",
                "end_step",
                "n_steps",
                "n_sample_uses",
                "lr_min",
                "lr_max",
                "status",
            ]
        ],
        hide_index=True,
    )
    batches = s.batches()
    if not batches.empty:
        fig = px.line(batches, x="step", y="lr", color="stage", title="Learning rate by step")
        fig.update_layout(height=280, margin={"t": 40, "b": 10})
        st.plotly_chart(fig, key="lr_chart")
        fig = px.scatter(batches, x="step", y="loss", color="stage", title="Batch loss by step", opacity=0.6)
        fig.update_layout(height=280, margin={"t": 40, "b": 10})
        st.plotly_chart(fig, key="loss_chart")

    st.subheader("Checkpoints")
    ckpts = s.checkpoints()
    with_val = ckpts.dropna(subset=["val_loss"])
    if not with_val.empty:
        fig = px.line(with_val, x="step", y="val_loss", color="stage", markers=True, title="Validation loss")
        fig.update_layout(height=260, margin={"t": 40, "b": 10})
        st.plotly_chart(fig, key="val_chart")
    st.dataframe(
        ckpts[["checkpoint_id", "step", "stage", "kind", "lr", "val_loss", "optimizer", "sha256", "path"]],
        hide_index=True,
    )
    _ledger_panel()

    transforms = s.transforms()
    if not transforms.empty:
        st.subheader("Preprocessing")
        st.dataframe(transforms[["transform_id", "name", "params", "n_samples"]], hide_index=True)


def _ledger_panel() -> None:
    """One click re-verifies the whole ledger; the result names the first failing table/row/field."""
    st.subheader("Ledger")
    if not st.button("Verify ledger", key="verify_ledger", type="primary"):
        st.caption(
            "Recomputes every entry from the tables, rebuilds chain and Merkle root, checks every signed tree "
            "head and re-hashes every checkpoint file."
        )
        return
    bar = st.progress(0.0, text="verifying")
    try:
        report = verify_run(run_dir(), progress=lambda frac, label: bar.progress(min(frac, 1.0), text=label))
    except FgtracError as exc:
        st.error(f"Cannot verify: {exc}")
        return
    bar.empty()
    if report.ok:
        st.success(f"Ledger intact — {report.n_entries} entries verified in {report.seconds:.2f} s")
    else:
        st.error(f"Ledger check failed: {report.first_failure}")
    pin = "pinned" if report.key_pinned else "not pinned: the run's own recorded key was used"
    st.caption(f"Signing key {report.key_fingerprint} ({pin})")
    st.dataframe(
        [
            {"check": c.name, "result": {True: "pass", False: "FAIL", None: "skipped"}[c.ok], "count": c.count,
             "ms": round(c.seconds * 1000, 1), "detail": c.detail}
            for c in report.checks
        ],
        hide_index=True,
    )  # fmt: skip
