"""Step-exact TracIn: the idealised form of Pruthi et al. (2020, eq. 1) along the recorded trajectory.

    score(test, z) = Σ_{t : z ∈ B_t} η_t / |B_t| · ∇ℓ(test, θ_t) · ∇ℓ(z, θ_t)

over every optimizer step t whose batch B_t held z (with multiplicity), θ_t the parameters the step's gradient
was taken at (before its update), η_t the rate the step applied to the scored parameters, and 1/|B_t| the
mean-loss scaling.  Each parameter's term is weighed by the rate of the param group its optimizer held it in
(a head trained ten times faster than the body weighs ten times more), zero where the step did not move it (a
frozen head; an optimizer over other parameters): Σ_p η_{t,p} ∇_p ℓ(test)·∇_p ℓ(z).  θ_t comes from replaying
the run (`fgtrac_core.stages.replay.Cursor`: the recorded batches, targets, per-step hyperparameters and
clipping, from the first stage's start checkpoint — bit-exact on the recording's kind of machine), so no
checkpoint stands in for another step's parameters.  It is the SGD form: for Adam(W)
stages each step still contributes η_t ∇ℓ_test·∇ℓ_z (no preconditioner or momentum; AdamW-influence is separate).

Gradients (`gradients`, taken in eval mode like the checkpoint modes):
  * ``last_layer`` (default): the last `nn.Linear` layer's, exact from the (δ, a) factors of
    `gradients.head_factors` (∇ℓ(z)·∇ℓ(z') = (δ·δ')(a·a' + 1), `include_bias=False` drops the + 1);
  * ``full``: every parameter's (or those `params` names), per sample by torch.func (vmap over grad) and
    reduced by the seeded random projection of the checkpoint-level `full` mode (`tracin._projection`, the same
    map for every step: orthonormal rows, so dot products are exact, when its dimension ≥ P; Gaussian
    Johnson–Lindenstrauss below, default dimension min(P, 1024)).
Streamed: per step the test set's and the batch's features are formed, dotted and added into one
(n_test, n_train) float64 score matrix (plus the same-shaped cosine denominators and the training samples'
self-influence), then dropped, so memory does not grow with the number of steps.  Cost per step, on top of the
replay itself: one forward/backward of the test set and the batch (``last_layer``), or their per-sample
gradients and projections, (n_test + |B_t|) · P · d multiply-adds (``full``).

Cosine view: score / √(Σ_{uses of z} w_t ‖∇ℓ(test, θ_t)‖² · Σ_{uses of z} w_t ‖∇ℓ(z, θ_t)‖²), w_t = η_t/|B_t|
(Cauchy–Schwarz with z's own weights: in [-1, 1]).  Per-interval contributions (`interval_of_step`, e.g. the
steps each chosen checkpoint stands for, as in usage weighting) are gathered for given pairs in a second pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fgtrac_core.errors import FgtracError
from fgtrac_core.influence.gradients import (
    Features,
    LossFn,
    Projection,
    head_factors,
    linear_layer,
    per_sample_gradients,
)
from fgtrac_core.influence.group_rates import folded
from fgtrac_core.influence.tracin import TopK, _merge_topk, _param_names, _projection

GRADIENTS = ("last_layer", "full")


@dataclass
class ExactScores:
    """The streamed sums of one pass over the trajectory."""

    scores: torch.Tensor  # (n_test, n_train) float64
    test_sq: torch.Tensor  # (n_test, n_train): Σ over z's uses of w_t ‖∇ℓ(test, θ_t)‖²
    self_influence: torch.Tensor  # (n_train,): Σ over z's uses of w_t ‖∇ℓ(z, θ_t)‖²
    n_steps: int
    seconds: float
    uses: int  # training-sample uses scored (uses of samples outside `train_ids` are left out)
    projection_dim: int | None = None  # full gradients: the projection's dimension d


def _columns(train_ids: np.ndarray) -> Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
    """ids -> (positions in the batch that are training samples, their columns)."""
    order = np.argsort(train_ids, kind="stable")
    ordered = train_ids[order]

    def cols(ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pos = np.searchsorted(ordered, ids).clip(0, len(ordered) - 1)
        hit = ordered[pos] == ids
        return torch.from_numpy(np.nonzero(hit)[0]), torch.from_numpy(order[pos[hit]])

    return cols


@dataclass
class StepGradients:
    """The per-sample gradient features a step's terms dot: the head's (δ, a) factors, or (with `names`) the
    named parameters' gradients reduced by `projection`."""

    layer: str
    include_bias: bool = True
    loss_fn: LossFn | None = None
    names: list[str] | None = None
    projection: Projection | None = None

    def __call__(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, scale: dict[str, torch.Tensor] | None = None
    ) -> Features:
        """The features of the samples (x, y) at the model's parameters; `scale` (dense features only) multiplies
        each named parameter's gradient before the projection (`rates`)."""
        if self.names is None:
            delta, act = head_factors(model, self.layer, (x, y), loss_fn=self.loss_fn)
            return Features(delta=delta, act=act)
        dev = next(model.parameters()).device
        g = per_sample_gradients(
            model, self.names, (x, y), loss_fn=self.loss_fn, scale=scale, reduce=self.projection, device=dev
        )
        return Features(dense=g)

    def rates(self, training: Any, j: int, i: int) -> tuple[float, float, dict[str, torch.Tensor] | None]:
        """(η, bias term, scale) of step i of stage j: η the largest rate the step applied to a scored parameter
        (0: it moved none of them), the head's bias term η_bias/η_weight (0 without a bias), and per named
        parameter √(η_p/η) to fold each one's own rate into both sides of the dot product (None: all equal)."""
        rate = dict(zip(training.param_names, (float(hp["lr"]) for hp in training.step_hparams(j, i)), strict=True))
        if self.names is None:
            eta = rate[f"{self.layer}.weight"]
            bias = rate.get(f"{self.layer}.bias", 0.0) / eta if eta and self.include_bias else 0.0
            return eta, bias, None
        eta, roots = folded([rate[n] for n in self.names])
        return eta, 0.0, None if roots is None else {n: torch.tensor(r) for n, r in zip(self.names, roots, strict=True)}


