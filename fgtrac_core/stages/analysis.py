"""`analyze`: which training stage is accountable for a behaviour, per test example and per slice.

The stage effect of stage k on a behaviour f is SE_k = f(theta_T) - f(theta~_T), where theta~_T skips stage k
(parameters and optimizer state restored to their values at its start) and replays the later stages with the same
batches and per-step learning rates.  Positive: the stage raised f (for ``loss``: made the example's loss worse).
The last stage's effect is exact without replay: f(theta_T) - f(theta_{s_K}).

Methods: ``replay`` (exact, after checking that replaying the whole run reproduces theta_T bit for bit),
``fast``, ``propagated`` and ``partial-replay`` (first-order estimates, `estimators.py`).  Results are pandas
DataFrames whose columns are those of the `stage_effects`, `stage_aggregates` and `stage_faithfulness` tables
minus `row_id` and `analysis_id`; this module writes nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fgtrac_core.budget import DEFAULT_BUDGET_S, CostEstimate, enforce, seconds_per_step
from fgtrac_core.errors import UnsupportedDerivativeError
from fgtrac_core.ledger.entries import ENTRY_KINDS
from fgtrac_core.pipeline import Pipeline, loss_description
from fgtrac_core.stages import behaviours as beh
from fgtrac_core.stages import estimators as est
from fgtrac_core.stages import faithfulness as faith
from fgtrac_core.stages._records import load_training
from fgtrac_core.stages.errors import StageAnalysisError
from fgtrac_core.stages.linearize import ADAM_MODES
from fgtrac_core.stages.replay import Cursor, deterministic, replay_full, replay_without, require_replayable
from fgtrac_core.stages.replay_match import require_tolerance
from fgtrac_core.stages.training import StateDict, Training, cross_entropy
from fgtrac_core.store.reader import RunStore

METHODS = ("replay", "fast", "propagated", "partial-replay")
READOUTS = ("evaluated", "linear")
DEFAULT_HORIZON = 20
COMPARE_HORIZONS = (1, 5, 20, 50, 100, 120)

# the result tables' columns, minus the row_id and analysis_id the recorder assigns
EFFECT_COLUMNS, AGGREGATE_COLUMNS, FAITHFULNESS_COLUMNS = (
    list(ENTRY_KINDS[kind][1][2:]) for kind in ("stage_effect", "stage_aggregate", "stage_faithfulness")
)


@dataclass
class StageAnalysis:
    """The result of `analyze`: rows for the stage_effects / stage_aggregates / stage_faithfulness tables.

    `effects.value` is SE_k in the behaviour's units (loss: nats; margin: logits); `aggregates.value` the slice
    mean of it, or for behaviour ``accuracy`` the stage's effect on the slice's accuracy (a fraction); `n` the
    slice size.  `faithfulness` holds, per method and stage (stage_id None = pooled), the agreement with replay
    when it was measured (compare=True), else only the method's cost and its proxy `confidence`.
    `checkpoint_ids` are the recorded checkpoints read; `seconds` the wall time of the whole analysis.
    """

    effects: pd.DataFrame
    aggregates: pd.DataFrame
    faithfulness: pd.DataFrame
    params: dict[str, Any]
    checkpoint_ids: list[int]
    seconds: float


@dataclass
class _Job:
    """One estimate to compute: a method (with horizon) and the read-offs wanted from its embeddings."""

    kind: str
    horizon: int | None = None
    readouts: tuple[str, ...] = ("evaluated",)
    label: str | None = None  # the method name in the tables, when it must tell variants apart

    @property
    def name(self) -> str:
        return self.label or self.kind


@dataclass
class _Result:
    """One method's effects: behaviour -> (stages, examples) array, and its cost."""

    method: str
    horizon: int | None
    effects: dict[str, np.ndarray]
    seconds: float


