"""Missing derivatives told apart from other failures, with torch's own errors (not hand-made ones)."""

from __future__ import annotations

import pytest
import torch

from fgtrac_core.derivatives import SECOND_ORDER, is_unsupported, requires
from fgtrac_core.errors import UnsupportedDerivativeError


def _double_backward(fn: object, x: torch.Tensor) -> None:
    (g,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)  # type: ignore[operator]
    torch.autograd.grad(g.sum(), x)


def test_a_missing_double_backward_is_one_line() -> None:
    bag = torch.nn.EmbeddingBag(3, 2, mode="sum")
    rows = torch.arange(3).expand(1, 3)
    with pytest.raises(UnsupportedDerivativeError) as err, requires(SECOND_ORDER, "method M", "try N"):
        _double_backward(lambda w: bag(rows, per_sample_weights=torch.ones(1, 3)), bag.weight)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("method M needs second derivatives of the training loss")
    assert message.endswith("(the derivative for '_embedding_bag_backward' is not implemented); try N")


def test_other_failures_pass_through() -> None:
    with pytest.raises(RuntimeError, match="does not require grad") as err, requires(SECOND_ORDER, "M", "N"):
        torch.autograd.grad(torch.ones(2).sum(), torch.ones(2))
    assert not is_unsupported(err.value)
    with pytest.raises(ValueError), requires(SECOND_ORDER, "method M", "try N"):
        raise ValueError("not a derivative")
