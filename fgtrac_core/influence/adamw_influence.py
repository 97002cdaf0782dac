"""AdamW-influence (arXiv 2605.18814) along the replayed trajectory of a recorded run.

Definition.  Give training sample z a weight w_z on its term of every batch loss it is in, L_t = (1/|B_t|)
Σ_{i ∈ B_t} w_i ℓ_i (w = 1 is the recorded run), and follow the first-order effect of w_z on the optimizer's
state s_t = (θ_t, m_t, v_t) through the steps the run actually took, holding every step's loss gradient at its
recorded value: only the optimizer's state and its parameter updates carry the perturbation forward (no
curvature: the loss gradients at later steps are not re-evaluated at the perturbed parameters).  Then

    score(test, z) = − ∇ℓ(test, θ_T) · dθ_T/dw_z

per unit of sample weight in the mean-loss scaling (z's per-use gradient enters with 1/|B_t|); positive =
proponent (up-weighting z lowers the test loss), TracIn's sign (`exact.py`).  The paper's own code
(TRAIS-Lab dattri-llm, `AdamWInfluenceAttributor`) scores removal and has the opposite sign.

What z does at a step t of an Adam/AdamW stage that used it (g_z = ∇ℓ_z(θ_t)/|B_t|, g' the gradient Adam
consumed — after clipping, plus λθ_t for Adam's coupled decay; k the optimizer's step count after the step,
m, v the moments after it, bc1 = 1 − β1^k, bc2 = 1 − β2^k, D = √v/√bc2 + ε):

    δm = (1 − β1) g_z
    δv = 2 (1 − β2) g' ⊙ g_z                                        (the second moment's own sensitivity)
    δθ = − lr/bc1 · (δm / D − m ⊙ δv / (D² · 2 √bc2 √v))

and every later Adam/AdamW step maps a state perturbation (δθ, δm, δv) to the next one by the step's Jacobian
with the loss gradient held (δg' = λ_coupled δθ):

    δm ← β1 δm + (1 − β1) δg'              δv ← β2 δv + 2 (1 − β2) g' ⊙ δg'
    δθ ← (1 − lr λ_decoupled) δθ − lr/bc1 · (δm / D − m ⊙ δv / (D² · 2 √bc2 √v))

(the paper's M_t with D_t = 1/(√v̂ + ε) and S_t = m̂ / (2 √v̂ (√v̂ + ε)²)); an SGD step carries (δθ, δbuf)
through its momentum and coupled decay the same way; a stage that starts a fresh optimizer zeroes the moment
part (its state no longer depends on z).  Clipping at z's step is differentiated exactly: value clipping masks
the clipped coordinates; norm clipping c = max_norm/(‖g‖ + 10⁻⁶) < 1 gives c (g_z − g (u·g_z)/(‖g‖ + 10⁻⁶)),
u = ∂‖g‖/∂g over all parameters, with u·∇ℓ_z taken by a double backward over the whole model.  Later steps'
clipping is part of their held gradient.

SGD steps.  A use of z at an SGD step gets the step-exact TracIn term η_t/|B_t| ∇ℓ(test, θ_t)·∇ℓ(z, θ_t)
(`exact.py`'s, the test gradient at the step's own parameters), so on a run trained with SGD only this mode
equals `--mode exact`.  In a run mixing optimizers, uses at Adam/AdamW steps are propagated (held) through every
later step of the run, SGD steps included, to θ_T.

Parameters.  By default the head (the last `nn.Linear` `layer`: weight and bias, `include_bias=False` drops
the bias); `params` names any parameters instead (per-sample gradients by `torch.func`).  With the gradients
held, the step Jacobians act coordinate by coordinate, so the score over a set of parameters is exactly the
part of the all-parameter score carried by those parameters' coordinates (the clipping coupling included).
Per-sample gradients are taken in eval mode with `loss_fn` per sample (default cross-entropy), assumed to
average to the training loss.

Computation: forward sensitivities, streamed with the replay (`stages.replay.Cursor`, bit-exact; the moments,
step counts and consumed gradients are read from the replayed optimizer itself).  The tangent (δθ, δm, δv) of
every training sample is carried as three (n_train, P) float64 matrices, so memory is 3·n_train·P·8 bytes and
does not grow with the number of steps; each step costs one pass over them (elementwise), one per-sample
gradient of the batch and, at SGD steps using training samples, one of the test set.  At the end the test
set's gradients at θ_T are dotted with δθ_T.  (The paper's Algorithm 1 sweeps backwards over stored per-step
gradients instead, carrying W on the training or the test side; forward needs no storage per step.)

Per-interval contributions (what `run_influence` stores per checkpoint) come from a second replay: the first
also carries, from the end of each interval, the propagator to θ_T (3 × 3 numbers per coordinate, the same
recursion on unit perturbations); the second restarts the tangent at each interval and applies that propagator
at its end.  They sum to the raw score when every step is covered.

Differences from the paper's code (dattri-llm 0.1.0): it adds a curvature term — the later gradients' change
approximated by the batch's empirical Fisher (W_θ += |B| Σ_z (W R_t g_z) g_zᵀ) — which this form leaves out by
definition (gradients held; `unrolled_influence(held=False)` measures what curvature changes); it recovers the
consumed batch gradient from the recorded moments, where the replay reads it; it takes a sample's gradient
share as given, without differentiating clipping; it scores only Adam(W) steps (SGD steps: TracIn here); it
projects or masks coordinates, where this takes a layer's coordinates exactly.

`unrolled_influence` is the brute-force reference (autograd through the unrolled steps, with or without the
gradients held) and `compare` the figures that tell two score matrices apart.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fgtrac_core.derivatives import is_unsupported, once_differentiable_functions
from fgtrac_core.errors import FgtracError
from fgtrac_core.influence.exact import _columns, _topk
from fgtrac_core.influence.gradients import (
    LossFn,
    head_factors,
    head_gradients,
    linear_layer,
    per_sample_gradients,
    per_sample_loss,
)
from fgtrac_core.influence.group_rates import folded
from fgtrac_core.influence.tracin import TopK

MODE = "adamw_influence"
OPTIMIZERS = ("SGD", "Adam", "AdamW")
SGD_FORMS = ("exact", "trajectory")
_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6)


# ------------------------------------------------------------------------------------------------ parameters


@dataclass
class _Params:
    """The scored parameters: names (model.parameters() order), their flat layout, and how per-sample gradients
    are taken (the head's exact (δ, a) factors, or torch.func over `names`)."""

    names: list[str]
    sizes: list[int]
    layer: str | None  # head path when set
    bias: bool
    loss_fn: LossFn | None

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def tensors(self, model: nn.Module) -> list[torch.nn.Parameter]:
        named = dict(model.named_parameters())
        return [named[n] for n in self.names]

    def grads(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(n, P) float64 per-sample gradients of the scored parameters at the model's current values."""
        if len(x) == 0:
            return torch.zeros(0, self.size, dtype=torch.float64)
        if self.layer is not None:
            d, a = head_factors(model, self.layer, (x, y), loss_fn=self.loss_fn)
            return head_gradients(d, a, self.bias).double()
        dev = next(model.parameters()).device
        return per_sample_gradients(model, self.names, (x, y), loss_fn=self.loss_fn, device=dev).double()


def _params(
    model: nn.Module, layer: str, include_bias: bool, params: Sequence[str] | None, loss_fn: LossFn | None
) -> _Params:
    named = dict(model.named_parameters())
    if params is None:
        head = linear_layer(model, layer)
        names = [f"{layer}.weight"] + ([f"{layer}.bias"] if include_bias and head.bias is not None else [])
        return _Params(names, [named[n].numel() for n in names], layer, len(names) == 2, loss_fn)
    wanted = set(params)
    unknown = sorted(wanted - set(named))
    if unknown:
        raise FgtracError(f"the model has no parameter {unknown[0]!r}")
    names = [n for n in named if n in wanted]  # model.parameters() order
    return _Params(names, [named[n].numel() for n in names], None, False, loss_fn)


def check_supported(training: Any, sgd_form: str = "exact") -> None:
    """Refuse, in one line, what this mode cannot follow: optimizers other than SGD/Adam/AdamW, AMSGrad,
    maximize, steps on zeroed gradients backward did not produce, and runs that exact replay cannot reproduce."""
    from fgtrac_core.stages.replay import INFLUENCE_REMEDY, require_replayable

    if sgd_form not in SGD_FORMS:
        raise FgtracError(f"sgd_form must be one of {', '.join(SGD_FORMS)}, not {sgd_form!r}")
    for stage in training.stages:
        if stage.optimizer not in OPTIMIZERS:
            raise FgtracError(
                f"stage {stage.name!r} uses {stage.optimizer}; AdamW-influence follows Adam and AdamW steps "
                f"(and SGD steps in the step-exact TracIn form), not {stage.optimizer}"
            )
    if (found := training.enabled_option("amsgrad", "maximize")) is not None:
        raise FgtracError(f"stage {found[0]!r}: AdamW-influence does not support {found[1]}=True")
    for stage in training.stages:
        if (i := next((i for i in range(stage.n_steps) if stage.zeros(i)), None)) is not None:
            raise FgtracError(
                f"stage {stage.name!r} stepped on zeroed gradients of parameters its backward did not reach at step "
                f"{stage.steps[i]} (zero_grad(set_to_none=False)), which AdamW-influence does not follow; exact "
                f"replay (--method replay, --check) does"
            )
    require_replayable(training, INFLUENCE_REMEDY)


# --------------------------------------------------------------------------------------- tangents and steps


@dataclass
class _Tangent:
    """Perturbations of (θ, first optimizer slot, second slot) per row and coordinate: Adam's (θ, m, v), SGD's
    (θ, momentum buffer, unused)."""

    th: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor

    @classmethod
    def zeros(cls, n: int, size: int) -> _Tangent:
        return cls(*(torch.zeros(n, size, dtype=torch.float64) for _ in range(3)))

    @classmethod
    def identity(cls, size: int) -> _Tangent:
        """Three rows: a unit perturbation of θ, of the first slot, of the second, at every coordinate."""
        t = cls.zeros(3, size)
        t.th[0], t.s1[1], t.s2[2] = 1.0, 1.0, 1.0
        return t

    def reset_state(self) -> None:
        self.s1.zero_()
        self.s2.zero_()

    def zero_(self) -> None:
        for t in (self.th, self.s1, self.s2):
            t.zero_()

    def zero_at(self, coordinates: torch.Tensor) -> None:
        """Zero the perturbation of these coordinates (a bool mask over the scored ones), in every slot."""
        for t in (self.th, self.s1, self.s2):
            t[:, coordinates] = 0.0


def _per_coordinate(values: list[float], sizes: list[int]) -> torch.Tensor:
    return torch.cat(
        [torch.full((n,), float(v), dtype=torch.float64) for v, n in zip(values, sizes, strict=True)]
    )


@dataclass
class _AdamStep:
    """The held Jacobian of one Adam/AdamW step, per coordinate, and the push of a gradient perturbation."""

    beta1: torch.Tensor
    beta2: torch.Tensor
    shrink: torch.Tensor  # 1 − lr λ (decoupled decay), else 1
    coupled: torch.Tensor  # λ of Adam's coupled decay, else 0
    grad: torch.Tensor  # g' consumed (after clipping, + coupled λθ)
    a: torch.Tensor  # lr/bc1 / D
    b: torch.Tensor  # lr/bc1 · m / (D² · 2 √bc2 √v); 0 where v = 0

    def carry(self, t: _Tangent) -> None:
        if bool(self.coupled.any()):
            dg = t.th * self.coupled
            t.s1.mul_(self.beta1).addcmul_(dg, 1 - self.beta1)
            t.s2.mul_(self.beta2).addcmul_(dg, 2 * (1 - self.beta2) * self.grad)
        else:
            t.s1.mul_(self.beta1)
            t.s2.mul_(self.beta2)
        t.th.mul_(self.shrink).addcmul_(t.s1, -self.a).addcmul_(t.s2, self.b)

    def push(self, t: _Tangent, dg: torch.Tensor, cols: torch.Tensor) -> None:
        """Add the effect of the gradient perturbations `dg` (rows) on the state after this step."""
        rows, inverse = torch.unique(cols, return_inverse=True)  # a sample twice in a batch: its rows summed
        dg = torch.zeros(len(rows), dg.shape[1], dtype=dg.dtype).index_add_(0, inverse, dg)
        dm = dg * (1 - self.beta1)
        dv = dg * (2 * (1 - self.beta2) * self.grad)
        # unique rows: plain indexing (index_add_ into the large matrix is slow under deterministic algorithms)
        t.s1[rows] += dm
        t.s2[rows] += dv
        t.th[rows] += dv * self.b - dm * self.a


@dataclass
class _SgdStep:
    """The held Jacobian of one SGD step (momentum, dampening, Nesterov, coupled decay), per coordinate."""

    lr: torch.Tensor
    decay: torch.Tensor
    momentum: torch.Tensor
    dampening: torch.Tensor
    nesterov: torch.Tensor  # 1.0 / 0.0
    first: torch.Tensor  # 1.0 where the momentum buffer did not exist before the step

    def trivial(self) -> bool:
        return not bool(self.decay.any()) and not bool(self.momentum.any())

    def carry(self, t: _Tangent) -> None:
        if self.trivial():
            return
        dg = t.th * self.decay
        if bool(self.momentum.any()):
            buf = torch.where(self.first.bool(), dg, t.s1 * self.momentum + dg * (1 - self.dampening))
            t.s1.copy_(buf)
            direction = torch.where(self.nesterov.bool(), dg + buf * self.momentum, buf)
            direction = torch.where(self.momentum != 0, direction, dg)
        else:
            direction = dg
        t.th.sub_(direction * self.lr)
        t.s2.zero_()

    def push(self, t: _Tangent, dg: torch.Tensor, cols: torch.Tensor) -> None:
        """Add the effect of the gradient perturbations `dg` (rows) on the state after this step."""
        rows, inverse = torch.unique(cols, return_inverse=True)
        dg = torch.zeros(len(rows), dg.shape[1], dtype=dg.dtype).index_add_(0, inverse, dg)
        buf = torch.where(self.first.bool(), dg, dg * (1 - self.dampening))
        direction = torch.where(self.nesterov.bool(), dg + buf * self.momentum, buf)
        direction = torch.where(self.momentum != 0, direction, dg)
        t.s1[rows] += torch.where(self.momentum != 0, buf, 0.0)
        t.th[rows] -= direction * self.lr


def _group_of(training: Any, j: int, names: list[str]) -> list[int | None]:
    """The param group of stage `j`'s optimizer each named parameter was in, or None where the stage did not
    step it (its optimizer did not hold it, or it was frozen: `Training.stepped_index`)."""
    group = [g for g, size in enumerate(training.stages[j].group_sizes()) for _ in range(size)]
    index = dict(zip(training.param_names, training.stepped_index(j), strict=True))
    return [None if index[n] is None else group[index[n]] for n in names]


def _stepped(training: Any, j: int, model: nn.Module) -> list[torch.nn.Parameter]:
    """The model's parameters stage `j`'s optimizer stepped (what its clipping rule was applied over)."""
    return [p for p, k in zip(model.parameters(), training.stepped_index(j), strict=True) if k is not None]


def _require_stepped(training: Any, names: list[str]) -> None:
    """Refuse scored parameters some stage did not step: their tangents would need that stage's identity map."""
    for j, stage in enumerate(training.stages):
        missed = [n for n, g in zip(names, _group_of(training, j, names), strict=True) if g is None]
        if missed:
            raise FgtracError(
                f"stage {stage.name!r} did not step {', '.join(missed)} (its optimizer did not hold them, or they "
                f"were frozen), which AdamW-influence scores: score parameters that every stage trains (a head "
                f"layer each stage's optimizer steps, or params=)"
            )


def _adam_step(
    optimizer: torch.optim.Optimizer,
    tensors: list[torch.nn.Parameter],
    theta: torch.Tensor,
    hps: list[dict[str, Any]],
    kind: str,
    sizes: list[int],
    names: list[str],
) -> _AdamStep:
    """The step's Jacobian from the replayed optimizer right after its step (moments, counts, gradients)."""
    m, v, g, k = [], [], [], []
    for p, name in zip(tensors, names, strict=True):
        st = optimizer.state.get(p, {})
        if p.grad is None or "exp_avg_sq" not in st:
            raise FgtracError(
                f"parameter {name!r} got no gradient at a replayed step; AdamW-influence needs one"
            )
        m.append(st["exp_avg"].detach().reshape(-1).double())
        v.append(st["exp_avg_sq"].detach().reshape(-1).double())
        g.append(p.grad.detach().reshape(-1).double())
        k.append(float(st["step"]))
    m_, v_, g_ = torch.cat(m), torch.cat(v), torch.cat(g)
    beta1 = _per_coordinate([hp["betas"][0] for hp in hps], sizes)
    beta2 = _per_coordinate([hp["betas"][1] for hp in hps], sizes)
    lr = _per_coordinate([hp["lr"] for hp in hps], sizes)
    eps = _per_coordinate([hp["eps"] for hp in hps], sizes)
    steps = _per_coordinate(k, sizes)
    decoupled = [kind == "AdamW" or bool(hp.get("decoupled_weight_decay")) for hp in hps]
    wd = [float(hp.get("weight_decay", 0.0)) for hp in hps]
    shrink = 1 - lr * _per_coordinate([w if d else 0.0 for w, d in zip(wd, decoupled, strict=True)], sizes)
    coupled = _per_coordinate([0.0 if d else w for w, d in zip(wd, decoupled, strict=True)], sizes)
    grad = g_ + coupled * theta
    bc1, bc2 = 1 - beta1**steps, 1 - beta2**steps
    root = v_.sqrt()
    denom = root / bc2.sqrt() + eps
    a = lr / bc1 / denom
    b = torch.where(root > 0, lr / bc1 * m_ / (denom**2 * 2 * bc2.sqrt() * root.clamp_min(1e-300)), 0.0)
    return _AdamStep(beta1, beta2, shrink, coupled, grad, a, b)


def _sgd_step(hps: list[dict[str, Any]], first: list[bool], sizes: list[int]) -> _SgdStep:
    f = lambda key, default=0.0: _per_coordinate([float(hp.get(key, default)) for hp in hps], sizes)  # noqa: E731
    return _SgdStep(
        f("lr"), f("weight_decay"), f("momentum"), f("dampening"),
        _per_coordinate([1.0 if hp.get("nesterov") else 0.0 for hp in hps], sizes),
        _per_coordinate([1.0 if x else 0.0 for x in first], sizes),
    )  # fmt: skip


def _loss_weights(training: Any, j: int, i: int) -> torch.Tensor | None:
    """Each sample's weight in the loss of step i of stage j (float64, batch order) when the loop accumulated
    gradients there (`Training.sample_weights`); None for a step of one batch, whose loss is its mean."""
    if training.stages[j].accumulation == 1:
        return None
    return torch.from_numpy(training.sample_weights(j, i))


def _clip_jacobian(
    model: nn.Module,
    params: list[torch.nn.Parameter],
    spec: _Params,
    xb: torch.Tensor,
    yb: torch.Tensor,
    at: torch.Tensor,
    clip: dict[str, Any],
    dg: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The perturbation of the clipped gradient on the scored coordinates, from the unclipped ones `dg` of the
    batch rows `at` (each ∇ℓ_z/|B|, or ∇ℓ_z times its weight `scale` with gradient accumulation): exact
    derivative of torch's clipping (see the module docstring).  `params`: those the rule was applied over (the
    stage's optimizer's, `_stepped`), which hold the scored ones."""
    fn = per_sample_loss(spec.loss_fn)
    named = dict(model.named_parameters())
    scored = {id(named[n]) for n in spec.names}
    norm_rule = clip["rule"] == "norm"
    weights = torch.ones(len(xb), dtype=next(model.parameters()).dtype, requires_grad=True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            per_sample = fn(model(xb), yb) * weights
            loss = per_sample.sum() / len(xb) if scale is None else (per_sample * scale.to(weights.dtype)).sum()
            grads = torch.autograd.grad(loss, params, create_graph=norm_rule)
            flat = torch.cat([g.reshape(-1) for g in grads])
            here = torch.cat(
                [g.detach().reshape(-1) for p, g in zip(params, grads, strict=True) if id(p) in scored]
            )
            if not norm_rule:
                keep = (here.abs() <= float(clip["clip_value"])).double()
                return dg * keep
            p_norm = float(clip["norm_type"])
            total = torch.linalg.vector_norm(flat.detach().double(), p_norm)
            coef = float(clip["max_norm"]) / (float(total) + _CLIP_EPS)
            if coef >= 1.0:
                return dg
            g64 = flat.detach().double()
            if math.isinf(p_norm):
                u = torch.zeros_like(g64)
                j = int(g64.abs().argmax())
                u[j] = torch.sign(g64[j])
            else:
                u = torch.sign(g64) * g64.abs() ** (p_norm - 1) / total ** (p_norm - 1)
            s = None
            if not once_differentiable_functions(loss):  # through those torch would take it as zero, silently
                try:
                    (s,) = torch.autograd.grad((flat * u.to(flat.dtype)).sum(), weights)
                except (NotImplementedError, RuntimeError) as exc:
                    if not is_unsupported(exc):
                        raise
            if s is None:
                s = _per_sample_dots(model, params, fn, xb, yb, u, scale)
    finally:
        model.train(was_training)
    s_z = s.detach().double()[at]  # u · ∇ℓ_z/|B| (or times its weight): the loss above is the step's
    return coef * (dg - s_z[:, None] * here.double()[None, :] / (float(total) + _CLIP_EPS))


def _per_sample_dots(
    model: nn.Module,
    params: list[torch.nn.Parameter],
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    xb: torch.Tensor,
    yb: torch.Tensor,
    u: torch.Tensor,
    scale: torch.Tensor | None,
) -> torch.Tensor:
    """u · ∇ℓ_z/|B| (or ∇ℓ_z times its weight `scale`) of every batch row z, one backward each: what
    `_clip_jacobian`'s mixed second derivative gives, for a model torch has no double backward of (or a wrong one:
    a custom function with a once_differentiable backward, `once_differentiable_functions`)."""
    out = torch.empty(len(xb), dtype=torch.float64)
    for z in range(len(xb)):
        loss = fn(model(xb[z : z + 1]), yb[z : z + 1]).sum()
        loss = loss / len(xb) if scale is None else loss * scale[z].to(loss.dtype)
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        out[z] = torch.cat([g.reshape(-1) for g in grads]).double() @ u
    return out


# ------------------------------------------------------------------------------------------------ the sweep


@dataclass
class AdamWInfluenceScores:
    """What one pass computes (float64, columns in `train_ids` order)."""

    scores: torch.Tensor  # (n_test, n_train): propagated + tracin
    # part from uses followed through the optimizer to θ_T (Adam/AdamW steps; SGD too with sgd_form="trajectory")
    propagated: torch.Tensor
    tracin: torch.Tensor  # part from uses at SGD steps in the step-exact TracIn form (sgd_form="exact")
    test_sq: torch.Tensor  # (n_test, n_train) cosine denominator, test side
    train_sq: torch.Tensor  # (n_train,) cosine denominator, training side
    self_influence: torch.Tensor  # (n_train,): score(z, z)
    n_steps: int
    adam_steps: int
    sgd_steps: int
    uses: int
    propagated_uses: int
    seconds: float
    test_grads: torch.Tensor | None = None  # (n_test, P) at θ_T (for the per-interval pass)
    # per interval segment with followed uses: the propagator's θ rows to θ_T, (3, P)
    propagators: list[torch.Tensor] = field(default_factory=list)


def _sweep(
    training: Any,
    spec: _Params,
    train_ids: np.ndarray,
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    interval_of_step: Callable[[int, int], int] | None = None,
    track: bool = False,
    split: tuple[torch.Tensor, list[torch.Tensor], Callable[[int, torch.Tensor], None]] | None = None,
    sgd_form: str = "exact",
    progress: bool = False,
) -> AdamWInfluenceScores:
    """One replay.  `track`: also carry the propagator to θ_T from the end of each interval segment that had
    followed (propagated) uses.  `split` = (test gradients at θ_T, those propagators, on_segment_end): restart everything at each
    segment and hand over its (n_test, n_train) contribution block at its end."""
    from fgtrac_core.stages.replay import Cursor, raise_if_diverged

    t0 = time.perf_counter()
    x_te, y_te = test
    n_test, n_train = len(x_te), len(train_ids)
    cols_of = _columns(train_ids)
    cursor = Cursor(training, 0, training.stages[0].start_model, None)
    cursor.check_fingerprints = True  # a step off the recorded trajectory stops the replay (raise_if_diverged)
    tensors = spec.tensors(cursor.model)
    group_of = [_group_of(training, j, spec.names) for j in range(training.n_stages)]  # all set: _require_stepped
    replaced_at = [  # per stage, the scored coordinates the loop replaced as it started (`Training.replaced`)
        _per_coordinate([float(n in training.replaced(j)) for n in spec.names], spec.sizes).bool()
        for j in range(training.n_stages)
    ]
    tan = _Tangent.zeros(n_train, spec.size)
    live = False
    sgd = torch.zeros(n_test, n_train, dtype=torch.float64)
    test_sq = torch.zeros(n_test, n_train, dtype=torch.float64)
    self_inf = torch.zeros(n_train, dtype=torch.float64)
    pushed = torch.zeros(n_train, dtype=torch.bool)  # samples with a propagated use
    block = torch.zeros(n_test, n_train, dtype=torch.float64) if split is not None else None
    props: list[_Tangent] = []
    seg_col: int | None = None
    seg_adam = False
    seg_index = 0  # segments with followed uses seen so far (index into `split`'s propagators)
    n_steps = adam_steps = sgd_steps = uses = propagated_uses = 0

    def end_segment() -> None:
        nonlocal live, seg_index
        if seg_col is None:
            return
        if split is not None:
            assert block is not None
            if seg_adam:
                g_test, propagators, _ = split
                q = propagators[seg_index]
                block.sub_(
                    (g_test * q[0]) @ tan.th.T + (g_test * q[1]) @ tan.s1.T + (g_test * q[2]) @ tan.s2.T
                )
            if seg_col >= 0:
                split[2](seg_col, block)
            block.zero_()
            tan.zero_()
            live = False
        elif track and seg_adam:
            props.append(_Tangent.identity(spec.size))
        if seg_adam:
            seg_index += 1

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cursor.remaining, desc="AdamW-influence", unit="step", leave=False)
    prev_j: int | None = None
    try:
        while not cursor.done:
            j, i = cursor.stage_index, cursor.step_index
            stage = training.stages[j]
            if interval_of_step is not None:
                col = interval_of_step(stage.stage_id, stage.steps[i])
                if col != seg_col or prev_j is None:
                    end_segment()
                    seg_col, seg_adam = col, False
            if (
                prev_j is not None
                and j != prev_j
                and any(training.stages[s].fresh for s in range(prev_j + 1, j + 1))
            ):
                tan.reset_state()  # a fresh optimizer: its state no longer depends on any sample
                for p in props:
                    p.reset_state()
            if prev_j is not None and j != prev_j:
                # coordinates the loop replaced as a stage started (a re-initialised head) depend on no sample
                for s in range(prev_j + 1, j + 1):
                    for t in (tan, *props):
                        t.zero_at(replaced_at[s])
            prev_j = j
            n_steps += 1
            ids = np.asarray(stage.batches[i], dtype=np.int64)
            xb, yb = cursor.batch()
            at, cols = cols_of(ids)
            adam = stage.optimizer in ("Adam", "AdamW")
            hps = [stage.step_groups(i)[g] for g in group_of[j]]
            model = cursor.model
            dg = None
            scale = _loss_weights(training, j, i)
            if len(cols) and (adam or sgd_form == "trajectory"):
                g_b = spec.grads(model, xb[at], yb[at])
                dg = g_b / len(ids) if scale is None else g_b * scale[at][:, None]
                clip = stage.clip(i)
                if clip:
                    dg = _clip_jacobian(model, _stepped(training, j, model), spec, xb, yb, at, clip, dg, scale)
                propagated_uses += len(cols)
            elif len(cols):  # SGD: the step-exact TracIn term, as exact.py (each parameter at its group's rate)
                eta, roots = folded([float(hp["lr"]) for hp in hps])
                weight = eta / len(ids) if scale is None else scale[at] * eta
                g_te = spec.grads(model, x_te, y_te)
                g_b = spec.grads(model, xb[at], yb[at])
                if roots is not None:
                    root = _per_coordinate(roots, spec.sizes)
                    g_te, g_b = g_te * root, g_b * root
                part = (g_te @ g_b.T).mul_(weight)
                sgd.index_add_(1, cols, part)
                if block is not None:
                    block.index_add_(1, cols, part)
                t_sq = g_te.pow(2).sum(1)[:, None] * weight  # a column per sample when weights differ
                test_sq.index_add_(1, cols, t_sq.expand(-1, len(cols)))
                self_inf.index_add_(0, cols, g_b.pow(2).sum(1).mul_(weight))
            uses += len(cols)
            follow = live or dg is not None or bool(props)
            theta = torch.cat([p.detach().reshape(-1).double() for p in tensors]) if follow else None
            first = [
                not torch.is_tensor(cursor.optimizer.state.get(p, {}).get("momentum_buffer")) for p in tensors
            ]
            seen: list[torch.optim.Optimizer] = []
            cursor.step(seen.append)  # the optimizer right after its step (its state, the consumed gradients)
            raise_if_diverged(cursor, "no influence is reported")
            if adam:
                adam_steps += 1
            else:
                sgd_steps += 1
            if follow:
                step: _AdamStep | _SgdStep = (
                    _adam_step(seen[0], tensors, theta, hps, stage.optimizer, spec.sizes, spec.names)
                    if adam
                    else _sgd_step(hps, first, spec.sizes)
                )
                if live:
                    step.carry(tan)
                for p in props:
                    step.carry(p)
                if dg is not None:
                    step.push(tan, dg, cols)
                    pushed[cols] = True
                    live = seg_adam = True
            training._batch_cache.pop((j, i), None)
            if bar is not None:
                bar.update(1)
        end_segment()
    finally:
        if bar is not None:
            bar.close()
    if n_steps == 0:
        raise FgtracError("the run has no recorded steps to replay")
    g_test = spec.grads(cursor.model, x_te, y_te)
    propagated = torch.zeros(n_test, n_train, dtype=torch.float64)
    train_sq = self_inf.clone()
    if split is None and bool(pushed.any()):
        propagated = -(g_test @ tan.th.T)
        x_tr, y_tr = training.load_batch(train_ids)
        g_train = spec.grads(cursor.model, x_tr, y_tr)
        self_inf = self_inf - (g_train * tan.th).sum(1)
        train_sq += tan.th.pow(2).sum(1)
        test_sq += g_test.pow(2).sum(1)[:, None] * pushed[None, :].double()
    return AdamWInfluenceScores(
        scores=sgd + propagated, propagated=propagated, tracin=sgd, test_sq=test_sq, train_sq=train_sq,
        self_influence=self_inf, n_steps=n_steps, adam_steps=adam_steps, sgd_steps=sgd_steps, uses=uses,
        propagated_uses=propagated_uses, seconds=time.perf_counter() - t0, test_grads=g_test,
        propagators=[torch.stack([p.th[0], p.th[1], p.th[2]]) for p in props],
    )  # fmt: skip


def adamw_influence(
    training: Any,
    layer: str,
    train_ids: np.ndarray,
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    include_bias: bool = True,
    params: Sequence[str] | None = None,
    loss_fn: LossFn | None = None,
    sgd_form: str = "exact",
    progress: bool = False,
) -> AdamWInfluenceScores:
    """AdamW-influence of every training sample `train_ids` on every test example, by one replay of `training`
    (a `stages.training.Training`; run it under `stages.replay.deterministic` for bit-exact replay).

    `params` (names) replaces the default parameters, the head `layer`'s weight and bias (`include_bias`).
    `sgd_form`: "exact" (uses at SGD steps get step-exact TracIn's term) or "trajectory" (followed to θ_T
    like Adam's, through SGD's own held dynamics — the same definition for every step).
    """
    check_supported(training, sgd_form)
    spec = _params(training.model_factory(), layer, include_bias, params, loss_fn)
    _require_stepped(training, spec.names)
    return _sweep(
        training, spec, np.asarray(train_ids, dtype=np.int64), test, sgd_form=sgd_form, progress=progress
    )


@dataclass
class AdamWInfluenceReview:
    """What `run_influence` stores, like `exact.ExactReview`: top-k by raw score and cosine, self-influence, and
    per stored pair the contributions of each interval."""

    top: TopK
    top_cosine: TopK
    self_influence: torch.Tensor
    scores: AdamWInfluenceScores
    n_intervals: int
    checkpoint_weights: list[float] = field(default_factory=list)
    checkpoint_kappas: list[float] | None = None
    _pairs: torch.Tensor | None = None
    _parts: torch.Tensor | None = None

    def candidates(self) -> torch.Tensor:
        t, c = self.top, self.top_cosine
        return torch.cat(
            [t.proponent_indices, t.opponent_indices, c.proponent_indices, c.opponent_indices], 1
        )

    def pair_detail(
        self, test_idx: torch.Tensor, train_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.scores
        raw = s.scores[test_idx, train_idx]
        norm = (s.test_sq[test_idx, train_idx] * s.train_sq[train_idx]).sqrt().clamp_min(1e-300)
        if self._pairs is None or self._parts is None:
            parts = raw[..., None]
        else:
            cand = self._pairs[test_idx]
            pos = (cand == train_idx[..., None]).to(torch.int8).argmax(-1)
            parts = self._parts[test_idx, pos]
        return raw, raw / norm, parts


def adamw_influence_review(
    training: Any,
    layer: str,
    train_ids: np.ndarray,
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    k: int,
    include_bias: bool = True,
    params: Sequence[str] | None = None,
    loss_fn: LossFn | None = None,
    intervals: Sequence[tuple[Any, int, int]] | None = None,
    sgd_form: str = "exact",
    progress: bool = False,
) -> AdamWInfluenceReview:
    """Scores, their top-k (raw and cosine) and self-influence; with `intervals` ((stage_id or None, lo, hi) per
    chosen checkpoint, as `weighting.checkpoint_intervals` gives) a second replay gathers each stored pair's
    contribution per interval.  `sgd_form` as in `adamw_influence`."""
    check_supported(training, sgd_form)
    spec = _params(training.model_factory(), layer, include_bias, params, loss_fn)
    _require_stepped(training, spec.names)
    train_ids = np.asarray(train_ids, dtype=np.int64)

    def interval_of_step(stage_id: int, step: int) -> int:
        for c, (stage, lo, hi) in enumerate(intervals or []):
            if (stage is None or stage == stage_id) and lo <= step < hi:
                return c
        return -1

    s = _sweep(
        training, spec, train_ids, test, interval_of_step=interval_of_step if intervals else None,
        track=bool(intervals), sgd_form=sgd_form, progress=progress,
    )  # fmt: skip
    cosine = s.scores / (s.test_sq * s.train_sq[None, :]).sqrt().clamp_min(1e-300)
    rev = AdamWInfluenceReview(
        _topk(s.scores, k), _topk(cosine, k), s.self_influence, s, len(intervals or [])
    )
    if not intervals:
        return rev
    pairs = rev.candidates()
    parts = torch.zeros(*pairs.shape, len(intervals), dtype=torch.float64)

    def gather(col: int, block: torch.Tensor) -> None:
        parts[:, :, col] += block.gather(1, pairs)

    assert s.test_grads is not None
    _sweep(
        training, spec, train_ids, test, interval_of_step=interval_of_step,
        split=(s.test_grads, s.propagators, gather), sgd_form=sgd_form, progress=progress,
    )  # fmt: skip
    rev._pairs, rev._parts = pairs, parts
    return rev


# ------------------------------------------------------------------------------------ reference and figures


def _functional_clip(grads: list[torch.Tensor], clip: dict[str, Any] | None) -> list[torch.Tensor]:
    if not clip:
        return grads
    if clip["rule"] == "value":
        c = float(clip["clip_value"])
        return [g.clamp(-c, c) for g in grads]
    p = float(clip["norm_type"])
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, p) for g in grads]), p)
    coef = (float(clip["max_norm"]) / (total + _CLIP_EPS)).clamp(max=1.0)
    return [g * coef for g in grads]


def _functional_step(
    kind: str, theta: torch.Tensor, g: torch.Tensor, state: dict[str, Any], hp: dict[str, Any]
) -> torch.Tensor:
    """One parameter's update by `kind`'s rule, written out (PyTorch's formulas); updates `state`."""
    lr, wd = float(hp["lr"]), float(hp.get("weight_decay", 0.0))
    if kind == "SGD":
        mu, damp = float(hp.get("momentum", 0.0)), float(hp.get("dampening", 0.0))
        if wd:
            g = g + wd * theta
        if mu:
            buf = state.get("momentum_buffer")
            buf = g if buf is None else mu * buf + (1 - damp) * g
            state["momentum_buffer"] = buf
            g = g + mu * buf if hp.get("nesterov") else buf
        return theta - lr * g
    beta1, beta2 = hp["betas"]
    if wd:
        if kind == "AdamW" or hp.get("decoupled_weight_decay"):
            theta = theta * (1 - lr * wd)
        else:
            g = g + wd * theta
    k = state.get("step", 0.0) + 1.0
    m = beta1 * state.get("exp_avg", torch.zeros_like(theta)) + (1 - beta1) * g
    v = beta2 * state.get("exp_avg_sq", torch.zeros_like(theta)) + (1 - beta2) * g * g
    state.update(step=k, exp_avg=m, exp_avg_sq=v)
    bc1, bc2 = 1 - beta1**k, 1 - beta2**k
    return theta - lr / bc1 * m / (v.sqrt() / math.sqrt(bc2) + float(hp["eps"]))


def unrolled_influence(
    training: Any,
    train_ids: np.ndarray,
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    held: bool = True,
    params: Sequence[str] | None = None,
    loss_fn: LossFn | None = None,
    weighted: Callable[[Any, int], bool] | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """−d ℓ(test, θ_T)/d w_z by autograd through the recorded steps written out as plain tensor code (PyTorch's
    SGD/Adam/AdamW formulas, clipping, per-step hyperparameters, fresh or carried optimizer state), in `dtype`:
    the brute-force reference for `adamw_influence` and the ground truth of its first-order error.

    w (ones, a leaf) weighs each training sample's term in every batch loss it is in (mean-loss scaling);
    `weighted(stage, step_index)` False leaves a step's batch unweighted.  `held`: each step's loss gradient is
    taken at the step's recorded parameters (its value is the recorded one; only w's own terms carry a
    derivative), and only the `params` (names; default all) carry the perturbation; the optimizer's state and
    updates carry it forward.  `held=False`: the full derivative, every later gradient re-evaluated at the
    perturbed parameters (curvature included), all parameters.  Cost: one unrolled graph of the whole run —
    tiny runs only.  Eval-mode forward passes, per-sample `loss_fn` (default cross-entropy).
    """
    fn = per_sample_loss(loss_fn)
    train_ids = np.asarray(train_ids, dtype=np.int64)
    model = training.model_factory().to(dtype)
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    carry = set(names) if params is None or not held else set(params)
    start = training.stages[0].start_model
    theta = {n: start[n].detach().to(dtype).clone() for n in names}
    buffers = {
        n: start.get(n, b).to(dtype) if b.is_floating_point() else start.get(n, b)
        for n, b in model.named_buffers()
    }
    w = torch.ones(len(train_ids) + 1, dtype=dtype, requires_grad=True)  # the last entry: samples not scored
    col = {int(z): c for c, z in enumerate(train_ids)}
    states: dict[str, dict[str, Any]] = {}
    for j, stage in enumerate(training.stages):
        if stage.fresh:
            states = {}
        elif j == 0:
            recorded = stage.start_optimizer["state"]
            states = {
                n: {
                    k: float(v) if k == "step" else v.detach().to(dtype).clone()
                    for k, v in recorded[i].items()
                    if v is not None
                }
                for n, i in zip(names, training.stepped_index(j), strict=True)
                if i in recorded
            }
        group_of = _group_of(training, j, names)
        stepped = [k for k, grp in enumerate(group_of) if grp is not None]  # what the clipping rule spans
        for n in training.replaced(j):  # re-initialised by the loop as this stage started: no sample's doing
            value = stage.start_model[n].detach()
            if n in theta:
                theta[n] = value.to(dtype).clone()
            elif n in buffers:
                buffers[n] = value.to(dtype) if value.is_floating_point() else value
        for i in range(stage.n_steps):
            xb, yb = training.batch(j, i)
            ids = np.asarray(stage.batches[i], dtype=np.int64)
            if weighted is None or weighted(stage, i):
                idx = torch.as_tensor([col.get(int(z), len(train_ids)) for z in ids])
                wb = torch.cat([w[:-1], torch.ones(1, dtype=dtype)])[idx]
            else:
                wb = torch.ones(len(ids), dtype=dtype)
            if held:
                at = {n: theta[n].detach().requires_grad_() for n in names}
            else:
                at = {n: t if t.requires_grad else t.requires_grad_() for n, t in theta.items()}
            out = functional_call(model, (at, buffers), (xb.to(dtype),))
            scale = _loss_weights(training, j, i)
            loss = (fn(out, yb) * wb).sum() / len(ids) if scale is None else (fn(out, yb) * wb * scale.to(dtype)).sum()
            grads = list(torch.autograd.grad(loss, [at[n] for n in names], create_graph=True))
            for k, g in zip(stepped, _functional_clip([grads[k] for k in stepped], stage.clip(i)), strict=True):
                grads[k] = g
            hps = stage.step_groups(i)
            new = {}
            for n, g, grp in zip(names, grads, group_of, strict=True):
                if grp is None:  # a parameter the stage did not step stays as it is
                    new[n] = theta[n]
                    continue
                if held and n not in carry:
                    g = g.detach()
                state = states.setdefault(n, {})
                new[n] = _functional_step(stage.optimizer, theta[n], g, state, hps[grp])
            theta = new
    x_te, y_te = test
    losses = fn(functional_call(model, (theta, buffers), (x_te.to(dtype),)), y_te)
    rows = [
        torch.autograd.grad(losses[e], w, retain_graph=True, allow_unused=True)[0] for e in range(len(x_te))
    ]
    return -torch.stack([torch.zeros_like(w) if r is None else r for r in rows])[:, :-1].detach()


def compare(estimate: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """How far a score matrix is from another: the largest entry-wise error relative to the largest |truth|,
    the relative Frobenius error, and Pearson and Spearman correlations over all entries."""
    a, b = estimate.double().reshape(-1), truth.double().reshape(-1)
    scale = float(b.abs().max()) or 1.0

    def ranks(x: torch.Tensor) -> torch.Tensor:
        r = torch.empty_like(x)
        r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
        return r

    def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x - x.mean(), y - y.mean()
        return float((x @ y) / (x.norm() * y.norm()).clamp_min(1e-300))

    return {
        "max_rel_error": float((a - b).abs().max()) / scale,
        "rel_frobenius": float((a - b).norm() / b.norm().clamp_min(1e-300)),
        "pearson": pearson(a, b),
        "spearman": pearson(ranks(a), ranks(b)),
    }


def first_order_gap(
    training: Any,
    layer: str,
    train_ids: np.ndarray,
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    include_bias: bool = True,
    params: Sequence[str] | None = None,
    loss_fn: LossFn | None = None,
    sgd_form: str = "exact",
) -> dict[str, Any]:
    """AdamW-influence of a tiny run against its two references (`unrolled_influence`, float64): `held` — the
    same quantity by autograd (its distance is numerical error) — and `full` — the true derivative of the final
    test losses, curvature included, all parameters (its distance is the first-order error of holding the
    gradients, plus what the parameters left out carry).  Each entry is `compare`'s figures."""
    spec = _params(training.model_factory(), layer, include_bias, params, loss_fn)
    train_ids = np.asarray(train_ids, dtype=np.int64)
    method = adamw_influence(
        training,
        layer,
        train_ids,
        test,
        include_bias=include_bias,
        params=params,
        loss_fn=loss_fn,
        sgd_form=sgd_form,
    )
    followed = None if sgd_form == "trajectory" else lambda stage, i: stage.optimizer != "SGD"
    held = unrolled_influence(
        training, train_ids, test, params=spec.names, loss_fn=loss_fn, weighted=followed
    )
    full = unrolled_influence(training, train_ids, test, held=False, loss_fn=loss_fn)
    return {
        "params": spec.names,
        "held": compare(method.propagated, held),
        "full": compare(method.scores, full),
        "scores": method,
        "reference_held": held,
        "reference_full": full,
    }