@dataclass
class _Context:
    """What every method's read-off shares: the model, the test set, f(theta_T) and the slices."""

    training: Training
    fns: dict[str, beh.BehaviourFn]
    model: torch.nn.Module = field(init=False)
    x: torch.Tensor = field(init=False)
    y: torch.Tensor = field(init=False)
    at_final: dict[str, np.ndarray] = field(init=False)
    slices: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        # behaviours are test-time values: in eval mode (BatchNorm's running statistics, no dropout), which also
        # keeps a forward pass from updating the recorded states' BatchNorm buffers in place
        self.model = self.training.model_factory().eval()
        self.x, self.y = self.training.test_set()
        self.at_final = self.values(self.training.final_model)
        self.slices = beh.slices(self.y.numpy(), self.at_final["margin"] > 0)

    def values(self, state: StateDict) -> dict[str, np.ndarray]:
        return beh.evaluate(self.model, state, self.x, self.y, self.fns)

    def exact(self, counterfactual: StateDict) -> dict[str, np.ndarray]:
        """f(theta_T) - f(counterfactual) for every behaviour."""
        other = self.values(counterfactual)
        return {n: self.at_final[n] - other[n] for n in self.fns}


def analyze(
    run_dir: str | Path,
    *,
    method: str = "replay",
    horizon: int | None = None,
    compare: bool = False,
    behaviours: Sequence[str] = ("loss",),
    budget_s: float = DEFAULT_BUDGET_S,
    force: bool = False,
    progress: bool | None = None,
    readout: str = "evaluated",
    adam: str = "full",
    pipeline: Pipeline | None = None,
    on_estimate: Callable[[CostEstimate], None] | None = None,
    tolerance: float = 0.0,
) -> StageAnalysis:
    """Per-stage effects of the run in `run_dir` on each test example, with aggregates and faithfulness.

    method: ``replay`` | ``fast`` | ``propagated`` | ``partial-replay`` (replays `horizon` steps after each stage,
    default 20).  compare=True computes replay and every estimator (partial-replay at COMPARE_HORIZONS, as
    methods ``partial-replay:H``, and the linear read-offs of fast and propagated as ``fast:linear`` /
    ``propagated:linear``) and measures each against replay on the first behaviour.  readout: ``evaluated`` (f(theta_T) - f(theta_T - E_k)) or
    ``linear`` (grad f(theta_T) . E_k) for the estimators.  adam: ``full`` or ``frozen`` preconditioner in the
    propagated Jacobian of Adam steps.  The estimated cost of the replay work is computed first (and printed to
    stderr with the progress bar); above `budget_s` seconds the analysis is refused unless `force`.  progress:
    show a bar on stderr (None: only when stderr is a terminal).  pipeline: the run's model and inputs (default:
    the one its config names, see `fgtrac_core.pipeline.load_pipeline`).  on_estimate: called with the cost
    estimate before any replay starts (and before a refusal), e.g. for the CLI to print it.  tolerance: how
    closely replay must reproduce the recorded parameters, as a relative difference (0: bit for bit; see
    `fgtrac_core.stages.replay_match`); the largest difference accepted is stored as ``replay_deviation``.
    """
    t_start = time.perf_counter()
    behaviours = tuple(behaviours)
    fns = beh.resolve(behaviours)
    _check_options(method, horizon, readout, adam)
    require_tolerance(tolerance)
    show = sys.stderr.isatty() if progress is None else progress
    with RunStore(run_dir) as store:
        records = load_training(store, pipeline, tolerance=tolerance)
        unfinished = store.incomplete_stages()
    training = records.training
    refusal = training.replay_refusal()
    if method == "replay" or compare:
        require_replayable(training)  # now, not after the estimators' minutes
    if method != "replay" or compare:
        unmodelled = training.linearisation_refusal()
        if unmodelled is not None:
            raise StageAnalysisError(f"{unmodelled}; --method replay (exact replay) supports it")
    fns = {**fns, "margin": beh.BEHAVIOURS["margin"]}  # accuracy aggregates are read from the margin
    with deterministic(records.config.get("torch_threads")):
        jobs, not_run, per_hvp = _runnable(_plan(method, horizon, compare, readout), training, compare)
        n_vectors = len(training.test_ids) * len(fns)
        estimate = _estimate_cost(training, jobs, n_vectors, per_hvp)
        if on_estimate is not None:
            on_estimate(estimate)
        enforce(estimate, budget_s, force, "stage analysis")
        bar = tqdm(
            total=estimate.steps,
            desc="stage analysis",
            unit="step",
            file=sys.stderr,
            disable=not show,
            leave=False,
        )
        if show:
            bar.write(estimate.line(), file=sys.stderr)
        try:
            context = _Context(training, fns)
            results = [r for job in jobs for r in _run(job, context, adam, n_vectors, bar)]
        finally:
            bar.close()
    reference = next((r for r in results if r.method == "replay"), None)
    faithfulness = _faithfulness(results, reference, context, behaviours[0], compare)
    params = {
        "method": method,
        "horizon": _horizon(method, horizon),
        "compare": compare,
        "compare_horizons": list(COMPARE_HORIZONS) if compare else None,
        "behaviours": list(behaviours),
        "faithfulness_behaviour": behaviours[0],
        "readout": readout,
        "training_loss": loss_description(training.loss_fn, default=cross_entropy),
        "adam_preconditioner": adam,
        "budget_s": budget_s,
        "force": force,
        "estimated_seconds": round(estimate.seconds, 3),
        "replay_verified": reference is not None and training.n_stages > 1,
        "replay_tolerance": tolerance,
        # the largest relative difference from the recorded parameters a replay was accepted with (0.0: every
        # replay that was checked reproduced them bit for bit)
        "replay_deviation": training.deviation,
        **_verification(reference is not None, refusal, unfinished, method),
        "test_split": "test",
        "n_test": len(training.test_ids),
        "torch_threads": records.config.get("torch_threads"),
        "torch_version": torch.__version__,
        "checkpoints": [vars(c) for c in records.checkpoints],
        # per method --compare could not run on this model, why (the propagated estimator without second
        # derivatives: `fgtrac_core.derivatives`)
        "not_run": not_run,
        # per stage, what the loop replaced as it started (a new head): at its recorded values in every replay
        "replaced": {
            s.name: training.replaced(j) for j, s in enumerate(training.stages) if training.replaced(j)
        },
    }
    return StageAnalysis(
        effects=_effects_table(results, context, behaviours),
        aggregates=_aggregates_table(results, context, behaviours),
        faithfulness=faithfulness,
        params=params,
        checkpoint_ids=sorted({int(c.checkpoint_id) for c in records.checkpoints}),
        seconds=time.perf_counter() - t_start,
    )


