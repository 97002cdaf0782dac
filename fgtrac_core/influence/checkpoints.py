"""Which checkpoints TracInCP sums over (FG-Trac selects those where validation loss improved substantially)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SelectedCheckpoint:
    """One checkpoint chosen for influence, with the reason it was chosen."""

    index: int
    reason: str


def select_checkpoints(
    val_losses: Sequence[float | None],
    rule: str | Sequence[int] = "auto",
    *,
    tau: float = 0.05,
    stages: Sequence[object] | None = None,
) -> list[SelectedCheckpoint]:
    """Choose checkpoints (indices into `val_losses`, in training order).

    `rule="auto"` (FG-Trac): walking forward, a checkpoint with a validation loss is chosen when that loss is at
    least `tau` (relative) below the best loss seen so far — ``v <= best * (1 - tau)``; the first checkpoint
    with a validation loss is always chosen (nothing to improve on), and so is the final checkpoint.
    Checkpoints without a validation loss are never chosen by `auto`, except the final one.  With `stages` (one
    label per checkpoint), the best loss restarts at every stage: a stage trains on other data or another
    objective (a fine-tune on noisy labels may never beat the pre-training loss), and TracIn should still see it.
    `rule="all"` chooses every checkpoint; a sequence of indices chooses exactly those.
    """
    n = len(val_losses)
    if n == 0:
        raise ValueError("no checkpoints to choose from")
    if not isinstance(rule, str):
        chosen = sorted(set(int(i) for i in rule))
        if any(i < 0 or i >= n for i in chosen):
            raise ValueError(f"checkpoint indices must be in 0..{n - 1}")
        return [SelectedCheckpoint(i, "listed") for i in chosen]
    if rule == "all":
        return [SelectedCheckpoint(i, "all") for i in range(n)]
    if rule != "auto":
        raise ValueError(f"checkpoint rule must be 'auto', 'all' or a list of indices, not {rule!r}")
    if not 0 <= tau < 1:
        raise ValueError("tau must be in [0, 1)")
    out: list[SelectedCheckpoint] = []
    if stages is not None and len(stages) != n:
        raise ValueError("one stage label per checkpoint")
    best = math.inf
    for i, v in enumerate(val_losses):
        if stages is not None and i and stages[i] != stages[i - 1]:
            best = math.inf
        if v is None or not math.isfinite(v):
            continue
        if best == math.inf:
            first = "first validation loss" + (" of its stage" if stages is not None else "")
            out.append(SelectedCheckpoint(i, f"{first} {v:.4g}"))
        elif v <= best * (1 - tau):
            out.append(
                SelectedCheckpoint(
                    i, f"validation loss {v:.4g} is {100 * (1 - v / best):.1f}% below the best {best:.4g}"
                )
            )
        best = min(best, v)
    if not out or out[-1].index != n - 1:
        out.append(SelectedCheckpoint(n - 1, "final checkpoint"))
    return out
