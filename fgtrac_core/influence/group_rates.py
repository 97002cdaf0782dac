"""Each scored parameter's learning rate at a checkpoint relative to a reference parameter's, where a loop put
them in param groups of different rates (discriminative rates, an optimizer over some parameters only, a frozen
body: 0 for a parameter the optimizer did not hold or that was frozen).

TracIn's term for checkpoint c is Σ_p η_c,p g_test,p · g_train,p.  The checkpoint is weighed by one rate η_c —
the first param group's (`checkpoints.lr`) in `full` mode, the head weight's (`head_rates`) in `last_layer` mode —
and each parameter's share is then scaled by η_c,p / η_c, read from the checkpoint's optimizer state: its
`param_groups` rates and, in fgtrac checkpoints, the names of the parameters each group held
(``optimizer_params``) and of those frozen (``frozen``).  Checkpoints without those names keep one rate for all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def rate_ratios(
    optimizer_state: Mapping[str, Any] | None, names: Sequence[str], reference: str | None = None
) -> dict[str, float] | None:
    """{name: η_p / η_reference} for the named parameters, where η_reference is the rate of the group holding
    `reference` (the first group's when None); None when every ratio is 1, when the checkpoint does not say which
    group held which parameter, or when the reference rate is 0 (the checkpoint is weighed by 0 anyway).  A
    parameter the optimizer did not hold, or that the checkpoint lists as frozen, gets 0."""
    if not optimizer_state or optimizer_state.get("optimizer_params") is None:
        return None
    groups = optimizer_state.get("param_groups") or []
    held = optimizer_state["optimizer_params"]
    if not groups or len(groups) != len(held):
        return None
    frozen = set(optimizer_state.get("frozen") or ())
    rate = {n: float(g["lr"]) for g, group_names in zip(groups, held, strict=True) for n in group_names if n}
    ref = float(groups[0]["lr"]) if reference is None else rate.get(reference, 0.0)
    if not ref:
        return None
    ratios = {n: 0.0 if n in frozen else rate.get(n, 0.0) / ref for n in names}
    return None if all(r == 1.0 for r in ratios.values()) else ratios


def folded(rates: Sequence[float]) -> tuple[float, list[float] | None]:
    """(η, per parameter √(η_p / η)) for the rates a step applied to the scored parameters, η the largest: the
    weight η Σ_p (√(η_p/η) g_p)·(√(η_p/η) g'_p) = Σ_p η_p g_p·g'_p with one scalar weight.  None for the roots
    when every rate is η (or η is 0: the step moved none of them)."""
    eta = max(rates)
    if not eta or all(r == eta for r in rates):
        return eta, None
    return eta, [math.sqrt(r / eta) for r in rates]
