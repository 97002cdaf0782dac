"""The Jacobian of one recorded optimizer step, applied to perturbations (forward) or adjoints (transpose).

One step maps (parameters theta, optimizer state) to their next values.  Its Jacobian on the recorded trajectory
is a per-coordinate map plus one Hessian term H_t = d^2 L_t / d theta^2 (the batch's mean training loss), which
enters only through the gradient's perturbation dg = H_t dtheta (+ lambda dtheta for coupled weight decay).
Conventions follow PyTorch exactly (lr eta, momentum mu, dampening d, weight decay lambda, nesterov, Adam's
bias corrections):

SGD (coupled decay)   g = grad L + lambda theta;  b' = mu b + (1 - d) g  (b' = g at a buffer's first step);
                      theta' = theta - eta (g + mu b' if nesterov else b')
Adam / AdamW          theta1 = (1 - eta lambda) theta if decoupled else theta (coupled: g += lambda theta);
                      m' = beta1 m + (1 - beta1) g;  v' = beta2 v + (1 - beta2) g^2;
                      theta' = theta1 - (eta / bc1) m' / (sqrt(v') / sqrt(bc2) + eps)

Adam's preconditioner: ``frozen`` treats the denominator sqrt(v')/sqrt(bc2) + eps as a constant of the recorded
trajectory (a perturbation of v is not followed); ``full`` also differentiates through v' (exact Jacobian).  The
derivations are in docs/stage_attribution.md.  Hessian-vector products are analytic (double backward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Vectors = list[torch.Tensor]
Hvp = Callable[[Vectors], Vectors]
"""u -> H_t u (one tensor per parameter; a leading batch dimension, if any, is kept)."""

STATE_KEYS = {
    "SGD": ("momentum_buffer",),
    "Adam": ("exp_avg", "exp_avg_sq"),
    "AdamW": ("exp_avg", "exp_avg_sq"),
}
ADAM_MODES = ("frozen", "full")


@dataclass
class Perturbation:
    """A perturbation (or adjoint) of parameters and optimizer state, one tensor per parameter.

    `state` maps optimizer-state names (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``) to per-parameter
    tensors; a missing name means zero.  Tensors may carry a leading batch dimension (several at once).
    """

    param: Vectors
    state: dict[str, Vectors] = field(default_factory=dict)

    def get(self, key: str) -> Vectors:
        return self.state.get(key) or [torch.zeros_like(p) for p in self.param]


@dataclass
class StepPoint:
    """Everything the Jacobian of one step needs, per parameter (model.parameters() order).

    `hp[i]` holds the step's hyperparameters of parameter i's group (its lr for this step included); `first`
    says the SGD momentum buffer did not exist before this step; for Adam, `t` is the step count after the step,
    `denom[i]` the preconditioner denominator, and (``full`` mode only) `exp_avg`, `exp_avg_sq`, `grad` the
    moments after the step and the gradient that entered them.  `hvp` is None for the curvature-free map.
    """

    optimizer: str
    hp: list[dict[str, Any]]
    first: bool = False
    t: int = 0
    denom: Vectors | None = None
    exp_avg: Vectors | None = None
    exp_avg_sq: Vectors | None = None
    grad: Vectors | None = None
    hvp: Hvp | None = None
    adam_mode: str = "frozen"


def _hessian(point: StepPoint, u: Vectors) -> Vectors:
    return point.hvp(u) if point.hvp is not None else [torch.zeros_like(x) for x in u]


def forward(point: StepPoint, d: Perturbation) -> Perturbation:
    """J_t d: how a perturbation before the step changes the state after it."""
    hv = _hessian(point, d.param)
    if point.optimizer == "SGD":
        return _sgd_forward(point, d, hv)
    return _adam_forward(point, d, hv)


def transpose(point: StepPoint, a: Perturbation) -> Perturbation:
    """J_t^T a: the adjoint before the step, given the adjoint `a` after it (one HVP per call)."""
    if point.optimizer == "SGD":
        return _sgd_transpose(point, a)
    return _adam_transpose(point, a)


def _sgd_forward(point: StepPoint, d: Perturbation, hv: Vectors) -> Perturbation:
    new_param, new_buf = [], []
    bufs = d.get("momentum_buffer")
    for hp, dth, h, db in zip(point.hp, d.param, hv, bufs, strict=True):
        mu, lam, eta = hp["momentum"], hp["weight_decay"], hp["lr"]
        dg = h + lam * dth
        if mu:
            nb = dg if point.first else mu * db + (1 - hp["dampening"]) * dg
            direction = dg + mu * nb if hp["nesterov"] else nb
        else:
            nb, direction = torch.zeros_like(dth), dg
        new_param.append(dth - eta * direction)
        new_buf.append(nb)
    return Perturbation(new_param, {"momentum_buffer": new_buf})


def _sgd_transpose(point: StepPoint, a: Perturbation) -> Perturbation:
    g_bar, a_buf = [], []
    for hp, ath, ab in zip(point.hp, a.param, a.get("momentum_buffer"), strict=True):
        mu, eta = hp["momentum"], hp["lr"]
        if mu:
            b_tilde = ab - eta * mu * ath if hp["nesterov"] else ab - eta * ath
            coeff = 1.0 if point.first else 1 - hp["dampening"]
            g = coeff * b_tilde - eta * ath if hp["nesterov"] else coeff * b_tilde
            a_buf.append(torch.zeros_like(ab) if point.first else mu * b_tilde)
        else:
            g = -eta * ath
            a_buf.append(torch.zeros_like(ab))
        g_bar.append(g)
    hg = _hessian(point, g_bar)
    a_param = [
        ath + h + hp["weight_decay"] * g for hp, ath, h, g in zip(point.hp, a.param, hg, g_bar, strict=True)
    ]
    return Perturbation(a_param, {"momentum_buffer": a_buf})


def _adam_coeffs(point: StepPoint, hp: dict[str, Any]) -> tuple[float, float, float, float, float]:
    """(parameter shrink s, step size k = eta / bc1, coupled decay, sqrt(bc2), beta2) of one group."""
    beta1, beta2 = hp["betas"]
    eta, lam = hp["lr"], hp["weight_decay"]
    decoupled = hp.get("decoupled_weight_decay", point.optimizer == "AdamW")
    shrink = 1 - eta * lam if decoupled else 1.0
    coupled = 0.0 if decoupled else lam
    bc1, bc2 = 1 - beta1**point.t, 1 - beta2**point.t
    return shrink, eta / bc1, coupled, bc2**0.5, beta2


def _v_sensitivity(
    k: float, sqrt_bc2: float, m: torch.Tensor, v: torch.Tensor, den: torch.Tensor
) -> torch.Tensor:
    """d theta' / d v' = k m' / (den^2 * 2 sqrt(v') sqrt(bc2)); zero where v' = 0 (no gradient ever seen)."""
    root = v.sqrt()
    return torch.where(
        root > 0, k * m / (den**2 * 2 * root.clamp_min(1e-300) * sqrt_bc2), torch.zeros_like(m)
    )


