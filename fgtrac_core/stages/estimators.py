"""First-order estimates of theta_T - theta~_T, the displacement of the final parameters that skipping a stage
undoes, without replaying the later stages (or replaying only a few steps of them).

Every estimator returns one *stage embedding* E_k per stage: a parameter-shaped vector with
theta~_T ~= theta_T - E_k.  A behaviour's stage effect is then read off either linearly, SE_k ~= grad f(theta_T) . E_k
(one forward-mode pass per stage for the whole test set; a new example costs one gradient), or by evaluating f at
the estimated counterfactual, SE_k ~= f(theta_T) - f(theta_T - E_k) (`analyze(readout=...)`).  For the last stage all
estimators give E_K = theta_T - theta_{s_K} exactly, so the evaluated read-off is its exact effect.

  * `fast_embeddings`: curvature-free (H_t = 0) — the stage's change of parameters and of the optimizer state it
    leaves behind, carried to the end by the later steps' learning rates, weight decay, momentum and (frozen)
    Adam preconditioners; needs only the boundary checkpoints.
  * `propagated_embeddings`: the same linear recursion with the Hessian of every later batch (analytic HVPs), run
    forward on the recorded trajectory, one tangent per stage (cheapest when there are fewer stages than
    behaviour vectors); `propagated_adjoint` is the same linearisation swept backwards from grad f(theta_T) and
    read at every stage boundary (cheapest for few behaviour vectors).
  * `partial_replay_embeddings`: replay the first H steps after each stage exactly (recorded and skipped run
    side by side), then carry their difference to the end with the curvature-free map.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from fgtrac_core.derivatives import SECOND_ORDER, refuse_once_differentiable, requires
from fgtrac_core.stages import linearize as lin
from fgtrac_core.stages.linearize import Perturbation, StepPoint
from fgtrac_core.stages.replay import Cursor, check_final, recorded_cursor, skipped_cursor
from fgtrac_core.stages.training import StateDict, Training
from fgtrac_core.tracking.forward_seeds import reseed


@dataclass
class Embeddings:
    """E_k per stage (parameter name -> tensor, model.parameters() order) and the seconds it took to get them."""

    vectors: list[StateDict]
    seconds: float


def displacement(training: Training, k: int) -> Perturbation:
    """Delta_k: the stage's change of parameters, plus of optimizer state when stage k+1 continues that state."""
    names = training.param_names
    stage = training.stages[k]
    d = Perturbation([stage.end_model[n] - stage.start_model[n] for n in names])
    nxt = training.stages[k + 1] if k + 1 < training.n_stages else None
    if nxt is not None and not nxt.fresh:
        index = training.stepped_index(k)
        for key in lin.STATE_KEYS[stage.optimizer]:
            d.state[key] = [
                _state(stage.end_optimizer, i, key, p) - _state(stage.start_optimizer, i, key, p)
                for i, p in zip(index, d.param, strict=True)
            ]
    return d


def _state(opt_state: dict[str, Any], i: int | None, key: str, like: torch.Tensor) -> torch.Tensor:
    """The optimizer state `key` of the parameter at index `i` of a state_dict (zeros when there is none, or
    the optimizer did not step that parameter: i None)."""
    value = None if i is None else opt_state.get("state", {}).get(i, {}).get(key)
    return torch.zeros_like(like) if value is None else value


def _as_dict(training: Training, vectors: list[torch.Tensor]) -> StateDict:
    return dict(zip(training.param_names, vectors, strict=True))


def _last_stage(training: Training) -> StateDict:
    return _as_dict(training, displacement(training, training.n_stages - 1).param)


# ----------------------------------------------------------------------------------------------- fast


def schedule_point(training: Training, j: int, i: int) -> StepPoint:
    """The curvature-free Jacobian of step i of stage j, from the recorded schedule and boundary states alone.

    Adam's preconditioner sqrt(v)/sqrt(bc2) + eps is frozen at the stage's recorded end state (the only second
    moment the recorder keeps for a stage that started fresh); the step size eta / bc1 uses the step's own count.
    """
    stage = training.stages[j]
    hp = training.step_hparams(j, i)
    if stage.optimizer == "SGD":
        return StepPoint("SGD", hp, first=stage.fresh and i == 0)
    like = [stage.end_model[n] for n in training.param_names]
    denom = lin.adam_denominators(stage.end_optimizer["state"], hp, training.stepped_index(j), like)
    return StepPoint(stage.optimizer, hp, t=_step_count(stage.start_optimizer) + i + 1, denom=denom)