def _verification(
    replayed: bool, refusal: str | None, unfinished: list[tuple[str, str]], method: str
) -> dict[str, Any]:
    """`verified`: the effects come from (or were checked against) an exact replay that reproduced the recorded
    final parameters bit for bit (or within the tolerance asked: ``replay_deviation`` says by how much), of a run
    whose stages all finished; else `verified_reason` says why not."""
    reasons = [f"stage {name!r} is {status}: the run is incomplete" for name, status in unfinished]
    if refusal is not None:
        reasons.append(f"exact replay is refused: {refusal}")
    elif not replayed:
        reasons.append(f"{method} is an estimate; exact replay was not run (run --method replay or --compare)")
    return {"verified": not reasons, "verified_reason": "; ".join(reasons) or None}


def _check_options(method: str, horizon: int | None, readout: str, adam: str) -> None:
    if method not in METHODS:
        raise StageAnalysisError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if readout not in READOUTS:
        raise StageAnalysisError(f"unknown read-off {readout!r}; choose from {', '.join(READOUTS)}")
    if adam not in ADAM_MODES:
        raise StageAnalysisError(
            f"unknown Adam preconditioner mode {adam!r}; choose from {', '.join(ADAM_MODES)}"
        )
    if horizon is not None and (method != "partial-replay" or horizon < 0):
        raise StageAnalysisError("a horizon (>= 0 steps) applies to method partial-replay only")


