"""Influence function of the last linear layer, with its exact Hessian (Koh & Liang 2017, restricted to the head).

Up-weighting training sample z by ε in the mean training loss moves the minimiser by dθ/dε = −H⁻¹ ∇ℓ(z), H the
Hessian of the mean training loss at θ.  Removing z is ε = −1/n, so the test loss changes by

    score(test, z) = (1/n) ∇ℓ(test)ᵀ (H + λI)⁻¹ ∇ℓ(z)

(first order; λ the damping).  Sign as everywhere in fgtrac: positive = proponent (removing z raises the test
loss).  Units: loss.

Only the head's parameters θ = (W, b) are treated as free (the body is held at the checkpoint), which makes H
exact and small: for cross-entropy over a linear head the loss is convex in θ and

    H = (1/n) Σ_i (diag(p_i) − p_i p_iᵀ) ⊗ ã_i ã_iᵀ,        ∇ℓ(z) = δ_z ⊗ ã_z,

with p the softmax, δ = p − onehot(y) the gradient at the logits and ã = (a, 1) the head's input with a 1 for
the bias (left out with `include_bias=False`).  For cross-entropy p is recovered from δ and the label; for
another per-sample loss ℓ(z, y) of the logits z (`loss_fn`, e.g. a label-smoothed cross-entropy) the
per-sample (C, C) block diag(p) − ppᵀ is ∇²_z ℓ instead, by torch.func (exact, not assumed convex: the damping
must then make H + λI positive definite, else a one-line error).  H is (C·(d+1))² for C classes and a
d-dimensional head input; it is formed by C² matmuls over the training set and solved once in float64 against the
test gradients.  For a model whose head is the whole model (logistic regression) this is the classical influence
function with an exact Hessian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, vmap

from fgtrac_core.errors import FgtracError
from fgtrac_core.influence.gradients import (
    Data,
    Features,
    LossFn,
    as_tensors,
    head_factors,
    head_gradients,
    linear_layer,
    per_sample_loss,
)
from fgtrac_core.influence.tracin import Review, _Checkpointed, _device, _Options, load_state_dict, review_of
from fgtrac_core.pipeline import load_into


def _extended(act: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([act, torch.ones(len(act), 1, dtype=act.dtype, device=act.device)], 1) if bias else act


def _cross_entropy_logit_hessians(delta: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(n, C, C) per-sample Hessians of cross-entropy over the logits, diag(p) − ppᵀ, from δ = p − onehot(y)."""
    p = delta + F.one_hot(labels, delta.shape[1]).to(delta.dtype)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def _logit_hessians(loss_fn: LossFn, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(n, C, C) per-sample Hessians ∇²_z ℓ(z, y) of a per-sample loss over the logits z, by torch.func."""

    def one(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(z[None], y[None]).reshape(())

    return vmap(hessian(one))(logits, labels)


def _head_hessian(s: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """(C·k, C·k) Hessian of the mean loss over the head's (class, input) coordinates, k = act width, from the
    per-sample Hessians `s` (n, C, C) of the loss over the logits."""
    n, c = s.shape[:2]
    k = act.shape[1]
    h = torch.empty(c, k, c, k, dtype=s.dtype, device=s.device)
    for i in range(c):
        for j in range(i, c):
            block = (act * s[:, i, j, None]).T @ act
            h[i, :, j, :] = block
            h[j, :, i, :] = block
    return h.reshape(c * k, c * k) / n


MODE = "influence_function"  # its name as a `fgtrac influence --mode`
MAX_HESSIAN_DIM = 16_384  # C·k above this: the float64 Hessian alone would pass 2 GiB


def require_positive_damping(damping: float) -> None:
    """The damping λ must be > 0: the softmax is unchanged by adding one value to every logit, so the head's
    cross-entropy Hessian is singular along that direction."""
    if not damping > 0:
        raise FgtracError(f"damping must be > 0 (the head's cross-entropy Hessian is singular), not {damping}")


@dataclass
class Whitened:
    """Head gradients whitened by the damped Hessian, L⁻¹ vec(δ ãᵀ) with H + λI = L Lᵀ (float64), so that
    score(test, z) = (1/n) f(test) · f(z): a dot product like TracIn's, which streams, ranks and normalises the
    same way.  `n` is the number of training samples the Hessian averages over; `rank_dtype` the model's dtype,
    in which `review` ranks (float32 halves the time of the dot products: 60k training × 10k test examples with
    a 1,290-parameter head took 17.7 s instead of 38 s here)."""

    test: torch.Tensor
    train: torch.Tensor
    n: int
    rank_dtype: torch.dtype

    def scores(self) -> torch.Tensor:
        """The (n_test, n_train) float64 score matrix."""
        return (self.test @ self.train.T) / self.n

    def review(self, k: int, *, cosine: bool = False, chunk_size: int = 8192, progress: bool = False) -> Review:
        """Top-k both ways (and by cosine in the whitened space), streamed over training chunks, and every
        sample's self-influence (1/n) ‖f(z)‖²: one term of weight 1/n."""
        features = [Features(dense=t.to(self.rank_dtype)) for t in (self.test, self.train)]
        opts = _Options(chunk_size=chunk_size, progress=progress)
        return review_of([_Checkpointed(1.0 / self.n, features)], opts, k, cosine)


def whitened_gradients(
    model: nn.Module,
    layer: str,
    train: Data,
    test: Data,
    checkpoint: Any,
    *,
    damping: float = 1e-3,
    include_bias: bool = True,
    device: str | torch.device | None = None,
    loss_fn: LossFn | None = None,
) -> Whitened:
    """Test and training gradients of the `layer` head at `checkpoint`, whitened by the head's damped Hessian of
    the mean training loss over `train` (float64; see `Whitened`), on `device` (default: CUDA when available, as
    `tracin`; the model is moved there).  `loss_fn(outputs, labels)` returns per-sample losses (default:
    cross-entropy).  The model's own parameters are restored."""
    require_positive_damping(damping)
    head = linear_layer(model, layer)
    bias = include_bias and head.bias is not None
    device = _device(device)
    model = model.to(device)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        load_into(model, load_state_dict(checkpoint), "the checkpoint")
        d_tr, a_tr = head_factors(model, layer, train, device=device, loss_fn=loss_fn)
        d_te, a_te = head_factors(model, layer, test, device=device, loss_fn=loss_fn)
        # copies: the parameters are restored in place below (and .double() of a float64 tensor is no copy)
        w = head.weight.detach().double().clone()
        b = None if head.bias is None else head.bias.detach().double().clone()
    finally:
        model.load_state_dict(original)
    dim = d_tr.shape[1] * (a_tr.shape[1] + bias)
    if dim > MAX_HESSIAN_DIM:
        raise FgtracError(
            f"the head {layer!r} has {dim} parameters: its Hessian is too large to form "
            f"(at most {MAX_HESSIAN_DIM}); use a TracIn mode (--mode last_layer)"
        )
    d_tr, a_tr, d_te, a_te = (t.double() for t in (d_tr, a_tr, d_te, a_te))
    labels = as_tensors(train, "train")[1].long().to(d_tr.device)
    if loss_fn is None and d_tr.shape[1] > 1:
        s = _cross_entropy_logit_hessians(d_tr, labels)
    else:  # the head's outputs rebuilt from its input: the logits the loss was taken at
        s = _logit_hessians(_on_head_outputs(per_sample_loss(loss_fn)), a_tr @ w.T + (0.0 if b is None else b), labels)
    a_tr, a_te = _extended(a_tr, bias), _extended(a_te, bias)
    h = _head_hessian(s, a_tr)
    h.diagonal().add_(damping)
    chol, info = torch.linalg.cholesky_ex(h)  # cross-entropy's is positive definite once damped
    if int(info):
        raise FgtracError(
            f"the head's loss Hessian plus damping {damping:g} is not positive definite (the loss is not convex in "
            f"the head there); raise --damping or use a TracIn mode (--mode last_layer)"
        )
    # vec(δ ãᵀ): the bias is the last input column, matching the Hessian's (class, input) layout
    out = [
        torch.linalg.solve_triangular(chol, head_gradients(d, a, bias=False).T, upper=False).T
        for d, a in ((d_te, a_te), (d_tr, a_tr))
    ]
    return Whitened(out[0], out[1], len(d_tr), next(model.parameters()).dtype)


def _on_head_outputs(loss: LossFn) -> LossFn:
    """`loss` taken on the head's outputs as if they were the model's; a one-line FgtracError where it cannot be
    (a model whose outputs are a structure, or more than its head's)."""

    def on_head(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        try:
            return loss(outputs, labels)
        except FgtracError:
            raise
        except Exception as e:  # the loop's own loss, on what it was not written for: any of its errors
            raise FgtracError(
                f"the training loss fails on the head's outputs ({type(e).__name__}: {str(e).splitlines()[0]}): the "
                f"influence function takes its Hessian in the head's outputs, so the model's outputs must be the "
                f"head's; use a TracIn mode (--mode last_layer)"
            ) from None

    return on_head


def influence_function(
    model: nn.Module,
    layer: str,
    train: Data,
    test: Data,
    checkpoint: Any,
    *,
    damping: float = 1e-3,
    include_bias: bool = True,
    device: str | torch.device | None = None,
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """(n_test, n_train) influence-function scores of the `layer` head at `checkpoint` (a path or state dict, as
    for `tracin`; usually the final one), float64.  Positive = proponent (removing the training sample raises
    the test loss, to first order).  `damping` λ > 0 is added to the Hessian's diagonal: it must be positive,
    since the softmax is unchanged by adding the same value to every logit, so H is singular along that
    direction."""
    return whitened_gradients(
        model, layer, train, test, checkpoint, damping=damping, include_bias=include_bias, device=device,
        loss_fn=loss_fn,
    ).scores()  # fmt: skip


def influence_function_review(
    model: nn.Module,
    layer: str,
    train: Data,
    test: Data,
    checkpoint: Any,
    *,
    k: int,
    cosine: bool = False,
    damping: float = 1e-3,
    include_bias: bool = True,
    chunk_size: int = 8192,
    device: str | torch.device | None = None,
    progress: bool = False,
    loss_fn: LossFn | None = None,
) -> Review:
    """`review` for the influence function: top-k proponents and opponents of every test example by raw score
    (and by cosine in the whitened space, when `cosine`), streamed over training chunks, and every sample's
    self-influence (1/n) ∇ℓ(z)ᵀ(H + λI)⁻¹∇ℓ(z).  One term, standing for the `checkpoint` it is evaluated at.
    The Hessian is formed and factored in float64; the whitened features are then ranked in the model's own
    dtype, as the TracIn modes are (`Whitened`)."""
    w = whitened_gradients(
        model, layer, train, test, checkpoint, damping=damping, include_bias=include_bias, device=device,
        loss_fn=loss_fn,
    )  # fmt: skip
    return w.review(k, cosine=cosine, chunk_size=chunk_size, progress=progress)
