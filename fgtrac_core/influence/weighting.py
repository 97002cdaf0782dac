"""Usage-aware TracInCP weights: each checkpoint's term for a training sample counts that sample's actual uses.

TracIn's idealised form (Pruthi et al. 2020, eq. 1) sums, over the steps t at which z was in the batch,
η_t ∇ℓ(test, θ_t)·∇ℓ(z, θ_t) — with the mean loss over a batch B_t, the step's gradient of z carries η_t/|B_t|.
TracInCP replaces θ_t by a few checkpoints.  With one weight η_c per checkpoint (Captum's convention, `checkpoint`
weighting) every training sample gets the same weight from every checkpoint, whether or not it was used in the
steps that checkpoint stands for; usage weighting instead gives z, from checkpoint c,

    W[z, c] = Σ_{t ∈ I_c, z ∈ B_t} η_t / |B_t|

(counted with multiplicity: a sample twice in a batch counts twice), so

    score(test, z) = Σ_c W[z, c] ∇ℓ(θ_c, test)·∇ℓ(θ_c, z)

and a sample unused in I_c gets exactly 0 from c.  η_t is the rate step t applied (`batches.lr`, the first param
group's, or the scored head's where another group held it: `rates`, `head_rates`), |B_t| the number of samples of all batches recorded for step t (under gradient accumulation the step's
micro-batches together; assumes the loop averages the loss over them), and batches of steps that never ran
(NULL lr) are left out.

The interval I_c: chosen checkpoints are taken in training order, and the steps of each stage are split among
that stage's chosen checkpoints (a checkpoint's stage is the one it was recorded in; of checkpoints sharing a
step the first is kept, so a stage's end belongs to that stage).  Checkpoint step s holds the parameters before
the update of step s, so checkpoint c (step s_c) stands for the steps t of its stage with s_prev ≤ t < s_c,
where s_prev is the step of the previous chosen checkpoint of the same stage (none: from the stage's first
step) — the updates that produced θ_c, as the learning rate recorded with a checkpoint is the one that produced
it.  The last chosen checkpoint of a stage also stands for the stage's steps after it.  Steps of a stage with no
chosen checkpoint are represented by none (counted in `uncovered_steps`).  If some chosen checkpoint has no
stage, stages are ignored and the same rule runs over all steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fgtrac_core.errors import FgtracError

WEIGHTINGS = ("usage", "checkpoint")
_LO, _HI = -(1 << 62), 1 << 62


@dataclass
class UsageWeights:
    """The (n_train, n_checkpoints) usage weights W and use counts, with each checkpoint's interval."""

    matrix: torch.Tensor  # float64: W[z, c] = Σ η_t/|B_t| over z's uses in I_c
    uses: np.ndarray  # int64: number of z's uses in I_c
    intervals: list[dict[str, Any]]  # per checkpoint: first_step, last_step, n_steps, n_uses (None when empty)
    uncovered_steps: int  # recorded steps that no chosen checkpoint stands for


def checkpoint_intervals(
    steps: Sequence[int], stages: Sequence[Any] | None
) -> list[tuple[Any, int, int]]:
    """(stage, lo, hi) per chosen checkpoint (training order): it stands for the steps t of `stage` with
    lo ≤ t < hi (see the module docstring).  `stages` None (or any None in it): stages are ignored."""
    n = len(steps)
    if stages is None or any(s is None for s in stages):
        stages = [None] * n
    if any(b < a for a, b in zip(steps, steps[1:], strict=False)):
        raise FgtracError("checkpoints must be given in training order for usage weighting")
    out = []
    for i in range(n):
        same = [j for j in range(n) if stages[j] == stages[i]]
        pos = same.index(i)
        lo = int(steps[same[pos - 1]]) if pos > 0 else _LO
        hi = int(steps[i]) if pos < len(same) - 1 else _HI
        out.append((stages[i], lo, hi))
    return out


def run_intervals(store: Any, checkpoint_ids: Sequence[int]) -> list[tuple[Any, int, int]]:
    """`checkpoint_intervals` of a recorded run's checkpoints `checkpoint_ids` (training order)."""
    ck = store.df(
        "SELECT checkpoint_id, step, stage_id FROM checkpoints WHERE list_contains(?, checkpoint_id)",
        [[int(i) for i in checkpoint_ids]],
    ).set_index("checkpoint_id")
    missing = [int(i) for i in checkpoint_ids if int(i) not in ck.index]
    if missing:
        raise FgtracError(f"no checkpoint {missing[0]} in this run")
    ck = ck.loc[[int(i) for i in checkpoint_ids]]
    stage_ids = [None if v != v or v is None else int(v) for v in ck["stage_id"]]
    return checkpoint_intervals([int(s) for s in ck["step"]], stage_ids)


