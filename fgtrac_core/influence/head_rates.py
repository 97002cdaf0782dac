"""The learning rate each recorded step applied to the scored head layer, where it is not the first group's.

`batches.lr` and `checkpoints.lr` record the first param group's rate.  A loop that trains the head at another
rate than the body (discriminative rates: the head in a group of its own), or not at all in some stage (an
optimizer over other parameters, a frozen head), applied another rate to the head than that column says, and
TracIn's η_t / η_c must be the head's when it scores the head's gradients.  The rate comes from the recorded
per-step hyperparameters (`optimizer_steps.hparams`, every group's applied values) and the stage start
checkpoint's `optimizer_params` (which group held the head) and `frozen` lists.  Runs recorded before those
lists, and stages whose first group holds the head, keep the recorded column.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from fgtrac_core.checkpoint_files import load_checkpoint_payload
from fgtrac_core.store.run_files import committed_checkpoints
from fgtrac_core.tracking.optimizer_hooks import expand_hparams


def head_rates(store: Any, layer: str) -> dict[int, float]:
    """{step: the rate it applied to `layer`'s weight} for the steps where that differs from the first group's
    (0.0 where the step did not move the head); empty in the usual case (one group, or the head in the first)."""
    weight = f"{layer}.weight"
    committed = committed_checkpoints(store)
    starts = store.df(
        """SELECT c.stage_id, min(c.checkpoint_id) AS checkpoint_id FROM checkpoints c
           WHERE c.kind = 'stage_start' GROUP BY c.stage_id"""
    )
    out: dict[int, float] = {}
    for stage_id, checkpoint_id in zip(starts["stage_id"], starts["checkpoint_id"], strict=True):
        payload = load_checkpoint_payload(store.layout, committed[int(checkpoint_id)])
        held = payload.get("optimizer_params")
        if held is None:  # recorded before checkpoints named the optimizer's parameters
            continue
        group = next((g for g, names in enumerate(held) if weight in names), None)
        moved = group is not None and weight not in (payload.get("frozen") or ())
        if moved and group == 0:  # the first group's rate: the recorded columns are the head's
            continue
        steps = store.df(
            "SELECT step, hparams FROM optimizer_steps WHERE stage_id = ? ORDER BY step", [int(stage_id)]
        )
        for step, groups in zip(steps["step"], expand_hparams(steps["hparams"].tolist()), strict=True):
            out[int(step)] = float(groups[group]["lr"]) if moved else 0.0  # type: ignore[index]
    return out


def checkpoint_head_rate(store: Any, checkpoint: dict[str, Any], rates: dict[int, float]) -> float:
    """The head's rate for a chosen checkpoint: that of the last step of its stage before it (the one that
    produced its parameters), or of the stage's first step for a checkpoint taken before any; the recorded `lr`
    when those steps applied the first group's rate to the head."""
    if not rates:
        return float(checkpoint["lr"])
    row = store.df(
        """SELECT coalesce(max(o.step) FILTER (WHERE o.step < c.step), min(o.step)) AS step
           FROM checkpoints c JOIN optimizer_steps o USING (stage_id) WHERE c.checkpoint_id = ?""",
        [int(checkpoint["checkpoint_id"])],
    )
    step = row["step"].iloc[0] if len(row) else None
    if step is None or pd.isna(step):  # a checkpoint outside every stage, or of a stage without steps
        return float(checkpoint["lr"])
    return rates.get(int(step), float(checkpoint["lr"]))
