"""A model's inputs when they are several tensors: token ids and an attention mask, numeric and categorical
features, an image and its metadata.

A pipeline's ``inputs(config, sample_ids)`` may return one tensor, a tuple or list of tensors (the model's
positional arguments) or a mapping of them (its keyword arguments), each with one row per sample.  Analyses hold
several as one `Inputs`, which they index, split, clone and move along the batch dimension as they would one
tensor (torch.func maps over it: it is a pytree), and the models `Pipeline.model` builds carry the forward
pre-hook `unpack_inputs`, so that ``model(inputs)`` calls ``model(*args, **kwargs)`` as the training loop did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fgtrac_core.batched import split, take
from fgtrac_core.errors import FgtracError


class Inputs:
    """Positional `args` and keyword `kwargs` tensors of a batch, each with the batch along its first dimension."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args: Sequence[torch.Tensor] = (), kwargs: Mapping[str, torch.Tensor] | None = None) -> None:
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})

    @classmethod
    def of(cls, value: Any) -> torch.Tensor | Inputs:
        """`value` (an inputs loader's result) as one tensor or `Inputs`; a one-line FgtracError for anything
        else."""
        if isinstance(value, torch.Tensor | Inputs):
            return value
        if isinstance(value, tuple | list):
            out = cls(value)
        elif isinstance(value, Mapping):
            out = cls(kwargs=value)
        else:
            raise FgtracError(
                f"the pipeline's inputs loader returned a {type(value).__name__}, not a torch.Tensor (or a tuple, "
                f"list or dict of them: the model's positional or keyword arguments)"
            )
        bad = [type(t).__name__ for t in out.tensors() if not isinstance(t, torch.Tensor)]
        if bad or not out.tensors():
            raise FgtracError(
                f"the pipeline's inputs loader returned a {type(value).__name__} holding "
                f"{'a ' + bad[0] if bad else 'nothing'}; each of the model's inputs must be a torch.Tensor"
            )
        return out

    def tensors(self) -> list[torch.Tensor]:
        return [*self.args, *self.kwargs.values()]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
        return Inputs([fn(t) for t in self.args], {k: fn(t) for k, t in self.kwargs.items()})

    def __len__(self) -> int:
        return len(self.tensors()[0])

    def __getitem__(self, index: Any) -> Inputs:
        return take(self, index)

    def split(self, sizes: Sequence[int]) -> list[Inputs]:
        return split(self, sizes)

    def clone(self) -> Inputs:
        return self._map(torch.Tensor.clone)

    def unsqueeze(self, dim: int) -> Inputs:
        return self._map(lambda t: t.unsqueeze(dim))

    def to(self, *args: Any, **kwargs: Any) -> Inputs:
        """Every tensor moved as ``Tensor.to`` would; a dtype applies to the floating-point ones only (token ids
        stay integers)."""
        dtype = kwargs.pop("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
        device = kwargs.pop("device", next((a for a in args if isinstance(a, str | torch.device)), None))

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None, **kwargs)

        return self._map(move)

    def __repr__(self) -> str:
        shapes = [tuple(t.shape) for t in self.args] + [f"{k}={tuple(t.shape)}" for k, t in self.kwargs.items()]
        return f"Inputs({', '.join(map(str, shapes))})"


def _flatten(inputs: Inputs) -> tuple[list[torch.Tensor], tuple[int, tuple[str, ...]]]:
    return inputs.tensors(), (len(inputs.args), tuple(inputs.kwargs))


def _unflatten(values: Any, context: tuple[int, tuple[str, ...]]) -> Inputs:
    values, (n_args, keys) = list(values), context
    return Inputs(values[:n_args], dict(zip(keys, values[n_args:], strict=True)))


pytree.register_pytree_node(Inputs, _flatten, _unflatten, serialized_type_name="fgtrac_core.inputs.Inputs")


def unpack_inputs(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook (``with_kwargs=True``): a call with one `Inputs` becomes a call with its arguments."""
    if len(args) == 1 and isinstance(args[0], Inputs):
        return args[0].args, {**args[0].kwargs, **kwargs}
    return None