def usage_weights(
    store: Any, train_ids: np.ndarray, checkpoint_ids: Sequence[int], rates: dict[int, float] | None = None
) -> UsageWeights:
    """Usage weights of a recorded run (`RunStore`) for the training samples `train_ids` (rows, in this order)
    and the chosen checkpoints `checkpoint_ids` (columns, in training order): one GROUP BY over batch_samples ⋈
    batches, scattered into a dense matrix.  `rates` ({step: rate}, `head_rates`) replaces η_t at the steps
    that applied another rate to the scored head than the first group's."""
    iv = run_intervals(store, checkpoint_ids)
    cols = list(range(len(iv)))
    params = [
        cols,
        [s for s, _, _ in iv],
        [lo for _, lo, _ in iv],
        [hi for _, _, hi in iv],
    ]
    rates = rates or {}
    intervals_sql = """iv AS (SELECT unnest(?::INTEGER[]) AS col, unnest(?::INTEGER[]) AS stage_id,
                                     unnest(?::BIGINT[]) AS lo, unnest(?::BIGINT[]) AS hi)"""
    rates_sql = "r AS (SELECT unnest(?::BIGINT[]) AS step, unnest(?::DOUBLE[]) AS rate)"
    match = "(iv.stage_id IS NULL OR iv.stage_id = b.stage_id) AND b.step >= iv.lo AND b.step < iv.hi"
    per_sample = store.df(
        f"""WITH {intervals_sql}, {rates_sql},
                 sizes AS (SELECT step, sum(n_samples) AS n FROM batches WHERE lr IS NOT NULL GROUP BY step)
            SELECT bs.sample_id, iv.col, sum(coalesce(r.rate, b.lr) / sizes.n) AS weight, count(*) AS uses
            FROM batch_samples bs JOIN batches b USING (batch_id) JOIN sizes USING (step) JOIN iv ON {match}
                 LEFT JOIN r ON r.step = b.step
            GROUP BY bs.sample_id, iv.col""",
        [*params, list(rates), list(rates.values())],
    )
    per_ckpt = store.df(
        f"""WITH {intervals_sql}
            SELECT iv.col, min(b.step) AS first_step, max(b.step) AS last_step,
                   count(DISTINCT b.step) AS n_steps, sum(b.n_samples) AS n_uses
            FROM batches b JOIN iv ON {match} WHERE b.lr IS NOT NULL GROUP BY iv.col""",
        params,
    ).set_index("col")
    n_steps = int(store.df("SELECT count(DISTINCT step) AS n FROM batches WHERE lr IS NOT NULL")["n"].iloc[0])
    train_ids = np.asarray(train_ids, dtype=np.int64)
    order = np.argsort(train_ids, kind="stable")
    sid = per_sample["sample_id"].to_numpy(np.int64)
    pos = np.searchsorted(train_ids[order], sid).clip(0, max(len(train_ids) - 1, 0))
    known = train_ids[order][pos] == sid if len(train_ids) else np.zeros(len(sid), bool)
    rows = order[pos[known]]
    col = per_sample["col"].to_numpy(np.int64)[known]
    matrix = np.zeros((len(train_ids), len(iv)))
    uses = np.zeros((len(train_ids), len(iv)), np.int64)
    matrix[rows, col] = per_sample["weight"].to_numpy(np.float64)[known]
    uses[rows, col] = per_sample["uses"].to_numpy(np.int64)[known]
    intervals = []
    for c in cols:
        if c in per_ckpt.index:
            r = per_ckpt.loc[c]
            intervals.append(
                {k: int(r[k]) for k in ("first_step", "last_step", "n_steps", "n_uses")}
            )
        else:
            intervals.append({"first_step": None, "last_step": None, "n_steps": 0, "n_uses": 0})
    covered = sum(i["n_steps"] for i in intervals)
    return UsageWeights(torch.from_numpy(matrix), uses, intervals, n_steps - covered)


def has_batch_records(store: Any) -> bool:
    """Whether the run recorded which samples its steps used (usage weighting's default)."""
    return bool(
        store.df("SELECT count(*) AS n FROM (SELECT 1 FROM batch_samples LIMIT 1)")["n"].iloc[0]
    )