def step_gradients(
    model: torch.nn.Module,
    layer: str,
    gradients: str = "last_layer",
    *,
    include_bias: bool = True,
    params: str | Sequence[str] | None = None,
    projection_dim: int | None = None,
    seed: int = 0,
    loss_fn: LossFn | None = None,
) -> StepGradients:
    """The features of `gradients` (``last_layer`` | ``full``) for `model`'s architecture; one-line errors for an
    unknown kind, a missing head or parameters, or a projection too large, before any replay."""
    if gradients not in GRADIENTS:
        raise FgtracError(f"gradients must be one of {', '.join(GRADIENTS)}, not {gradients!r}")
    if gradients == "last_layer":
        linear_layer(model, layer)
        return StepGradients(layer, include_bias, loss_fn)
    names = _param_names(model, params)
    projection = _projection(model, names, projection_dim, seed, torch.device("cpu"))
    return StepGradients(layer, include_bias, loss_fn, names, projection)


def replay_steps(training: Any, progress: bool = False) -> Any:
    """Yield (stage index, step index in stage, model at θ_t, (x, y) of the batch) for every recorded step, then run
    the step.  The batch cache of `training` is emptied as it goes (memory stays flat).  A run exact replay
    refuses is refused first, and every step is checked against its recorded parameter fingerprint: scores from
    a trajectory that left the recorded one are never returned (ReplayMismatchError at the first such step)."""
    from fgtrac_core.stages.replay import INFLUENCE_REMEDY, Cursor, raise_if_diverged, require_replayable

    require_replayable(training, INFLUENCE_REMEDY)
    first = training.stages[0]
    cursor = Cursor(training, 0, first.start_model, None)
    cursor.check_fingerprints = True
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cursor.remaining, desc="exact TracIn", unit="step", leave=False)
    try:
        while not cursor.done:
            j, i = cursor.stage_index, cursor.step_index
            yield j, i, cursor.model, cursor.batch()
            cursor.step()
            raise_if_diverged(cursor, "no influence is reported")
            training._batch_cache.pop((j, i), None)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def exact_pass(
    training: Any,
    layer: str,
    train_ids: np.ndarray,
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    include_bias: bool = True,
    loss_fn: LossFn | None = None,
    gradients: str = "last_layer",
    params: str | Sequence[str] | None = None,
    projection_dim: int | None = None,
    seed: int = 0,
    interval_of_step: Callable[[int, int], int] | None = None,
    on_interval_end: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = False,
    features: StepGradients | None = None,
) -> ExactScores:
    """One streamed pass: the step-exact score matrix of `test` against the training samples `train_ids`.

    `gradients`: ``last_layer`` (the head `layer`, `include_bias`) or ``full`` (the parameters `params`, default
    all, projected to `projection_dim` with `seed`; see the module docstring).  `features`: those gradients
    already built by `step_gradients` (the options are then not read), so that passes share one projection.

    With `interval_of_step(stage_id, step) -> column` (−1: none) and `on_interval_end(column, block)`, the
    scores are also accumulated per interval: when the column changes (and at the end) the finished interval's
    (n_test, n_train) block is handed over and restarted at zero (one extra matrix, not one per interval).
    """
    t0 = time.perf_counter()
    train_ids = np.asarray(train_ids, dtype=np.int64)
    x_te, y_te = test
    grads = features or step_gradients(
        training.model_factory(), layer, gradients, include_bias=include_bias, params=params,
        projection_dim=projection_dim, seed=seed, loss_fn=loss_fn,
    )  # fmt: skip
    n_test, n_train = len(x_te), len(train_ids)
    scores = torch.zeros(n_test, n_train, dtype=torch.float64)
    test_sq = torch.zeros(n_test, n_train, dtype=torch.float64)
    self_inf = torch.zeros(n_train, dtype=torch.float64)
    block = torch.zeros(n_test, n_train, dtype=torch.float64) if on_interval_end is not None else None
    current = -1
    cols_of = _columns(train_ids)
    n_steps = uses = 0
    for j, i, model, (xb, yb) in replay_steps(training, progress):
        stage = training.stages[j]
        n_steps += 1
        ids = np.asarray(stage.batches[i], dtype=np.int64)
        if block is not None and interval_of_step is not None:
            col = interval_of_step(stage.stage_id, stage.steps[i])
            if col != current:
                if current >= 0:
                    on_interval_end(current, block)  # type: ignore[misc]
                block.zero_()
                current = col
        at, cols = cols_of(ids)
        eta, bias, scale = grads.rates(training, j, i)
        if len(cols) == 0 or eta == 0:  # no scored sample, or a step that did not move the scored parameters
            continue
        weight = _step_weights(training, j, i, at, eta)
        f_te, f_b = grads(model, x_te, y_te, scale), grads(model, xb[at], yb[at], scale)
        # the weight applied in float64, after the dot products, as the step's terms are summed
        part = f_te.add_dots(f_b, slice(None), bias, 1.0, None).double().mul_(weight)
        scores.index_add_(1, cols, part)
        if block is not None and current >= 0:
            block.index_add_(1, cols, part)
        t_sq = f_te.sq_norms(bias).double()[:, None] * weight  # a column per sample when weights differ
        test_sq.index_add_(1, cols, t_sq.expand(-1, len(cols)))
        self_inf.index_add_(0, cols, f_b.sq_norms(bias).double().mul_(weight))
        uses += len(cols)
    if block is not None and current >= 0:
        on_interval_end(current, block)  # type: ignore[misc]
    if n_steps == 0:
        raise FgtracError("the run has no recorded steps to replay")
    dim = None if grads.projection is None else int(grads.projection.matrix.shape[1])
    return ExactScores(scores, test_sq, self_inf, n_steps, time.perf_counter() - t0, uses, dim)


