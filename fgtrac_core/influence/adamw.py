"""Optimizer-aware weighting of gradients for checkpoints trained with Adam/AdamW (after arXiv 2605.18814).

Under SGD a training gradient g moves the parameters by −η g, so TracIn scores with η g_test·g.  Under Adam(W)
the same gradient moves them, through the first moment, by −η κ P g with the preconditioner
P = diag(1/(√v̂ + ε)) from the recorded second moment (bias-corrected, v̂ = v / (1 − β2^t)), frozen over the
short window in which the momentum delivers the gradient, and

    κ = Σ_{j=0..J} (1 − β1) β1^j / (1 − β1^(t+1+j)) · (1 − η λ)^(J − j)

the parameter displacement J steps after the gradient's step, per unit of η P g: the gradient enters the first
moment with weight (1 − β1), reaches the update j steps later scaled by β1^j and by that step's bias correction,
and every displacement then shrinks by the decoupled decay (1 − η λ) per later step.  J is the number of steps
until the momentum has delivered 99.9% of the gradient (β1^(J+1) ≤ 10⁻³).  Coupled (L2) decay, Adam's
`weight_decay`, adds λθ to the gradient before it reaches the moments, and so does not change the direction a
training sample's gradient contributes: κ then has no decay factor.  The sensitivity of v to g is left out — the
frozen-preconditioner choice.  It is first order in the sample's gradient (δv = 2(1 − β2) g_batch ⊙ g / B), and
arXiv 2605.18814 keeps it: in (near) full-batch Adam, where updates are close to sign(g), it cancels much of the
momentum path, so this checkpoint-level form gains least there (bench/faithfulness.py measures it).

So for an Adam(W) checkpoint the score is η κ g_testᵀ P g_train = η κ (P^½ g_test)·(P^½ g_train), and the sign
convention is TracIn's: positive = proponent (the update lowers the test loss).  A checkpoint without Adam state
keeps the SGD form (κ = 1, P = I).

Parameters in different param groups (the common recipe: no weight decay on biases; or another rate, betas or
step count) each get their own η κ: the score is Σ_p η_p κ_p g_test,pᵀ P_p g_train,p, still one weighted dot
product, by scaling each parameter's √P by √(η_p κ_p / η κ) relative to the first scored parameter's η κ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fgtrac_core.errors import FgtracError

_DELIVERED = 1e-3  # momentum tail left undelivered at the horizon J

WEIGHED_OPTIMIZERS = ("SGD", "Adam", "AdamW")
"""The optimizers whose checkpoints `adam_state` weighs: Adam and AdamW by their moments, SGD in its own form."""

_SGD_STATE = {"step", "momentum_buffer"}


@dataclass(frozen=True)
class AdamState:
    """What the optimizer-aware score needs from one checkpoint: κ of the first named parameter, and √P per named
    parameter (a parameter of another param group scaled by √(η_p κ_p / η κ): its own rate and κ)."""

    kappa: float
    sqrt_precond: dict[str, torch.Tensor]


def momentum_factor(beta1: float, step: int, lr: float, decoupled_decay: float) -> float:
    """κ: displacement per unit η P g, J steps after the gradient's step (see module docstring)."""
    if not 0 <= beta1 < 1:
        raise FgtracError(f"beta1 must be in [0, 1), not {beta1}")
    horizon = 0 if beta1 == 0 else math.ceil(math.log(_DELIVERED) / math.log(beta1)) - 1
    shrink = 1.0 - lr * decoupled_decay
    return sum(
        (1 - beta1) * beta1**j / (1 - beta1 ** (step + 1 + j)) * shrink ** (horizon - j)
        for j in range(horizon + 1)
    )


