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

The other two optimizers torch keeps a per-parameter second moment for are weighed the same way, each by its own
update (torch's), the preconditioner frozen at its recorded value:
  * RMSprop: P = diag(1/(√v + ε)) from the running average v of g² (``centered``: 1/(√(v − ḡ²) + ε), ḡ the
    running average of g); no bias correction.  Its momentum μ (a heavy ball on g/(√v + ε), without Adam's
    (1 − β1) damping) delivers the gradient over the following steps: κ = Σ_{j=0..J} μ^j (J as above; κ = 1
    without momentum).  Its weight decay is coupled (L2), so κ has no decay factor.
  * Adagrad: P = diag(1/(√s + ε)) from the running sum s of g², and the rate its next step applies,
    η / (1 + t·lr_decay) after t steps: κ = 1 / (1 + t·lr_decay).  Coupled weight decay, no momentum.
A checkpoint of any other optimizer that keeps state besides SGD's momentum (NAdam, RAdam, Adamax, Adadelta...)
is refused by name rather than scored in another optimizer's form.  So is ``maximize=True`` (the update climbs
the loss: the score's sign would flip).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fgtrac_core.errors import FgtracError

_DELIVERED = 1e-3  # momentum tail left undelivered at the horizon J

WEIGHED_OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad")
"""The optimizers whose checkpoints `adam_state` weighs: Adam, AdamW, RMSprop and Adagrad by their second moments,
SGD in its own form."""

_SGD_STATE = {"step", "momentum_buffer"}


@dataclass(frozen=True)
class AdamState:
    """What the optimizer-aware score needs from one checkpoint: κ of the first named parameter, and √P per named
    parameter (a parameter of another param group scaled by √(η_p κ_p / η κ): its own rate and κ)."""

    kappa: float
    sqrt_precond: dict[str, torch.Tensor]


def _horizon(beta: float) -> int:
    """J: the steps after a gradient's own until a momentum of factor `beta` has delivered all of it but
    `_DELIVERED` (β^(J+1) ≤ 10⁻³); 0 without momentum."""
    return 0 if beta == 0 else math.ceil(math.log(_DELIVERED) / math.log(beta)) - 1


def momentum_factor(beta1: float, step: int, lr: float, decoupled_decay: float) -> float:
    """κ: displacement per unit η P g, J steps after the gradient's step (see module docstring)."""
    if not 0 <= beta1 < 1:
        raise FgtracError(f"beta1 must be in [0, 1), not {beta1}")
    horizon, shrink = _horizon(beta1), 1.0 - lr * decoupled_decay
    return sum(
        (1 - beta1) * beta1**j / (1 - beta1 ** (step + 1 + j)) * shrink ** (horizon - j)
        for j in range(horizon + 1)
    )


def heavy_ball_factor(momentum: float) -> float:
    """κ of RMSprop's momentum μ: Σ_{j=0..J} μ^j, the displacement per unit η P g once the momentum buffer has
    delivered the gradient (1 without momentum)."""
    if not 0 <= momentum < 1:
        raise FgtracError(f"momentum must be in [0, 1), not {momentum}")
    return sum(momentum**j for j in range(_horizon(momentum) + 1))


def _adam(s: Mapping[str, Any], g: Mapping[str, Any], rate: float) -> tuple[torch.Tensor, float]:
    """(√v̂ + ε, κ) of an Adam/AdamW parameter's state `s` in param group `g` stepped at `rate`."""
    if "decoupled_weight_decay" not in g:
        raise FgtracError("the optimizer state does not say whether its weight decay is decoupled (torch >= 2.6)")
    if g.get("amsgrad"):
        raise FgtracError("adamw mode does not support amsgrad")
    beta1, beta2 = g["betas"]
    t = int(float(s["step"]))
    v_hat = s["exp_avg_sq"].double() / (1 - beta2**t)
    decoupled = float(g["weight_decay"]) if g["decoupled_weight_decay"] else 0.0
    return v_hat.sqrt() + g["eps"], momentum_factor(beta1, t, rate, decoupled)


def _rmsprop(s: Mapping[str, Any], g: Mapping[str, Any], rate: float) -> tuple[torch.Tensor, float]:
    """(√v + ε, κ) of an RMSprop parameter (``centered``: √(v − ḡ²) + ε, as torch steps with)."""
    v = s["square_avg"].double()
    if g.get("centered"):
        v = v - s["grad_avg"].double() ** 2
    return v.sqrt() + g["eps"], heavy_ball_factor(float(g.get("momentum", 0.0)))


def _adagrad(s: Mapping[str, Any], g: Mapping[str, Any], rate: float) -> tuple[torch.Tensor, float]:
    """(√s + ε, κ) of an Adagrad parameter: κ = 1/(1 + t·lr_decay), the next step's rate per unit η."""
    t = int(float(s["step"]))
    return s["sum"].double().sqrt() + g["eps"], 1.0 / (1.0 + t * float(g["lr_decay"]))


# an optimizer's update rule as adamw mode weighs it: (√P⁻¹, κ) of one parameter from its state and param group
_Rule = Callable[[Mapping[str, Any], Mapping[str, Any], float], tuple[torch.Tensor, float]]


def _weighed_rule(state: Mapping[Any, Mapping[str, Any]], groups: list[Mapping[str, Any]]) -> tuple[str, _Rule] | None:
    """(the state entry holding its second moment, its rule) of a checkpoint's optimizer, told by its state's and
    groups' keys (a checkpoint written outside fgtrac has no class name); None for SGD (no second moment).
    Anything else is refused."""
    keys = {k for s in state.values() for k in s}
    rule: tuple[str, _Rule] | None
    if "exp_avg_sq" in keys:
        if any("momentum_decay" in g or "amsgrad" not in g for g in groups):  # NAdam, RAdam: not Adam's step
            raise FgtracError(
                f"the checkpoint's optimizer keeps Adam's moments but is not Adam or AdamW (no 'amsgrad' option, or "
                f"NAdam's 'momentum_decay'): adamw mode weighs {', '.join(WEIGHED_OPTIMIZERS)} checkpoints only"
            )
        rule = "exp_avg_sq", _adam
    elif keys <= {"step", "square_avg", "grad_avg", "momentum_buffer"} and all("alpha" in g for g in groups):
        rule = ("square_avg", _rmsprop) if "square_avg" in keys else None
    elif keys <= {"step", "sum"} and all("lr_decay" in g for g in groups):
        rule = ("sum", _adagrad) if "sum" in keys else None
    elif other := sorted(keys - _SGD_STATE):  # Adadelta's square_avg and acc_delta, Adamax's exp_inf...
        raise FgtracError(
            f"the checkpoint's optimizer state holds {', '.join(other)}, not the state of an optimizer adamw mode "
            f"weighs ({', '.join(WEIGHED_OPTIMIZERS)})"
        )
    else:
        return None
    if any(g.get("maximize") for g in groups):
        raise FgtracError("the checkpoint's optimizer maximizes its objective (maximize=True): adamw mode refuses it")
    return rule


def adam_state(
    model: nn.Module, optimizer_state: Mapping[str, Any] | None, lr: float, names: list[str]
) -> AdamState | None:
    """κ and √P for the named parameters from an Adam, AdamW, RMSprop or Adagrad `optimizer.state_dict()` (see
    the module docstring); None when the state holds no second moments (an SGD checkpoint keeps the SGD form).
    `lr` is the rate applied to the first named parameter; a parameter in another group gets that rate times the
    ratio of the groups' rates in the state.

    The optimizer's parameters are matched to the model's by the names the checkpoint recorded
    (``optimizer_params``: fgtrac checkpoints have them, so optimizers over some parameters or in groups of their
    own order work), else to `model.named_parameters()` in order, as when it was built with `model.parameters()`.
    """
    if not optimizer_state or not optimizer_state.get("state"):
        return None
    state, groups = optimizer_state["state"], optimizer_state.get("param_groups", [])
    weighed = _weighed_rule(state, groups)
    if weighed is None:
        return None
    moment, rule = weighed
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
        if s is None or moment not in s:
            raise FgtracError(f"the optimizer state holds no second moment for {name!r}")
        ref_group = g if ref_group is None else ref_group
        rate = lr * _rate_ratio(g, ref_group)
        denominator, kappa = rule(s, g, rate)
        sqrt_precond[name] = denominator.rsqrt().float()
        factors[name] = rate, kappa
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
