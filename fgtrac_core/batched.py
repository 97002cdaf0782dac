"""Structures of tensors that share a batch dimension — a model's several inputs (`fgtrac_core.inputs`), its
structured outputs (`fgtrac_core.outputs`) — indexed and split along it, every tensor alike (other values are
kept as they are)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree


def take(batch: Any, index: Any) -> Any:
    """`batch` with every tensor in it indexed along its first dimension (None adds a batch dimension of one, as
    ``tensor[None]``)."""
    if isinstance(batch, torch.Tensor):
        return batch[index]
    return pytree.tree_map(lambda v: v[index] if isinstance(v, torch.Tensor) else v, batch)


def split(batch: Any, sizes: Sequence[int]) -> list[Any]:
    """`batch` split along the batch dimension into consecutive parts of `sizes` (as `Tensor.split`)."""
    if isinstance(batch, torch.Tensor):
        return list(batch.split(list(sizes)))
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return [take(batch, slice(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