def _step_count(opt_state: dict[str, Any]) -> int:
    for entry in opt_state.get("state", {}).values():
        if "step" in entry:
            return int(torch.as_tensor(entry["step"]))
    return 0


def carry(training: Training, d: Perturbation, j: int, i: int) -> Perturbation:
    """Carry a perturbation at step i of stage j (before that step) to the end, curvature-free."""
    for jj in range(j, training.n_stages):
        stage = training.stages[jj]
        if jj > j:
            d = _enter(training, d, jj)  # a fresh optimizer forgets the state perturbation
        for ii in range(i if jj == j else 0, stage.n_steps):
            d = lin.forward(schedule_point(training, jj, ii), d)
    return d


def fast_embeddings(training: Training) -> Embeddings:
    """E_k = the stage's displacement carried to the end by the later stages' curvature-free step maps."""
    t0 = time.perf_counter()
    out = []
    with torch.no_grad():
        for k in range(training.n_stages - 1):
            d = _enter(training, displacement(training, k), k + 1)
            out.append(_as_dict(training, carry(training, d, k + 1, 0).param))
        out.append(_last_stage(training))
    return Embeddings(out, time.perf_counter() - t0)


def _enter(training: Training, d: Perturbation, j: int) -> Perturbation:
    """The perturbation as stage j starts: its optimizer-state part survives only if stage j continues it, and
    none of it in the parameters the loop replaced as stage j started (`Training.replaced`: taken at their
    recorded values whatever came before).  Rows of a batched perturbation are treated alike."""
    replaced = set(training.replaced(j))
    if replaced:
        names = training.param_names
        d = Perturbation(
            [torch.zeros_like(p) if n in replaced else p for n, p in zip(names, d.param, strict=True)], d.state
        )
    return d if not training.stages[j].fresh else Perturbation(d.param)


# ----------------------------------------------------------------------------------------------- propagated


# what runs where torch has no second derivatives of the model (`fgtrac_core.derivatives`)
HVP_FREE = "--method replay, fast and partial-replay do not need them"


def hvp_at(cursor: Cursor) -> lin.Hvp:
    """u -> H_t u for the step `cursor` runs next: analytic double backward of its batch's training loss (with
    gradient accumulation, of the loss its micro-batches' backward passes summed, `Training.step_loss`).

    The parameters are copied now, so the product can be taken after the optimizer step has moved them.
    """
    model = cursor.model
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().clone() for p in cursor.params]
    buffers = {n: b for n, b in model.named_buffers()}
    x, y = cursor.batch()
    training, at_stage, at_step = cursor.training, cursor.stage_index, cursor.step_index

    def hvp(u: lin.Vectors) -> lin.Vectors:
        params = [t.clone().requires_grad_() for t in theta]
        with torch.enable_grad(), requires(SECOND_ORDER, "the propagated estimator", HVP_FREE):
            # buffers cloned: a training-mode forward updates BatchNorm's running statistics in place, and this one
            # is not a training step (the cursor's own model must keep the recorded trajectory's buffers)
            state = {**{n: b.clone() for n, b in buffers.items()}, **dict(zip(names, params, strict=True))}
            seeds = training.stages[at_stage].seeds
            with torch.random.fork_rng(devices=[]):
                if seeds and seeds[at_step]:  # the step's dropout masks (of its first forward), not fresh ones
                    reseed(seeds[at_step][0])
                out = functional_call(model, state, (x,))
            loss = training.step_loss(out, y, at_stage, at_step)
            refuse_once_differentiable(loss)
            # a parameter this batch does not reach (a branch the forward skips) has zero gradient and curvature
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
            live = [i for i, g in enumerate(grads) if g.requires_grad]

            def h_times(v: lin.Vectors, retain: bool) -> list[torch.Tensor]:
                hv = torch.autograd.grad(
                    [grads[i] for i in live], params, grad_outputs=[v[i] for i in live], retain_graph=retain,
                    allow_unused=True, materialize_grads=True,
                )  # fmt: skip
                return [h.detach() for h in hv]

            if u[0].dim() == theta[0].dim():
                return h_times(u, retain=False)
            rows = [h_times([v[b] for v in u], retain=True) for b in range(u[0].shape[0])]
            return [torch.stack(col) for col in zip(*rows, strict=True)]

    return hvp