def _horizon(method: str, horizon: int | None) -> int | None:
    return (DEFAULT_HORIZON if horizon is None else horizon) if method == "partial-replay" else None


def _plan(method: str, horizon: int | None, compare: bool, readout: str) -> list[_Job]:
    if compare:
        return [
            _Job("replay"),
            _Job("fast", readouts=READOUTS),
            _Job("propagated", readouts=READOUTS),
            *(_Job("partial-replay", h, label=f"partial-replay:{h}") for h in COMPARE_HORIZONS),
        ]
    return [_Job(method, _horizon(method, horizon), (readout,))]


def _runnable(
    jobs: list[_Job], training: Training, compare: bool
) -> tuple[list[_Job], dict[str, str], float | None]:
    """With `compare`, `jobs` less those the model cannot run, and why, per method: the propagated estimator needs
    second derivatives, probed by one HVP at a recorded step (its seconds are the third item, for the cost
    estimate; None when no HVP was taken).  Without, the one method asked for is refused instead
    (`UnsupportedDerivativeError`, one line)."""
    if training.n_stages < 2 or not any(job.kind == "propagated" for job in jobs):
        return jobs, {}, None
    try:
        per_hvp = _hvp_seconds(_probe_cursor(training))
    except UnsupportedDerivativeError as exc:
        if not compare:
            raise
        return [job for job in jobs if job.kind != "propagated"], {"propagated": str(exc)}, None
    return jobs, {}, per_hvp


def _estimate_cost(
    training: Training, jobs: Sequence[_Job], n_vectors: int, per_hvp: float | None = None
) -> CostEstimate:
    """Time a few recorded steps (and one HVP, unless `per_hvp` was measured already) and scale by the steps and
    HVPs the jobs will run."""
    steps = hvps = 0
    n = training.n_stages
    after = [training.steps_after(k) for k in range(n)]
    for job in jobs:
        if job.kind == "replay" and n > 1:
            steps += sum(s.n_steps for s in training.stages) + sum(after)
        elif job.kind == "propagated" and n > 1:
            steps += after[0]
            hvps += after[0] * n_vectors if _use_adjoint(job, n, n_vectors) else sum(after[:-1])
        elif job.kind == "partial-replay":
            steps += 2 * sum(min(job.horizon or 0, a) for a in after[:-1])
    per_step = timed_hvp = 0.0
    if steps or hvps:
        per_step, timed_hvp = _time_steps(training, probe_hvp=hvps > 0 and per_hvp is None)
    return CostEstimate(steps, hvps, per_step, timed_hvp if per_hvp is None else per_hvp)


def _time_steps(training: Training, probe_hvp: bool) -> tuple[float, float]:
    """Seconds per optimizer step (median of three, after two untimed) and per HVP, on the recorded run's steps."""
    cursor = _probe_cursor(training)
    per_step = seconds_per_step(cursor)
    return per_step, _hvp_seconds(cursor) if probe_hvp else 0.0


def _probe_cursor(training: Training) -> Cursor:
    """A cursor at the start of the second stage (the first of a one-stage run), or of the first with steps."""
    k = 0 if training.n_stages == 1 else 1
    if training.stages[k].n_steps == 0:
        k = next((j for j, s in enumerate(training.stages) if s.n_steps), 0)
    return Cursor(training, k, training.stages[k].start_model, None)


def _hvp_seconds(cursor: Cursor) -> float:
    """Seconds one HVP takes at the cursor's next step (0 when it has none)."""
    if cursor.done:
        return 0.0
    hvp = est.hvp_at(cursor)
    t0 = time.perf_counter()
    hvp([p.detach() for p in cursor.params])
    return time.perf_counter() - t0


