"""Derivatives torch may not implement for a model, told apart from other failures.

Every operation torch ships has a first derivative, but not every one has a second (double backward: e.g.
``nn.EmbeddingBag``, cuDNN's RNNs) or a forward-mode one (``torch.func.jvp``).  A custom autograd function whose
backward is marked ``@once_differentiable`` is worse: torch runs that backward without a graph and raises
nothing, so a second derivative through it comes out as if the function were linear there
(`once_differentiable_functions` finds them in a loss's graph).  Methods that need one either fall back to first derivatives where that computes the same
quantity (`is_unsupported` tells when to), or refuse in one line naming the method, the operation and what runs
instead (`requires`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.autograd.function import once_differentiable

from fgtrac_core.errors import UnsupportedDerivativeError

SECOND_ORDER = "second derivatives of the training loss (Hessian-vector products)"

# torch's wording when a derivative of an operation is missing (NotImplementedError carries no other meaning there)
_MISSING = ("once_differentiable", "double backward", "forward ad", "not implemented", "not supported")
# every backward torch's decorator wraps runs the one code object of its inner wrapper (functools.wraps copies the
# name, so the name cannot tell)
_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx: None).__code__


def is_unsupported(exc: BaseException) -> bool:
    """Whether `exc`, raised by torch while differentiating, says a derivative is not implemented."""
    if isinstance(exc, NotImplementedError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _MISSING)


def reason(exc: BaseException) -> str:
    """The first line of torch's message (its links and advice to file an issue left out)."""
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def once_differentiable_functions(output: torch.Tensor) -> list[str]:
    """Names of the custom autograd functions in `output`'s graph whose backward is marked ``@once_differentiable``
    (sorted, each once)."""
    found, seen = set(), set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and getattr(cls.backward, "__code__", None) is _ONCE_DIFFERENTIABLE:
            found.add(cls.__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sorted(found)


def refuse_once_differentiable(output: torch.Tensor) -> None:
    """Raise NotImplementedError (turned into one line by `requires`) when `output`'s graph holds a function whose
    second derivative torch would silently take as zero."""
    if names := once_differentiable_functions(output):
        raise NotImplementedError(
            f"the backward of {', '.join(names)} is marked @once_differentiable, so torch takes no second "
            f"derivative through it"
        )


@contextmanager
def requires(derivative: str, method: str, instead: str) -> Iterator[None]:
    """Turn torch's missing-derivative errors raised in the block into one `UnsupportedDerivativeError`: "`method`
    needs `derivative`, which torch does not implement for this model (<torch's line>); `instead`"."""
    try:
        yield
    except (NotImplementedError, RuntimeError) as exc:
        if not is_unsupported(exc):
            raise
        raise UnsupportedDerivativeError(
            f"{method} needs {derivative}, which torch does not implement for this model ({reason(exc)}); {instead}"
        ) from None
