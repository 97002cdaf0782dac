"""Overview: what was recorded — samples, stages on a timeline, checkpoints with validation loss (the ones chosen
for influence marked), the analysed model's accuracy and the ledger's signing key."""

from __future__ import annotations

import json

import streamlit as st

from app import data
from app.ui import chart_text, ledger_metrics, lines, md


def _headline(summary: dict, influence: dict | None) -> None:
    cols = st.columns(6)
    for col, split in zip(cols[:3], ("train", "val", "test"), strict=True):
        col.metric(f"{split} samples", summary["samples"].get(split, 0))
    cols[3].metric("optimizer steps", summary["n_steps"])
    cols[4].metric("checkpoints", len(summary["checkpoints"]))
    if influence is None:
        cols[5].metric(
            "test accuracy", "—", help="stored with an influence analysis (`fgtrac influence RUN`)"
        )
    else:
        acc = data.query("influence_accuracy", influence["analysis_id"])
        cols[5].metric("test accuracy", f"{acc['accuracy']:.1%}" if acc["accuracy"] is not None else "—",
                       help=f"final model, {acc['n_misclassified']} of {acc['n_test']} test examples misclassified")  # fmt: skip


def _stages() -> None:
    st.subheader("Stages")
    stages = data.query("stages")
    if stages.empty:
        st.caption("no stages recorded yet")
        return
    cols = [
        "name",
        "optimizer",
        "start_step",
        "end_step",
        "n_steps",
        "n_batches",  # more than n_steps: the loop accumulated gradients over several batches per step
        "n_sample_uses",
        "lr_min",
        "lr_max",
        "precision",  # full, or the torch.autocast its training forwards ran under
        "status",
    ]
    st.dataframe(stages[cols], hide_index=True)
    batches = data.query("batches")
    if batches.empty:
        return
    batches["stage"] = batches["stage"].map(chart_text)
    st.plotly_chart(lines(batches, "step", "lr", "stage", title="Learning rate by step"), key="lr_chart")
    fig = lines(batches, "step", "loss", "stage", title="Batch loss by step", mode="markers")
    st.plotly_chart(fig.update_traces(opacity=0.6), key="loss_chart")


def _checkpoints(influence: dict | None) -> None:
    st.subheader("Checkpoints")
    ckpts = data.query("checkpoints")
    if ckpts.empty:
        st.caption("no checkpoints recorded yet")
        return
    chosen = {c["checkpoint_id"]: c["reason"] for c in (influence or {}).get("checkpoints", [])}
    ckpts["influence"] = ckpts["checkpoint_id"].map(lambda i: f"✓ {chosen[i]}" if i in chosen else "")
    ckpts["val_accuracy"] = ckpts["metrics"].map(lambda m: json.loads(m).get("val_accuracy"))
    with_val = ckpts.dropna(subset=["val_loss"]).assign(stage=lambda d: d["stage"].map(chart_text))
    if not with_val.empty:
        fig = lines(with_val, "step", "val_loss", "stage", title="Validation loss (◆ used for influence)",
                    mode="lines+markers")  # fmt: skip
        used = with_val[with_val["checkpoint_id"].isin(chosen)]
        fig.add_scatter(x=used["step"].tolist(), y=used["val_loss"].tolist(), mode="markers",
                        name="used for influence", marker={"symbol": "diamond", "size": 12, "color": "black"})  # fmt: skip
        fig.update_layout(height=280, margin={"t": 40, "b": 10})
        st.plotly_chart(fig, key="val_chart")
    if chosen:
        st.caption(f"{len(chosen)} checkpoints chosen for influence analysis #{influence['analysis_id']} "
                   f"(rule: {md(influence['params'].get('checkpoint_rule', ''))})")  # fmt: skip
    st.dataframe(
        ckpts[["checkpoint_id", "step", "stage", "kind", "lr", "val_loss", "val_accuracy", "influence", "sha256",
               "path"]],
        hide_index=True,
    )  # fmt: skip


def _ledger() -> None:
    st.subheader("Ledger")
    signing = ledger_metrics()
    st.caption("public key fingerprint of the signer (compare with `fgtrac key export`)")
    st.text(signing["signer_fingerprint"] or "none recorded")
    st.page_link("views/audit.py", label="Verify the whole ledger on the Audit page")


def render() -> None:
    summary = data.query("summary")
    st.title(f"Run {md(summary['name'])}", anchor=False)  # an anchor would carry the name into a link
    st.caption(
        f"run id {md(summary['run_id'])} · schema v{summary['schema_version']} · {md(summary['run_dir'])}"
    )
    if not summary["samples"]:
        data.show_command("Nothing recorded in this run yet. Record one with `fgtrac_core.tracking.Run`, or build "
                          "the sample run:", "fgtrac demo --no-app --out {run}-demo")  # fmt: skip
    influence = data.query("latest_analysis", "influence")
    _headline(summary, influence)
    _stages()
    _checkpoints(influence)
    _ledger()
    transforms = data.query("transforms")
    if not transforms.empty:
        st.subheader("Preprocessing")
        st.dataframe(transforms[["transform_id", "name", "params", "n_samples"]], hide_index=True)


render()
