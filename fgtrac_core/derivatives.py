"""Derivatives torch may not implement for a model, told apart from other failures.

Every operation torch ships has a first derivative, but not every one has a second (double backward: e.g.
``nn.EmbeddingBag``, cuDNN's RNNs, custom functions marked ``once_differentiable``) or a forward-mode one
(``torch.func.jvp``).  Methods that need one either fall back to first derivatives where that computes the same
quantity (`is_unsupported` tells when to), or refuse in one line naming the method, the operation and what runs
instead (`requires`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fgtrac_core.errors import UnsupportedDerivativeError

SECOND_ORDER = "second derivatives of the training loss (Hessian-vector products)"

# torch's wording when a derivative of an operation is missing (NotImplementedError carries no other meaning there)
_MISSING = ("once_differentiable", "double backward", "forward ad", "not implemented", "not supported")


def is_unsupported(exc: BaseException) -> bool:
    """Whether `exc`, raised by torch while differentiating, says a derivative is not implemented."""
    if isinstance(exc, NotImplementedError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _MISSING)


def reason(exc: BaseException) -> str:
    """The first line of torch's message (its links and advice to file an issue left out)."""
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


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
