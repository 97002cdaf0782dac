"""The last-layer influence function against brute force: the Hessian of the mean training loss over the head's
parameters by autograd, per-sample gradients by autograd, and the solve done independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fgtrac_core.errors import FgtracError
from fgtrac_core.influence import influence_function
from tests.influence._nets import HeadNet


def _data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], dict]:
    torch.manual_seed(0)
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    model = HeadNet().double()
    return (x[:22], y[:22]), (x[22:], y[22:]), {k: v.clone() for k, v in model.state_dict().items()}


def _brute_force(state: dict, train: tuple, test: tuple, damping: float, bias: bool) -> np.ndarray:
    model = HeadNet().double()
    model.load_state_dict(state)
    w0, b0 = model.head.weight.detach(), model.head.bias.detach()
    feats = lambda x: model.body(x).detach()  # noqa: E731

    def params_to_loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = flat[: w0.numel()].reshape(w0.shape)
        b = flat[w0.numel() :] if bias else b0
        return F.cross_entropy(feats(x) @ w.T + b, y)

    flat = torch.cat([w0.flatten(), b0]) if bias else w0.flatten().clone()
    hess = torch.autograd.functional.hessian(lambda f: params_to_loss(f, *train), flat)
    hess += damping * torch.eye(len(flat), dtype=torch.float64)

    def grads(data: tuple) -> torch.Tensor:
        rows = []
        for xi, yi in zip(*data, strict=True):
            f = flat.clone().requires_grad_()
            (g,) = torch.autograd.grad(params_to_loss(f, xi[None], yi[None]), f)
            rows.append(g)
        return torch.stack(rows)

    g_te, g_tr = grads(test), grads(train)
    return (g_te @ torch.linalg.inv(hess) @ g_tr.T / len(g_tr)).numpy()


@pytest.mark.parametrize(("damping", "bias"), [(1e-3, True), (1e-2, True), (0.1, False)])
def test_equals_brute_force_autograd(damping: float, bias: bool) -> None:
    train, test, state = _data()
    got = influence_function(HeadNet().double(), "head", train, test, state, damping=damping, include_bias=bias)
    want = _brute_force(state, train, test, damping, bias)
    assert got.shape == (8, 22)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-9 * np.abs(want).max())


def test_sign_a_copy_of_a_test_example_is_its_proponent() -> None:
    """A training sample identical to the test example (same input, same label) supports it: positive score,
    the largest in its row."""
    train, test, state = _data()
    test = (train[0][:4].clone(), train[1][:4].clone())
    got = influence_function(HeadNet().double(), "head", train, test, state)
    assert (got.diagonal()[:4] > 0).all()
    assert (got.argmax(1) == torch.arange(4)).all()


def test_bad_damping_is_refused() -> None:
    train, test, state = _data()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(FgtracError, match="damping must be > 0"):
            influence_function(HeadNet().double(), "head", train, test, state, damping=bad)
