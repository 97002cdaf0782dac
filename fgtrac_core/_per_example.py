"""Per-example values by torch.func (gradients; losses), for models and losses that branch on their input too.

`vmap` batches one example's gradient function over many, but cannot trace Python control flow that depends on
tensor values (``if x[0, 0] > 0:`` picking a head, a per-example early exit); such a model's examples are then
taken one call each, eagerly: the same values, slower.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import vmap

Params = dict[str, torch.Tensor]


def per_example(
    grad_fn: Callable[[Params, torch.Tensor, torch.Tensor], Params], params: Params, x: torch.Tensor, y: torch.Tensor
) -> Params:
    """`grad_fn(params, x[i], y[i])` for every example i, stacked along a new first dimension per parameter."""
    try:
        return vmap(grad_fn, in_dims=(None, 0, 0))(params, x, y)
    except RuntimeError as exc:
        if "data-dependent control flow" not in str(exc) or not len(x):
            raise
    rows = [grad_fn(params, xi, yi) for xi, yi in zip(x, y, strict=True)]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def per_example_losses(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], outputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """(n,) `loss` of each example alone: ``loss(outputs[i:i+1], targets[i:i+1])`` (a batch loss, e.g. a
    label-smoothed cross-entropy, taken per sample)."""

    def one(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return loss(o[None], t[None]).reshape(())

    try:
        return vmap(one)(outputs, targets)
    except RuntimeError as exc:
        if "data-dependent control flow" not in str(exc) or not len(outputs):
            raise
    return torch.stack([one(o, t) for o, t in zip(outputs, targets, strict=True)])
