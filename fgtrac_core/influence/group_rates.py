"""Each scored parameter's learning rate at a checkpoint relative to the first param group's, for `full` mode.

`full` mode weighs checkpoint c by η_c, the first param group's rate (the recorded `checkpoints.lr`).  A loop
with discriminative rates (the body at a tenth of the head's), an optimizer over some parameters only, or a
frozen body applied other rates to other parameters: 0 to a parameter the optimizer did not hold or that was
frozen.  TracIn's term for checkpoint c is then Σ_p η_c,p g_test,p · g_train,p, which this module turns into
per-parameter multipliers √(η_c,p / η_c) on both sides' gradients, read from the checkpoint's optimizer state:
its `param_groups` rates and, in fgtrac checkpoints, the names of the parameters each group held
(``optimizer_params``) and of those frozen (``frozen``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def rate_scales(optimizer_state: Mapping[str, Any] | None, names: Sequence[str]) -> dict[str, torch.Tensor] | None:
    """{name: √(η_p / η_first group)} for the named parameters, or None when every one is 1 or the checkpoint does
    not say which group held which parameter (no ``optimizer_params``: the first group's rate for all, as before).
    A parameter the optimizer did not hold, or that the checkpoint lists as frozen, gets 0."""
    if not optimizer_state or optimizer_state.get("optimizer_params") is None:
        return None
    groups = optimizer_state.get("param_groups") or []
    held = optimizer_state["optimizer_params"]
    if not groups or len(groups) != len(held):
        return None
    first = float(groups[0]["lr"])
    frozen = set(optimizer_state.get("frozen") or ())
    rate = {n: float(g["lr"]) for g, group_names in zip(groups, held, strict=True) for n in group_names if n}
    ratios = {
        n: 0.0 if n in frozen or n not in rate else (rate[n] / first if first else 1.0) for n in names
    }
    if all(r == 1.0 for r in ratios.values()):
        return None
    return {n: torch.tensor(math.sqrt(r)) for n, r in ratios.items()}