def adam_state(
    model: nn.Module, optimizer_state: Mapping[str, Any] | None, lr: float, names: list[str]
) -> AdamState | None:
    """κ and √P for the named parameters from an Adam/AdamW `optimizer.state_dict()`; None when the state holds
    no second moments (an SGD checkpoint keeps the SGD form).  `lr` is the rate applied to the first named
    parameter; a parameter in another group gets that rate times the ratio of the groups' rates in the state.

    The optimizer's parameters are matched to the model's by the names the checkpoint recorded
    (``optimizer_params``: fgtrac checkpoints have them, so optimizers over some parameters or in groups of their
    own order work), else to `model.named_parameters()` in order, as when it was built with `model.parameters()`.
    """
    if not optimizer_state or not optimizer_state.get("state"):
        return None
    state, groups = optimizer_state["state"], optimizer_state.get("param_groups", [])
    if not any("exp_avg_sq" in s for s in state.values()):
        other = sorted({k for s in state.values() for k in s} - _SGD_STATE)
        if other:  # RMSprop's square_avg, Adagrad's sum...: not SGD, whose form would be scored as adamw's
            raise FgtracError(
                f"the checkpoint's optimizer state holds {', '.join(other)}, neither Adam's moments nor SGD's: "
                f"adamw mode weighs {', '.join(WEIGHED_OPTIMIZERS)} checkpoints only"
            )
        return None
    if any("momentum_decay" in g or "amsgrad" not in g for g in groups):  # NAdam, RAdam: Adam's moments, not its step
        raise FgtracError(
            f"the checkpoint's optimizer keeps Adam's moments but is not Adam or AdamW (no 'amsgrad' option, or "
            f"NAdam's 'momentum_decay'): adamw mode weighs {', '.join(WEIGHED_OPTIMIZERS)} checkpoints only"
        )
    order = [i for g in groups for i in g["params"]]
    held = optimizer_state.get("optimizer_params")
    if held is not None:
        index_of = dict(zip([n for g in held for n in g], order, strict=True))
    else:
        named = list(model.named_parameters())
        if len(order) != len(named):
            raise FgtracError(
                f"the optimizer state covers {len(order)} parameters but the model has {len(named)}, and the "
                f"checkpoint does not say which (fgtrac checkpoints do: 'optimizer_params'); adamw mode then needs "
                f"an optimizer built over model.parameters()"
            )
        index_of = {name: i for (name, _), i in zip(named, order, strict=True)}
    group_of = {i: g for g in groups for i in g["params"]}
    sqrt_precond: dict[str, torch.Tensor] = {}
    factors: dict[str, tuple[float, float]] = {}  # (η_p, κ_p) of each named parameter
    ref_group = None
    for name in names:
        if name not in index_of:
            raise FgtracError(f"the checkpoint's optimizer did not hold {name!r}, so it has no second moment for it")
        i = index_of[name]
        s, g = state.get(i) or state.get(str(i)), group_of[i]
        if s is None or "exp_avg_sq" not in s:
            raise FgtracError(f"the optimizer state holds no second moment for {name!r}")
        beta1, beta2 = g["betas"]
        t = int(float(s["step"]))
        v_hat = s["exp_avg_sq"].double() / (1 - beta2**t)
        sqrt_precond[name] = (v_hat.sqrt() + g["eps"]).rsqrt().float()
        if "decoupled_weight_decay" not in g:
            raise FgtracError(
                "the optimizer state does not say whether its weight decay is decoupled (torch >= 2.6)"
            )
        if g.get("amsgrad"):
            raise FgtracError("adamw mode does not support amsgrad")
        ref_group = g if ref_group is None else ref_group
        rate = lr * _rate_ratio(g, ref_group)
        decoupled = float(g["weight_decay"]) if g["decoupled_weight_decay"] else 0.0
        factors[name] = rate, momentum_factor(beta1, t, rate, decoupled)
    kappa = factors[names[0]][1]
    reference = lr * kappa
    for name in names[1:]:
        rate, k = factors[name]
        if reference and rate * k != reference:  # another group: its own η κ, relative to the first parameter's
            sqrt_precond[name] = sqrt_precond[name] * math.sqrt(rate * k / reference)
    return AdamState(kappa, sqrt_precond)


def _rate_ratio(group: Mapping[str, Any], reference: Mapping[str, Any]) -> float:
    """A param group's learning rate relative to the reference group's, as the checkpoint's optimizer held them
    (the rate passed to `adam_state` is the reference group's: the first scored parameter's)."""
    if group is reference:
        return 1.0
    ref = float(reference["lr"])
    return float(group["lr"]) / ref if ref else 0.0