def _adam_forward(point: StepPoint, d: Perturbation, hv: Vectors) -> Perturbation:
    assert point.denom is not None
    full = point.adam_mode == "full"
    out_p, out_m, out_v = [], [], []
    dms, dvs = d.get("exp_avg"), d.get("exp_avg_sq")
    for i, (hp, dth, h, dm) in enumerate(zip(point.hp, d.param, hv, dms, strict=True)):
        beta1 = hp["betas"][0]
        shrink, k, coupled, sqrt_bc2, beta2 = _adam_coeffs(point, hp)
        dg = h + coupled * dth
        nm = beta1 * dm + (1 - beta1) * dg
        new = shrink * dth - k * nm / point.denom[i]
        if full:
            assert point.grad is not None and point.exp_avg is not None and point.exp_avg_sq is not None
            nv = beta2 * dvs[i] + 2 * (1 - beta2) * point.grad[i] * dg
            new = (
                new + _v_sensitivity(k, sqrt_bc2, point.exp_avg[i], point.exp_avg_sq[i], point.denom[i]) * nv
            )
            out_v.append(nv)
        out_p.append(new)
        out_m.append(nm)
    state = {"exp_avg": out_m}
    if full:
        state["exp_avg_sq"] = out_v
    return Perturbation(out_p, state)


def _adam_transpose(point: StepPoint, a: Perturbation) -> Perturbation:
    assert point.denom is not None
    full = point.adam_mode == "full"
    g_bar, a_m, a_v, shrinks, couplings = [], [], [], [], []
    avs = a.get("exp_avg_sq")
    for i, (hp, ath, am) in enumerate(zip(point.hp, a.param, a.get("exp_avg"), strict=True)):
        beta1 = hp["betas"][0]
        shrink, k, coupled, sqrt_bc2, beta2 = _adam_coeffs(point, hp)
        m_tilde = am - k * ath / point.denom[i]
        g = (1 - beta1) * m_tilde
        if full:
            assert point.grad is not None and point.exp_avg is not None and point.exp_avg_sq is not None
            sens = _v_sensitivity(k, sqrt_bc2, point.exp_avg[i], point.exp_avg_sq[i], point.denom[i])
            v_tilde = avs[i] + sens * ath
            g = g + 2 * (1 - beta2) * point.grad[i] * v_tilde
            a_v.append(beta2 * v_tilde)
        g_bar.append(g)
        a_m.append(beta1 * m_tilde)
        shrinks.append(shrink)
        couplings.append(coupled)
    hg = _hessian(point, g_bar)
    a_param = [
        s * ath + h + c * g for s, c, ath, h, g in zip(shrinks, couplings, a.param, hg, g_bar, strict=True)
    ]
    state = {"exp_avg": a_m}
    if full:
        state["exp_avg_sq"] = a_v
    return Perturbation(a_param, state)


def step_hparams(groups: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    """Per-parameter hyperparameters of one step from its param groups' applied values (`Stage.step_groups`), in
    the optimizer's parameter order."""
    out: list[dict[str, Any]] = []
    for group, size in zip(groups, sizes, strict=True):
        out += [dict(group)] * size
    return out


def still_hparams(optimizer: str) -> dict[str, Any]:
    """The hyperparameters under which a step leaves a parameter and its state perturbation where they are: for
    a parameter the step's optimizer did not move (it did not hold it, or it was frozen).  lr 0 makes both maps
    the identity on it (its Hessian coupling to the moved parameters still counts); no momentum, no moments."""
    if optimizer == "SGD":
        return {"lr": 0.0, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
    return {"lr": 0.0, "betas": (0.0, 0.0), "eps": 1.0, "weight_decay": 0.0, "decoupled_weight_decay": True}


def adam_denominators(
    state: dict[Any, Any], hp: list[dict[str, Any]], index: list[int | None], like: Vectors
) -> Vectors:
    """sqrt(v)/sqrt(bc2) + eps per parameter from an Adam state_dict's ``state`` at its own step count;
    `index[i]` is parameter i's key in that state (None: the optimizer did not step it, denominator 1)."""
    out = []
    for h, k, p in zip(hp, index, like, strict=True):
        if k is None:
            out.append(torch.ones_like(p))
            continue
        count = int(torch.as_tensor(state[k]["step"]))
        out.append(state[k]["exp_avg_sq"].sqrt() / (1 - h["betas"][1] ** count) ** 0.5 + h["eps"])
    return out
