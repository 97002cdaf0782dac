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
the bias (left out with `include_bias=False`).  p is recovered from δ and the label, so only the default
cross-entropy loss is supported.  H is (C·(d+1))² for C classes and a d-dimensional head input; it is formed
by C² matmuls over the training set and solved once in float64 against the test gradients.  For a model whose
head is the whole model (logistic regression) this is the classical influence function with an exact Hessian.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fgtrac_core.errors import FgtracError
from fgtrac_core.influence.gradients import Data, as_tensors, head_factors, head_gradients
from fgtrac_core.influence.tracin import load_state_dict


def _extended(act: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([act, torch.ones(len(act), 1, dtype=act.dtype, device=act.device)], 1) if bias else act


def _head_hessian(delta: torch.Tensor, act: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(C·k, C·k) Hessian of the mean cross-entropy over the head's (class, input) coordinates, k = act width."""
    n, c = delta.shape
    p = delta + F.one_hot(labels, c).to(delta.dtype)  # softmax: δ = p − onehot(y) under cross-entropy
    s = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, C, C)
    k = act.shape[1]
    h = torch.empty(c, k, c, k, dtype=delta.dtype, device=delta.device)
    for i in range(c):
        for j in range(i, c):
            block = (act * s[:, i, j, None]).T @ act
            h[i, :, j, :] = block
            h[j, :, i, :] = block
    return h.reshape(c * k, c * k) / n


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
) -> torch.Tensor:
    """(n_test, n_train) influence-function scores of the `layer` head at `checkpoint` (a path or state dict, as
    for `tracin`; usually the final one), float64.  Positive = proponent (removing the training sample raises
    the test loss, to first order).  `damping` λ > 0 is added to the Hessian's diagonal: it must be positive,
    since the softmax is unchanged by adding the same value to every logit, so H is singular along that
    direction."""
    if not damping > 0:
        raise FgtracError(f"damping must be > 0 (the head's cross-entropy Hessian is singular), not {damping}")
    model.load_state_dict(load_state_dict(checkpoint))
    d_tr, a_tr = head_factors(model, layer, train, device=device)
    d_te, a_te = head_factors(model, layer, test, device=device)
    d_tr, a_tr, d_te, a_te = (t.double() for t in (d_tr, a_tr, d_te, a_te))
    a_tr, a_te = _extended(a_tr, include_bias), _extended(a_te, include_bias)
    h = _head_hessian(d_tr, a_tr, as_tensors(train, "train")[1].long().to(d_tr.device))
    h.diagonal().add_(damping)
    # vec(δ ãᵀ): the bias is the last input column, matching the Hessian's (class, input) layout
    g_te, g_tr = head_gradients(d_te, a_te, bias=False), head_gradients(d_tr, a_tr, bias=False)
    solved = torch.linalg.solve(h, g_te.T)  # (C·k, n_test); positive definite once damped
    return (solved.T @ g_tr.T) / len(g_tr)