def _step_weights(training: Any, j: int, i: int, at: np.ndarray, lr: float) -> float | torch.Tensor:
    """`lr` times each sample's weight in the step's loss (`Training.sample_weights`), for the batch positions
    `at`: one number for a step of one batch (lr / B), per sample with gradient accumulation."""
    stage = training.stages[j]
    if stage.accumulation == 1:
        return lr / len(stage.batches[i])
    return torch.from_numpy(training.sample_weights(j, i)[at] * lr)


def _topk(matrix: torch.Tensor, k: int) -> TopK:
    empty = (torch.empty(len(matrix), 0, dtype=matrix.dtype), torch.empty(len(matrix), 0, dtype=torch.long))
    k = min(k, matrix.shape[1])
    hi = _merge_topk(empty, matrix, 0, k, largest=True)
    lo = _merge_topk(empty, matrix, 0, k, largest=False)
    return TopK(hi[1], hi[0], lo[1], lo[0])


@dataclass
class ExactReview:
    """What `run_influence` stores, like `tracin.Review`: top-k by raw score and cosine, self-influence, and per
    pair the contributions of each interval (`pair_detail`, from `add_contributions`)."""

    top: TopK
    top_cosine: TopK
    self_influence: torch.Tensor
    scores: ExactScores
    n_intervals: int
    checkpoint_weights: list[float] = field(default_factory=list)
    checkpoint_kappas: list[float] | None = None
    _pairs: torch.Tensor | None = None  # (n_test, m) candidate train columns
    _parts: torch.Tensor | None = None  # (n_test, m, n_intervals)

    def candidates(self) -> torch.Tensor:
        """(n_test, 4k) train columns of every stored pair (raw and cosine, proponents and opponents)."""
        t, c = self.top, self.top_cosine
        return torch.cat([t.proponent_indices, t.opponent_indices, c.proponent_indices, c.opponent_indices], 1)

    def pair_detail(
        self, test_idx: torch.Tensor, train_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.scores
        raw = s.scores[test_idx, train_idx]
        norm = (s.test_sq[test_idx, train_idx] * s.self_influence[train_idx]).sqrt().clamp_min(1e-300)
        if self._pairs is None or self._parts is None:
            parts = raw[..., None]
        else:  # locate each pair among its test row's candidates
            cand = self._pairs[test_idx]  # (..., m)
            pos = (cand == train_idx[..., None]).to(torch.int8).argmax(-1)
            parts = self._parts[test_idx, pos]  # (..., n_intervals)
        return raw, raw / norm, parts


def exact_review(
    training: Any,
    layer: str,
    train_ids: np.ndarray,
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    k: int,
    include_bias: bool = True,
    loss_fn: LossFn | None = None,
    gradients: str = "last_layer",
    params: str | Sequence[str] | None = None,
    projection_dim: int | None = None,
    seed: int = 0,
    intervals: Sequence[tuple[Any, int, int]] | None = None,
    progress: bool = False,
) -> ExactReview:
    """Step-exact scores, their top-k (raw and cosine) and self-influence; with `intervals` (per chosen
    checkpoint (stage_id or None, lo, hi), as `weighting.checkpoint_intervals` gives) a second replay gathers
    each stored pair's contribution per interval (they sum to the raw score when every step is covered).
    Gradient options as in `exact_pass`; both replays use the one set of features built here (a projection is
    a P x d matrix: built once, not per replay)."""
    features = step_gradients(
        training.model_factory(), layer, gradients, include_bias=include_bias, params=params,
        projection_dim=projection_dim, seed=seed, loss_fn=loss_fn,
    )  # fmt: skip
    how: dict[str, Any] = dict(features=features, progress=progress)
    s = exact_pass(training, layer, train_ids, test, **how)
    top = _topk(s.scores, k)
    cosine = s.scores / (s.test_sq * s.self_influence[None, :]).sqrt().clamp_min(1e-300)
    rev = ExactReview(top, _topk(cosine, k), s.self_influence, s, len(intervals or []))
    if not intervals:
        return rev
    pairs = rev.candidates()
    parts = torch.zeros(*pairs.shape, len(intervals), dtype=torch.float64)

    def interval_of_step(stage_id: int, step: int) -> int:
        for c, (stage, lo, hi) in enumerate(intervals):
            if (stage is None or stage == stage_id) and lo <= step < hi:
                return c
        return -1

    def gather(col: int, block: torch.Tensor) -> None:
        parts[:, :, col] = block.gather(1, pairs)

    exact_pass(training, layer, train_ids, test, interval_of_step=interval_of_step, on_interval_end=gather, **how)
    rev._pairs, rev._parts = pairs, parts
    return rev