def _use_adjoint(job: _Job, n_stages: int, n_vectors: int) -> bool:
    """The backward sweep costs one HVP per behaviour vector and step, the forward one per stage and step."""
    return job.readouts == ("linear",) and n_vectors < n_stages - 1


def _run(job: _Job, ctx: _Context, adam: str, n_vectors: int, bar: Any) -> list[_Result]:
    training = ctx.training
    if job.kind == "replay":
        return [_replay(ctx, bar)]
    if job.kind == "propagated" and _use_adjoint(job, training.n_stages, n_vectors):
        return [_adjoint(ctx, adam, bar)]
    if job.kind == "fast":
        emb = est.fast_embeddings(training)
    elif job.kind == "propagated":
        emb = est.propagated_embeddings(training, adam, bar)
    else:
        emb = est.partial_replay_embeddings(training, job.horizon or 0, bar)
    out = []
    for readout in job.readouts:
        t0 = time.perf_counter()
        effects = _read(ctx, emb.vectors, readout)
        name = job.name if readout == "evaluated" or len(job.readouts) == 1 else f"{job.name}:{readout}"
        out.append(_Result(name, job.horizon, effects, emb.seconds + time.perf_counter() - t0))
    return out


def _replay(ctx: _Context, bar: Any) -> _Result:
    """Exact effects: check the whole replay against theta_T, then replay once per skipped stage."""
    training = ctx.training
    t0 = time.perf_counter()
    if training.n_stages > 1:
        replay_full(training, bar)
    per_stage = [ctx.exact(replay_without(training, k, bar).model) for k in range(training.n_stages)]
    return _Result("replay", None, _stack(per_stage, ctx), time.perf_counter() - t0)


def _adjoint(ctx: _Context, adam: str, bar: Any) -> _Result:
    """Linear read-off of the propagated estimate by the backward adjoint sweep (few behaviour vectors)."""
    training = ctx.training
    t0 = time.perf_counter()
    names = list(ctx.fns)
    grads = [beh.gradients(ctx.model, training.final_model, ctx.x, ctx.y, ctx.fns[n]) for n in names]
    stacked = [torch.cat(per_param) for per_param in zip(*grads, strict=True)]
    linear, _ = est.propagated_adjoint(training, stacked, adam, bar)
    n = len(training.test_ids)
    last = ctx.exact(_minus(training.final_model, est.fast_embeddings(training).vectors[-1]))
    effects = {
        name: np.vstack([linear[:, i * n : (i + 1) * n], last[name][None]]) for i, name in enumerate(names)
    }
    return _Result("propagated", None, effects, time.perf_counter() - t0)


def _minus(state: StateDict, e: StateDict) -> StateDict:
    return {k: v - e[k] if k in e else v for k, v in state.items()}


def _read(ctx: _Context, vectors: list[StateDict], readout: str) -> dict[str, np.ndarray]:
    """Stage effects from embeddings; the last stage always exactly (its embedding is exact)."""
    last = len(vectors) - 1
    per_stage = []
    for k, e in enumerate(vectors):
        if readout == "evaluated" or k == last:
            per_stage.append(ctx.exact(_minus(ctx.training.final_model, e)))
        else:
            per_stage.append(beh.directional(ctx.model, ctx.training.final_model, e, ctx.x, ctx.y, ctx.fns))
    return _stack(per_stage, ctx)


def _stack(per_stage: list[dict[str, np.ndarray]], ctx: _Context) -> dict[str, np.ndarray]:
    return {n: np.vstack([s[n] for s in per_stage]) for n in ctx.fns}


def _slice_means(values: np.ndarray, ctx: _Context) -> np.ndarray:
    """(stages, slices) means of (stages, examples) values over each slice."""
    return np.stack(
        [values[:, mask].sum(1) / max(int(mask.sum()), 1) for mask in ctx.slices.values()], axis=1
    )