def live_step(cursor: Cursor, adam_mode: str) -> StepPoint:
    """Run the cursor's next recorded step and return that step's Jacobian (with curvature) on the trajectory."""
    training, j = cursor.training, cursor.stage_index
    stage = training.stages[j]
    hp = training.step_hparams(j, cursor.step_index)
    assert cursor.optimizer is not None
    stepped = [p for p, k in zip(cursor.params, training.stepped_index(j), strict=True) if k is not None]
    first = stage.optimizer == "SGD" and "momentum_buffer" not in cursor.optimizer.state.get(
        stepped[0] if stepped else None, {}
    )
    theta = [p.detach().clone() for p in cursor.params]
    point = StepPoint(stage.optimizer, hp, first=first, hvp=hvp_at(cursor), adam_mode=adam_mode)
    if stage.optimizer != "SGD":
        moved = [k is not None for k in training.stepped_index(j)]
        cursor.step(observe=lambda opt: _observe_adam(point, opt, cursor.params, theta, moved))
    else:
        cursor.step()
    return point


def _observe_adam(
    point: StepPoint,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    theta: lin.Vectors,
    moved: list[bool],
) -> None:
    """Fill an Adam step's Jacobian data from the optimizer right after its step (before any stage change).  A
    parameter it did not step (`moved` false) has no moments: zero ones and denominator 1 (its lr is 0)."""
    st = [
        optimizer.state[p] if m else {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        for p, m in zip(params, moved, strict=True)
    ]
    point.t = next((int(torch.as_tensor(s["step"])) for s, m in zip(st, moved, strict=True) if m), 1)
    point.denom = [
        s["exp_avg_sq"].sqrt() / (1 - h["betas"][1] ** point.t) ** 0.5 + h["eps"] if m else torch.ones_like(p)
        for s, h, m, p in zip(st, point.hp, moved, params, strict=True)
    ]
    if point.adam_mode == "full":
        decoupled = [h.get("decoupled_weight_decay", point.optimizer == "AdamW") for h in point.hp]
        point.exp_avg = [s["exp_avg"].clone() for s in st]
        point.exp_avg_sq = [s["exp_avg_sq"].clone() for s in st]
        # the gradient that entered the moments includes coupled weight decay
        point.grad = [
            p.grad.detach() + (0.0 if dec else h["weight_decay"]) * th if m else torch.zeros_like(p)
            for p, h, th, dec, m in zip(params, point.hp, theta, decoupled, moved, strict=True)
        ]


def propagated_embeddings(training: Training, adam_mode: str = "full", bar: Any = None) -> Embeddings:
    """E_k = J Delta_k with J the Jacobian of all later steps (with curvature), by one forward sweep of tangents.

    Replays the recorded run from the start of the second stage (the trajectory the Jacobian is taken on) and
    checks that it ends at theta_T bit for bit.
    """
    t0 = time.perf_counter()
    n = training.n_stages
    rows: list[lin.Vectors] = []
    if n > 1:
        cursor = recorded_cursor(training, 0)
        tangents: Perturbation | None = None
        added = 0  # stage k's tangent enters at the first step after it
        while not cursor.done:
            j = cursor.stage_index
            if cursor.step_index == 0:
                if tangents is not None:
                    tangents = _enter(training, tangents, j)
                for k in range(added, j):
                    new = _batched(_enter(training, displacement(training, k), j))
                    tangents = new if tangents is None else _cat(tangents, new)
                added = j
            assert tangents is not None
            point = live_step(cursor, adam_mode)
            with torch.no_grad():
                tangents = lin.forward(point, tangents)
            if bar is not None:
                bar.update(1)
        check_final(training, cursor.model_state())
        if tangents is not None:
            rows = [[t[k] for t in tangents.param] for k in range(added)]
        # stages followed only by stages without steps: nothing later moves their displacement
        rows += [displacement(training, k).param for k in range(added, n - 1)]
    out = [_as_dict(training, r) for r in rows]
    out.append(_last_stage(training))
    return Embeddings(out, time.perf_counter() - t0)


def _batched(d: Perturbation) -> Perturbation:
    return Perturbation([p[None] for p in d.param], {k: [v[None] for v in vs] for k, vs in d.state.items()})


def _cat(a: Perturbation, b: Perturbation) -> Perturbation:
    """Stack two batches of perturbations (a state missing on one side is zero there)."""
    keys = set(a.state) | set(b.state)
    return Perturbation(
        [torch.cat([x, y]) for x, y in zip(a.param, b.param, strict=True)],
        {key: [torch.cat([x, y]) for x, y in zip(a.get(key), b.get(key), strict=True)] for key in keys},
    )


# ----------------------------------------------------------------------------------------------- partial replay


def partial_replay_embeddings(training: Training, horizon: int, bar: Any = None) -> Embeddings:
    """E_k from replaying the first `horizon` steps after stage k exactly (recorded and skipped side by side),
    then carrying the difference to the end curvature-free.  A horizon covering all later steps is exact replay.

    The carried difference is the parameters' and, mid-way through an SGD stage, the momentum buffer's; a
    difference of Adam moments is dropped (the two runs are assumed to take the same Adam updates from the
    horizon on): linearising m / sqrt(v) around one run divides the other run's moments by this run's second
    moments, which can be near zero, and on the sample run that blew the estimates up to losses of 1e10.
    """
    t0 = time.perf_counter()
    out = []
    names = training.param_names
    for k in range(training.n_stages - 1):
        real, skipped = recorded_cursor(training, k), skipped_cursor(training, k)
        real.run(horizon, bar)
        skipped.run(horizon, bar)
        with torch.no_grad():
            d = Perturbation(
                [real.params[i].detach() - skipped.params[i].detach() for i in range(len(names))]
            )
            if not real.done:
                d.state = _momentum_difference(real, skipped)
                d = carry(training, d, real.stage_index, real.step_index)
        out.append(_as_dict(training, d.param))
    out.append(_last_stage(training))
    return Embeddings(out, time.perf_counter() - t0)


def _momentum_difference(real: Cursor, skipped: Cursor) -> dict[str, lin.Vectors]:
    """The SGD momentum buffers' difference between the two runs (zero before a fresh optimizer's first step)."""
    assert real.optimizer is not None and skipped.optimizer is not None
    if not isinstance(real.optimizer, torch.optim.SGD):
        return {}
    zero = torch.zeros_like
    return {
        "momentum_buffer": [
            real.optimizer.state.get(p, {}).get("momentum_buffer", zero(p)).detach()
            - skipped.optimizer.state.get(q, {}).get("momentum_buffer", zero(q)).detach()
            for p, q in zip(real.params, skipped.params, strict=True)
        ]
    }


# ----------------------------------------------------------------------------------------------- adjoint


def propagated_adjoint(
    training: Training, adjoints: lin.Vectors, adam_mode: str = "full", bar: Any = None
) -> tuple[np.ndarray, float]:
    """grad f(theta_T)^T J Delta_k for every stage but the last, by one backward adjoint sweep.

    `adjoints` are grad f(theta_T) for B behaviour vectors (one tensor (B, *param.shape) per parameter).  The
    recorded trajectory from the second stage on is replayed once (checked against theta_T), its step Jacobians
    kept, then swept backwards with one batch of HVPs per step; the adjoint is read off at every stage boundary.
    Returns the (stages - 1, B) linear effects and the seconds taken.  Same linearisation as
    `propagated_embeddings` with the linear read-off; cheaper when B is smaller than the number of stages.
    """
    t0 = time.perf_counter()
    n = training.n_stages
    out = np.zeros((max(n - 1, 0), adjoints[0].shape[0]))
    if n < 2:
        return out, time.perf_counter() - t0
    cursor = recorded_cursor(training, 0)
    points: dict[int, list[StepPoint]] = {j: [] for j in range(1, n)}
    while not cursor.done:
        j = cursor.stage_index
        points[j].append(live_step(cursor, adam_mode))
        if bar is not None:
            bar.update(1)
    check_final(training, cursor.model_state())
    a = Perturbation(list(adjoints))
    with torch.no_grad():
        for j in range(n - 1, 0, -1):
            for point in reversed(points.pop(j)):
                a = lin.transpose(point, a)
            d = _enter(training, displacement(training, j - 1), j)
            out[j - 1] = _dot(a, d)
            # a fresh optimizer ignored the state it was handed, and the parameters the loop replaced as stage
            # j started do not depend on anything before
            a = _enter(training, a, j)
    return out, time.perf_counter() - t0


def _dot(a: Perturbation, d: Perturbation) -> np.ndarray:
    """<a_b, d> for every row b of the batched adjoint `a` (parameters and optimizer state)."""
    total = sum((x * y).flatten(1).sum(1) for x, y in zip(a.param, d.param, strict=True))
    for key, values in d.state.items():
        total = total + sum((x * y).flatten(1).sum(1) for x, y in zip(a.get(key), values, strict=True))
    return total.double().numpy()
