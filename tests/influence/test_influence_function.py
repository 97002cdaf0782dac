"""The last-layer influence function against brute force: the Hessian of the mean training loss over the head's
parameters by autograd, per-sample gradients by autograd, and the solve done independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fgtrac_core.errors import FgtracError
from fgtrac_core.influence import influence_function, influence_function_review
from fgtrac_core.influence.influence_function import MAX_HESSIAN_DIM
from tests.influence._nets import HeadNet


def _data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], dict]:
    torch.manual_seed(0)
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    model = HeadNet().double()
    return (x[:22], y[:22]), (x[22:], y[22:]), {k: v.clone() for k, v in model.state_dict().items()}


def _brute_force(
    state: dict, train: tuple, test: tuple, damping: float, bias: bool, against: tuple | None = None, loss=F.cross_entropy
) -> np.ndarray:
    """(1/n) g(test)ᵀ (H + λI)⁻¹ g(z) for z in `against` (default: the training set), H over the training set,
    the batch `loss` (mean over its samples) of the training set, g the gradient of each sample's loss alone."""
    model = HeadNet().double()
    model.load_state_dict(state)
    w0, b0 = model.head.weight.detach(), model.head.bias.detach()
    feats = lambda x: model.body(x).detach()  # noqa: E731

    def params_to_loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = flat[: w0.numel()].reshape(w0.shape)
        b = flat[w0.numel() :] if bias else b0
        return loss(feats(x) @ w.T + b, y)

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

    g_te, g_z = grads(test), grads(train if against is None else against)
    return (g_te @ torch.linalg.inv(hess) @ g_z.T / len(train[0])).numpy()


@pytest.mark.parametrize(("damping", "bias"), [(1e-3, True), (1e-2, True), (0.1, False)])
def test_equals_brute_force_autograd(damping: float, bias: bool) -> None:
    train, test, state = _data()
    got = influence_function(
        HeadNet().double(), "head", train, test, state, damping=damping, include_bias=bias
    )
    want = _brute_force(state, train, test, damping, bias)
    assert got.shape == (8, 22)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-9 * np.abs(want).max())


def _smoothed(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, labels, label_smoothing=0.2)


def test_a_loops_own_loss_equals_brute_force_autograd() -> None:
    """Label-smoothed cross-entropy: the Hessian over the logits by torch.func, not the softmax's closed form."""
    train, test, state = _data()
    per_sample = lambda o, t: F.cross_entropy(o, t, label_smoothing=0.2, reduction="none")  # noqa: E731
    got = influence_function(HeadNet().double(), "head", train, test, state, damping=1e-3, loss_fn=per_sample)
    want = _brute_force(state, train, test, 1e-3, True, loss=_smoothed)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-9 * np.abs(want).max())
    plain = influence_function(HeadNet().double(), "head", train, test, state, damping=1e-3)
    assert not np.allclose(plain.numpy(), want, rtol=1e-3)  # the loss made a difference


def test_a_hessian_the_damping_leaves_indefinite_is_refused() -> None:
    train, test, state = _data()
    concave = lambda o, t: -F.cross_entropy(o, t, reduction="none")  # noqa: E731
    with pytest.raises(FgtracError, match="not positive definite .* raise --damping"):
        influence_function(HeadNet().double(), "head", train, test, state, damping=1e-3, loss_fn=concave)


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


def test_the_review_streams_the_brute_force_scores() -> None:
    """Top-k both ways, self-influence and the whitened cosine of `influence_function_review` (streamed over
    small training chunks) against the brute-force matrix: (1/n) g_t(H+λI)^-1 g_z, its diagonal for z = t."""
    train, test, state = _data()
    rev = influence_function_review(
        HeadNet().double(), "head", train, test, state, k=4, cosine=True, damping=1e-2, chunk_size=5
    )
    want = _brute_force(state, train, test, 1e-2, True)
    order = np.argsort(-want, axis=1, kind="stable")
    np.testing.assert_array_equal(rev.top.proponent_indices.numpy(), order[:, :4])
    np.testing.assert_allclose(
        rev.top.proponent_scores.numpy(), np.take_along_axis(want, order[:, :4], 1), rtol=1e-6
    )
    np.testing.assert_array_equal(rev.top.opponent_indices.numpy(), order[:, ::-1][:, :4])
    self_tr = np.diag(_brute_force(state, train, train, 1e-2, True))
    self_te = np.diag(_brute_force(state, train, test, 1e-2, True, against=test))
    np.testing.assert_allclose(rev.self_influence.numpy(), self_tr, rtol=1e-6)
    cosine = want / np.sqrt(self_te[:, None] * self_tr[None, :])
    assert np.abs(cosine).max() <= 1 + 1e-9
    top_cos = np.argsort(-cosine, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(rev.top_cosine.proponent_indices.numpy(), top_cos)
    np.testing.assert_allclose(
        rev.top_cosine.proponent_scores.numpy(), np.take_along_axis(cosine, top_cos, 1), rtol=1e-6
    )


def test_a_head_too_large_for_its_hessian_is_refused() -> None:
    x, y = torch.randn(6, 5), torch.randint(0, 10, (6,))
    model = HeadNet(hidden=MAX_HESSIAN_DIM // 10, n_out=10)
    with pytest.raises(FgtracError, match=r"Hessian is too large.*--mode last_layer"):
        influence_function(model, "head", (x, y), (x, y), model.state_dict())