def _accuracy_effect(margin_effects: np.ndarray, ctx: _Context) -> np.ndarray:
    """(stages, slices) accuracy(theta_T) - accuracy(theta~_T), an example being right while its margin > 0."""
    final = ctx.at_final["margin"] > 0
    counter = (ctx.at_final["margin"][None] - margin_effects) > 0
    sizes = [max(int(mask.sum()), 1) for mask in ctx.slices.values()]
    return np.stack(
        [
            (final[mask].sum() - counter[:, mask].sum(1)) / n
            for mask, n in zip(ctx.slices.values(), sizes, strict=True)
        ],
        axis=1,
    )


def _effects_table(results: list[_Result], ctx: _Context, behaviours: tuple[str, ...]) -> pd.DataFrame:
    stage_ids = np.array([s.stage_id for s in ctx.training.stages])
    test_ids = ctx.training.test_ids
    frames = []
    for r in results:
        for b in behaviours:
            k, i = np.meshgrid(np.arange(len(stage_ids)), np.arange(len(test_ids)), indexing="ij")
            frames.append(
                pd.DataFrame(
                    {
                        "method": r.method,
                        "behaviour": b,
                        "test_id": test_ids[i.ravel()],
                        "stage_id": stage_ids[k.ravel()],
                        "value": r.effects[b].ravel(),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)[EFFECT_COLUMNS]


def _aggregates_table(results: list[_Result], ctx: _Context, behaviours: tuple[str, ...]) -> pd.DataFrame:
    names = list(ctx.slices)
    sizes = [int(m.sum()) for m in ctx.slices.values()]
    rows = []
    for r in results:
        tables = {b: _slice_means(r.effects[b], ctx) for b in behaviours}
        tables["accuracy"] = _accuracy_effect(r.effects["margin"], ctx)
        for b, table in tables.items():
            for k, stage in enumerate(ctx.training.stages):
                for s, (name, n) in enumerate(zip(names, sizes, strict=True)):
                    value = float(table[k, s]) if n else None
                    rows.append((r.method, b, name, stage.stage_id, value, n))
    return pd.DataFrame(rows, columns=AGGREGATE_COLUMNS)


def _faithfulness(
    results: list[_Result],
    reference: _Result | None,
    ctx: _Context,
    behaviour: str,
    compare: bool,
) -> pd.DataFrame:
    stages = ctx.training.stages
    rows = []
    if compare and reference is not None:
        truth = reference.effects[behaviour]
        true_agg = np.nan_to_num(_slice_means(truth, ctx))
        for r in results:
            measured = faith.compare(
                r.effects[behaviour], truth, np.nan_to_num(_slice_means(r.effects[behaviour], ctx)), true_agg
            )
            for row in measured:
                if r is reference:
                    row["confidence"] = 1.0  # exact, and checked against theta_T
                k = row.pop("stage")
                stage_id = None if k is None else stages[int(k)].stage_id
                rows.append(
                    {
                        "method": r.method,
                        "horizon": r.horizon,
                        "stage_id": stage_id,
                        **row,
                        "seconds": r.seconds,
                        "reference_seconds": reference.seconds,
                    }
                )
    else:
        r = results[0]
        confidences = (
            [1.0] * len(stages) if r.method == "replay" else faith.proxy_confidences(ctx.training, r.horizon)
        )
        for stage, c in zip(stages, confidences, strict=True):
            rows.append(
                {
                    "method": r.method,
                    "horizon": r.horizon,
                    "stage_id": stage.stage_id,
                    "seconds": r.seconds,
                    "confidence": c,
                }
            )
    frame = pd.DataFrame(rows, columns=FAITHFULNESS_COLUMNS)
    return frame.astype({"horizon": "Int64", "stage_id": "Int64"})
