"""The targets training samples were trained on, per checkpoint: gradients at the labels training used.

A loop that logs ``targets=`` may train a sample on another target than its registered label (relabelled between
stages, label noise injected on purpose, a label-cleaning pass).  TracIn's term for training sample z at
checkpoint c is ∇ℓ(θ_c, (x_z, y_z)) with the target z was trained on then, not the one it was registered with:
from checkpoint c, the target of z's last use before `bounds[c]` (the end of the steps c stands for), else of its
first use; a use without a recorded target trained on the registered label.  Samples never trained on another
target keep their registered label, so a run without relabellings gets its registered labels back unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fgtrac_core.store import RunStore


def trained_targets(
    store: RunStore, train_ids: np.ndarray, labels: torch.Tensor, bounds: Sequence[int]
) -> torch.Tensor:
    """`labels` (the registered labels of `train_ids`, in that order) when no use trained a sample on another
    target, else an (n_checkpoints, n_train) int64 tensor: row c holds each sample's target as of step `bounds[c]`
    (exclusive; see the module docstring)."""
    uses = store.df(
        """WITH relabelled AS (
               SELECT DISTINCT bs.sample_id FROM batch_samples bs JOIN samples s USING (sample_id)
               WHERE bs.target IS NOT NULL AND bs.target IS DISTINCT FROM s.label)
           SELECT bs.sample_id, b.step, coalesce(bs.target, s.label) AS target
           FROM batch_samples bs JOIN relabelled USING (sample_id) JOIN batches b USING (batch_id)
                JOIN samples s USING (sample_id)
           ORDER BY bs.sample_id, b.step, b.batch_id, bs.position"""
    )
    if uses.empty:
        return labels
    sid = uses["sample_id"].to_numpy(np.int64)
    step = uses["step"].to_numpy(np.int64)
    target = uses["target"].to_numpy(np.int64)
    order = np.argsort(train_ids, kind="stable")
    pos = np.searchsorted(train_ids, sid, sorter=order)
    known = pos < len(train_ids)
    known[known] = train_ids[order[pos[known]]] == sid[known]
    sid, step, target = sid[known], step[known], target[known]  # uses of samples outside `train_ids` drop out
    out = labels.to(torch.int64).repeat(len(bounds), 1)
    if len(sid) == 0:
        return out
    samples, first = np.unique(sid, return_index=True)
    columns = order[np.searchsorted(train_ids, samples, sorter=order)]
    # one sorted key per use, (sample rank, step): the last use before a bound is a searchsorted away
    base = min(int(step.min()), *map(int, bounds))
    span = max(int(step.max()), *map(int, bounds)) - base + 2
    rank = np.searchsorted(samples, sid)
    keys = rank * span + (step - base)
    for c, bound in enumerate(bounds):
        last = np.searchsorted(keys, np.arange(len(samples)) * span + (int(bound) - base), side="left") - 1
        last = np.where(last < first, first, last)  # no use before the bound: the first use's target
        out[c, torch.from_numpy(columns)] = torch.from_numpy(target[last])
    return out
