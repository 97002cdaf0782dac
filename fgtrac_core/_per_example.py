"""Per-example values by torch.func (gradients; losses), for models and losses vmap cannot batch too.

`vmap` batches one example's function over many, but cannot trace Python control flow that depends on tensor
values (``if x[0, 0] > 0:`` picking a head, a per-example early exit), nor run every operation batched (``nn.GRU``
and ``nn.LSTM`` write their hidden state in place, which fails under vmap with a shape error); such examples are
then taken one call each, eagerly: the same values, slower.  A function that fails eagerly too raises that error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import vmap
from torch.utils import _pytree as pytree

from fgtrac_core.batched import take

Params = dict[str, torch.Tensor]


def _map_examples(fn: Callable[..., Any], args: Sequence[Any], in_dims: Sequence[int | None], stack: Callable) -> Any:
    """``vmap(fn, in_dims)(*args)``, or `stack` of one eager call per example where vmap cannot run `fn`."""
    try:
        return vmap(fn, in_dims=tuple(in_dims))(*args)
    except (RuntimeError, NotImplementedError):
        # vmap's own failures are not told apart from `fn`'s by their type (a GRU's is a plain shape error): the
        # eager calls either compute the same values or raise `fn`'s error themselves
        mapped = [leaf for a, d in zip(args, in_dims, strict=True) if d is not None for leaf in pytree.tree_leaves(a)]
        n = min((len(leaf) for leaf in mapped if isinstance(leaf, torch.Tensor)), default=0)
        if not n:
            raise
    return stack([fn(*(a if d is None else take(a, i) for a, d in zip(args, in_dims, strict=True))) for i in range(n)])


def per_example(
    grad_fn: Callable[[Params, torch.Tensor, torch.Tensor], Params], params: Params, x: torch.Tensor, y: torch.Tensor
) -> Params:
    """`grad_fn(params, x[i], y[i])` for every example i, stacked along a new first dimension per parameter."""

    def stack(rows: list[Params]) -> Params:
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    return _map_examples(grad_fn, (params, x, y), (None, 0, 0), stack)


def per_example_losses(loss: Callable[[Any, torch.Tensor], torch.Tensor], outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """(n,) `loss` of each example alone: ``loss(outputs[i:i+1], targets[i:i+1])`` (a batch loss, e.g. a
    label-smoothed cross-entropy, taken per sample); structured outputs (a tuple, a dict) are sliced tensor by
    tensor (`fgtrac_core.batched.take`)."""

    def one(o: Any, t: torch.Tensor) -> torch.Tensor:
        return loss(take(o, None), t[None]).reshape(())

    return _map_examples(one, (outputs, targets), (0, 0), torch.stack)
