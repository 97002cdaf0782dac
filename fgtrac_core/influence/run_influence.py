"""Influence for a recorded run: choose checkpoints, check their files against the ledger, score, store, commit.

What is stored (one analysis; see docs/influence.md): per test example its recorded label, the final model's
prediction, confidence and loss; its top-k proponents and opponents ranked by raw score and by cosine, each with
both scores and the per-checkpoint contributions to the raw score; and every training sample's self-influence.
The rows and an analysis entry (method, parameters, the checkpoints with their file hashes, the Merkle root of
the rows) go into the run's ledger, so `fgtrac verify` catches any edited score.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from fgtrac_core.budget import DEFAULT_BUDGET_S, CostEstimate, enforce
from fgtrac_core.checkpoint_files import load_checkpoint_payload
from fgtrac_core.errors import FgtracError, UnknownSampleError
from fgtrac_core.influence.adamw import WEIGHED_OPTIMIZERS
from fgtrac_core.influence.checkpoints import select_checkpoints
from fgtrac_core.influence.gradients import LossFn, at_checkpoint, per_sample_loss
from fgtrac_core.influence.head_rates import checkpoint_head_rate, head_rates
from fgtrac_core.influence.influence_function import MODE as IF_MODE
from fgtrac_core.influence.influence_function import require_positive_damping, whitened_gradients
from fgtrac_core.influence.targets import trained_targets
from fgtrac_core.influence.tracin import MODES, load_state_dict, review
from fgtrac_core.influence.weighting import (
    WEIGHTINGS,
    UsageWeights,
    has_batch_records,
    run_intervals,
    usage_weights,
)
from fgtrac_core.outputs import class_logits
from fgtrac_core.pipeline import Pipeline, load_into, load_pipeline, loss_description
from fgtrac_core.store.reader import RunStore
from fgtrac_core.store.run_files import committed_checkpoints

ALL_MODES = (*MODES, "exact", "adamw_influence", IF_MODE)  # adamw_influence's module is imported when used


class CheckpointMismatchError(FgtracError):
    """A checkpoint file's hash differs from the one its ledger entry committed."""


@dataclass
class InfluenceSummary:
    """What `fgtrac influence` reports: the stored analysis id, the checkpoints used and why, and headlines."""

    analysis_id: int
    method: str
    k: int
    n_train: int
    n_test: int
    seconds: float
    checkpoints: list[dict[str, Any]]
    accuracy: float
    n_misclassified: int
    top_self_influence: list[dict[str, Any]] = field(default_factory=list)
    weighting: str | None = "checkpoint"  # None: the influence function (one term, no weighting)
    check: dict[str, Any] | None = None
    shards: int | None = None  # sharded on Ray: the number of shards
    # the modes that replay the run: the relative difference from the recorded parameters accepted (0: bit for
    # bit) and the largest one the replay showed (`fgtrac_core.stages.replay_match`)
    replay_tolerance: float | None = None
    replay_deviation: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _chosen_checkpoints(
    store: RunStore, rule: str | Sequence[int], tau: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The checkpoints to sum over and their loaded payloads, each file read once through the trusted reader
    (`fgtrac_core.store.run_files`): inside the run, no links, a regular file of the size and SHA-256 its ledger
    entry committed, and the `checkpoints` row agreeing with that entry (RunFileError, one line, otherwise).

    Checkpoints sharing a step hold the same parameters (a stage's end and the next stage's start): only the first
    is a candidate, so `all` does not count one set of parameters twice.  Explicit lists name checkpoint ids.
    """
    ck = store.checkpoints()
    if ck.empty:
        raise FgtracError("this run has no checkpoints to compute influence from")
    ck = ck.drop_duplicates("step", keep="first").reset_index(drop=True)
    if isinstance(rule, str):
        picks = select_checkpoints(
            [None if v != v else float(v) for v in ck["val_loss"]], rule, tau=tau, stages=ck["stage"].tolist()
        )
    else:
        ids = ck["checkpoint_id"].tolist()
        missing = [i for i in rule if i not in ids]
        if missing:
            raise FgtracError(
                f"no checkpoint {missing[0]} among the candidates ({', '.join(map(str, ids))}; "
                "checkpoints at an already-listed step are skipped)"
            )
        picks = select_checkpoints(ck["val_loss"].tolist(), [ids.index(i) for i in rule])
    committed = committed_checkpoints(store)
    out, payloads = [], []
    for pick in picks:
        row = ck.iloc[pick.index]
        cid = int(row["checkpoint_id"])
        facts = committed[cid]
        if row["lr"] is None or not np.isfinite(row["lr"]):
            raise FgtracError(f"checkpoint {cid} has no recorded learning rate")
        out.append(
            {
                "checkpoint_id": cid,
                "step": int(row["step"]),
                "stage": row["stage"],
                "kind": row["kind"],
                "lr": float(row["lr"]),
                "sha256": facts.sha256,
                "reason": pick.reason,
                "path": facts.path,
            }
        )
        payloads.append(load_checkpoint_payload(store.layout, facts))
    return out, payloads


def _require_weighed_optimizers(store: RunStore, chosen: list[dict[str, Any]]) -> None:
    """Refuse `adamw` mode on a checkpoint trained by an optimizer it has no update rule for (NAdam, Adadelta...):
    it would score that checkpoint in SGD's form, or as if its moments were Adam's, under the name adamw."""
    trained_by = store.checkpoints().set_index("checkpoint_id")["optimizer"]
    for c in chosen:
        name = trained_by.get(c["checkpoint_id"])
        if isinstance(name, str) and name not in WEIGHED_OPTIMIZERS:
            raise FgtracError(
                f"checkpoint {c['checkpoint_id']} (stage {c['stage']!r}) was trained with {name}: --mode adamw "
                f"weighs gradients by {', '.join(WEIGHED_OPTIMIZERS)} updates only; use --mode last_layer or full"
            )


def _target_bounds(chosen: list[dict[str, Any]], usage: UsageWeights | None) -> list[int]:
    """Per chosen checkpoint, the step before which a sample's uses decide its target there: the end of the steps
    the checkpoint stands for, at least its own step."""
    out = []
    for i, c in enumerate(chosen):
        last = usage.intervals[i]["last_step"] if usage is not None else None
        out.append(max(int(c["step"]), -1 if last is None else int(last) + 1))
    return out


def _split(
    store: RunStore, pipeline: Pipeline, split: str, ids: Sequence[int] | None
) -> tuple[np.ndarray, ...]:
    samples = store.samples(split)
    if ids is not None:
        known = store.samples()
        where = dict(zip(known["sample_id"].tolist(), known["split"].tolist(), strict=True))
        for i in ids:
            if i not in where:
                raise UnknownSampleError(f"sample id {i} is not in this run")
            if where[i] != split:
                raise UnknownSampleError(f"sample {i} is a {where[i]} sample, not a {split} example")
        samples = samples.set_index("sample_id").loc[list(ids)].reset_index()
    if samples.empty:
        raise FgtracError(f"this run has no {split} samples")
    if samples["label"].isna().any():
        raise FgtracError(f"some {split} samples have no recorded label")
    sample_ids = samples["sample_id"].to_numpy(np.int64)
    return sample_ids, pipeline.inputs(sample_ids), torch.as_tensor(samples["label"].to_numpy(np.int64))


def _predictions(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn | None
) -> dict[str, np.ndarray]:
    """Each test example's predicted class, its softmax confidence (of the outputs read as class logits: one logit
    per example is a binary classifier's, `fgtrac_core.outputs`) and its loss (`loss_fn`, per sample; default
    cross-entropy)."""
    model.eval()
    with torch.no_grad():
        outputs = model(x)
        logits = class_logits(outputs)
        prob = logits.softmax(1)
        return {
            "prediction": logits.argmax(1).numpy().astype(np.int32),
            "confidence": prob.max(1).values.double().numpy(),
            "loss": per_sample_loss(loss_fn)(outputs, y).double().numpy(),
        }


def run_influence(
    run_dir: str | Path,
    *,
    mode: str = "last_layer",
    k: int = 50,
    checkpoints: str | Sequence[int] = "auto",
    tau: float = 0.05,
    test_ids: Sequence[int] | None = None,
    include_bias: bool = True,
    projection_dim: int | None = None,
    seed: int = 0,
    model: str | None = None,
    inputs: str | None = None,
    layer: str | None = None,
    loss: str | None = None,
    device: str | None = None,
    progress: bool = False,
    weighting: str | None = None,
    check: int | None = None,
    ray_address: str | bool | None = None,
    shard_size: int | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
    force: bool = False,
    on_estimate: Callable[[CostEstimate], None] | None = None,
    gradients: str = "last_layer",
    damping: float = 1e-3,
    tolerance: float = 0.0,
) -> InfluenceSummary:
    """Compute, store and commit a TracInCP analysis of a recorded run; returns what was stored.

    Scores are positive for proponents (the training sample lowered the test loss); see `tracin` for modes.
    `checkpoints` is `auto` (FG-Trac: validation loss improved by >= `tau` relative to the best so far in its
    stage, plus the final checkpoint), `all`, or checkpoint ids.  Refuses checkpoint files whose hash differs
    from the ledger.  `weighting`: `usage` (each checkpoint's term for a training sample weighted by that
    sample's uses, Σ η_t/|B_t|, in the steps the checkpoint stands for; `fgtrac_core.influence.weighting`) or
    `checkpoint` (one lr per checkpoint, Captum's convention); default `checkpoint`, the more faithful of the two
    when judged by exact replays of the sample run (BENCHMARKS.md, "Influence faithfulness on the sample run"),
    and `usage` for the modes that replay the run.  A run that recorded its batches stores, under either
    weighting, each sample's uses in the steps every checkpoint stands for beside its contributions.
    `check` K: also replay the run K times without a random half of the training samples and store the LDS of
    these scores against the replays' test losses (`fgtrac_core.influence.check`).  Their cost is estimated
    first (a few replayed steps timed per stage, `check.estimate`) and handed to `on_estimate`; above
    `budget_s` seconds the analysis is refused before anything is scored or written, unless `force`.
    `ray_address`: shard the scoring over the training set on Ray (`fgtrac_core.influence.sharded`; same stored
    results): True for a local cluster started for this call, or a cluster's address; `shard_size` training
    samples per task (default: about four shards per CPU).  Not for exact mode.
    `device`: where the scores are computed (default: CUDA when available); the modes that replay the run
    (exact, adamw_influence) compute on the CPU, where the replay is bit-exact, and refuse another device.
    `gradients` (exact mode): ``last_layer`` (the head's, exact) or ``full`` (every parameter's, through the
    `full` mode's seeded projection: `projection_dim`, `seed`; `fgtrac_core.influence.exact`).
    Mode ``influence_function``: the head's influence function with its exact cross-entropy Hessian, damped by
    `damping` (`fgtrac_core.influence.influence_function`), evaluated at the last chosen checkpoint (the final
    one unless `checkpoints` lists others); no weighting applies, and it does not run on Ray.
    `tolerance` (the modes that replay the run): how closely the replay must follow the recorded parameters, as a
    relative difference (0: bit for bit; `fgtrac_core.stages.replay_match`), stored with the largest accepted.
    """
    from fgtrac_core.influence.adamw_influence import MODE as ADAMW_INFLUENCE
    from fgtrac_core.stages.replay_match import require_tolerance
    from fgtrac_core.tracking.run import Run

    replayed = mode in ("exact", ADAMW_INFLUENCE)  # scored along the replayed trajectory, not at checkpoints
    hessian = mode == IF_MODE  # one term at the final checkpoint
    if mode not in ALL_MODES:
        raise FgtracError(f"mode must be one of {', '.join(ALL_MODES)}, not {mode!r}")
    if weighting is not None and weighting not in WEIGHTINGS:
        raise FgtracError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
    if hessian and weighting is not None:
        raise FgtracError(
            f"{IF_MODE} mode has one term, at the final checkpoint: --weighting {weighting} does not apply"
        )
    if hessian:
        require_positive_damping(damping)
    require_tolerance(tolerance)
    if replayed and weighting == "checkpoint":
        raise FgtracError(f"{mode} mode weighs every step's own use (η_t/|B_t|); --weighting checkpoint does not apply")
    if replayed and device is not None and torch.device(device).type != "cpu":
        raise FgtracError(
            f"--device {device} does not apply to {mode} mode: it replays the recorded steps, which replay bit for "
            "bit on the CPU (leave --device out)"
        )
    if k < 1:
        raise FgtracError("k must be at least 1")
    if gradients != "last_layer" and mode != "exact":
        raise FgtracError(
            f"--gradients {gradients} applies to --mode exact (the checkpoint modes choose theirs by mode: --mode full)"
        )
    if ray_address is not None and ray_address is not False:
        if replayed:
            raise FgtracError(f"--ray does not apply to {mode} mode (it replays the run's steps in one process)")
        if hessian:
            raise FgtracError(f"--ray does not apply to {mode} mode (one Hessian over the whole training set)")
        from fgtrac_core.influence.sharded import import_ray, require_reachable

        import_ray()  # the missing extra and an address nothing answers at are reported before any work
        if isinstance(ray_address, str):
            require_reachable(ray_address)
    t0 = time.perf_counter()
    with RunStore(run_dir) as store:
        pipeline = load_pipeline(
            store.meta().get("config", "{}"), model=model, inputs=inputs, head_layer=layer, need_head=True, loss=loss
        )
        per_sample = pipeline.per_sample_loss()
        chosen, states = _chosen_checkpoints(store, checkpoints, tau)
        if mode == "adamw":
            _require_weighed_optimizers(store, chosen)
        if hessian:
            chosen, states = chosen[-1:], states[-1:]
        train_ids, x_tr, y_tr = _split(store, pipeline, "train", None)
        pipeline.check(x_tr[:2], y_tr[:2])
        test_ids_arr, x_te, y_te = _split(store, pipeline, "test", test_ids)
        batched = has_batch_records(store)
        if weighting is None and not hessian:
            weighting = "usage" if replayed else "checkpoint"
        if weighting == "usage" and not batched:
            raise FgtracError("usage weighting needs the run's batch records; this run has none (--weighting checkpoint)")
        # under checkpoint weighting too: the uses behind each checkpoint's term are stored for the reviewer (not
        # for the influence function, whose one term stands for the whole run, not for the steps before it)
        # the rate each step and checkpoint applied to the scored head, where not the first group's (`full` scores
        # every parameter: it weighs by the first group's, the recorded columns, and scales each parameter's
        # gradients to its own group's rate: group_rates)
        rates = head_rates(store, pipeline.head_layer) if mode != "full" else {}
        for c in chosen:
            c["lr"] = checkpoint_head_rate(store, c, rates)
        ids = [c["checkpoint_id"] for c in chosen]
        usage = usage_weights(store, train_ids, ids, rates) if batched and not hessian else None
        registered = y_tr
        if batched:  # gradients at the targets training used (one row per checkpoint when some were relabelled)
            y_tr = trained_targets(store, train_ids, y_tr, _target_bounds(chosen, usage))
        if replayed or check:
            from fgtrac_core.stages._records import load_training

            records = load_training(store, pipeline, tolerance=tolerance)
            intervals = run_intervals(store, [c["checkpoint_id"] for c in chosen])
    cost = None
    if check:
        from fgtrac_core.influence.check import estimate
        from fgtrac_core.stages.replay import deterministic

        refusal = records.training.replay_refusal()  # now, not after the scoring
        if refusal is not None:
            raise FgtracError(f"--check replays the run, and it cannot be replayed exactly: {refusal}")
        with deterministic(records.config.get("torch_threads")):  # timed as the replays will run
            cost = estimate(records.training, train_ids, int(check), seed)
        if on_estimate is not None:
            on_estimate(cost)
        enforce(cost, budget_s, force, f"--check {check}")
    net = pipeline.model()
    if mode == "exact":  # every step's own parameters, by replay; `usage` only supplies the interval summaries
        from fgtrac_core.influence.exact import exact_review
        from fgtrac_core.stages.replay import deterministic

        with deterministic(records.config.get("torch_threads")):
            rev: Any = exact_review(
                records.training, pipeline.head_layer, train_ids, (x_te, y_te), k=k, include_bias=include_bias,
                intervals=intervals, progress=progress, gradients=gradients, projection_dim=projection_dim, seed=seed,
                loss_fn=per_sample,
            )  # fmt: skip
        rev.checkpoint_weights = [1.0] * len(chosen)
    elif mode == ADAMW_INFLUENCE:  # uses at Adam(W) steps followed through the optimizer to θ_T; SGD steps: exact
        from fgtrac_core.influence.adamw_influence import adamw_influence_review
        from fgtrac_core.stages.replay import deterministic

        with deterministic(records.config.get("torch_threads")):
            rev = adamw_influence_review(
                records.training, pipeline.head_layer, train_ids, (x_te, y_te), k=k, include_bias=include_bias,
                intervals=intervals, progress=progress, loss_fn=per_sample,
            )  # fmt: skip
        rev.checkpoint_weights = [1.0] * len(chosen)
    elif hessian:  # whitened once: the review and, with --check, the full score matrix
        whitened = whitened_gradients(
            net, pipeline.head_layer, at_checkpoint((x_tr, y_tr), 0), (x_te, y_te), states[0], damping=damping,
            include_bias=include_bias, device=device, loss_fn=per_sample,
        )  # fmt: skip
        rev = whitened.review(k, cosine=True, progress=progress)
    else:
        score = review
        sharding: dict[str, Any] = {}
        if ray_address is not None and ray_address is not False:
            from fgtrac_core.influence.sharded import sharded_review as score

            sharding = {"address": None if ray_address is True else str(ray_address), "shard_size": shard_size}
        rev = score(
            net,
            pipeline.head_layer,
            (x_tr, y_tr),
            (x_te, y_te),
            [(state, c["lr"]) for c, state in zip(chosen, states, strict=True)],
            k=k,
            cosine=True,
            mode=mode,
            include_bias=include_bias,
            projection_dim=projection_dim,
            seed=seed,
            device=device,
            progress=progress,
            sample_weights=usage.matrix if weighting == "usage" else None,
            loss_fn=per_sample,
            **sharding,
        )
    measured = None
    if check:
        from fgtrac_core.influence.check import check as run_check
        from fgtrac_core.influence.tracin import tracin
        from fgtrac_core.stages.replay import deterministic

        if replayed:
            full = rev.scores.scores
        elif hessian:
            full = whitened.scores()
        else:
            full = tracin(
                net, pipeline.head_layer, (x_tr, y_tr), (x_te, y_te),
                [(state, c["lr"]) for c, state in zip(chosen, states, strict=True)],
                mode=mode, include_bias=include_bias, projection_dim=projection_dim, seed=seed, device=device,
                sample_weights=usage.matrix if weighting == "usage" else None, loss_fn=per_sample,
            )  # fmt: skip
        with deterministic(records.config.get("torch_threads")):
            measured = run_check(
                records.training, train_ids, (x_te, y_te), full.double().cpu().numpy(), k=int(check), seed=seed,
                progress=progress,
            )  # fmt: skip
    load_into(net, load_state_dict(states[-1]), "the final checkpoint")
    preds = _predictions(net.cpu(), x_te, y_te, per_sample)
    tables = _result_tables(rev, train_ids, test_ids_arr, y_te.numpy(), preds)
    seconds = time.perf_counter() - t0
    for i, (c, w) in enumerate(zip(chosen, rev.checkpoint_weights, strict=True)):
        c["kappa"] = rev.checkpoint_kappas[i] if rev.checkpoint_kappas else 1.0
        if weighting != "usage":
            c["weight"] = w  # lr, times κ for adamw on Adam checkpoints; 1/n for the influence function
        else:  # κ: the factor on each sample's Σ η_t/|B_t| over its uses in the interval
            c["weight"] = c["kappa"]
        if usage is not None:
            c["interval"] = usage.intervals[i]
    method = mode if mode in (ADAMW_INFLUENCE, IF_MODE) else f"tracin/{mode}"
    params = {
        "mode": mode,
        "weighting": weighting,
        "k": min(k, len(train_ids)),
        "checkpoint_rule": checkpoints if isinstance(checkpoints, str) else [int(i) for i in checkpoints],
        "tau": tau,
        "include_bias": include_bias,
        "projection_dim": projection_dim,
        "seed": seed,
        "layer": pipeline.head_layer,
        "training_loss": loss_description(pipeline.loss_fn),
        "n_train": len(train_ids),
        "n_test": len(test_ids_arr),
        "views": ["raw", "cosine"],
        "sign": "positive = proponent (lowered the test loss)",
    }
    if usage is not None:
        params["uncovered_steps"] = usage.uncovered_steps
    if y_tr.ndim == 2:  # some gradients taken at recorded targets other than the registered labels
        params["relabelled_train_samples"] = int((y_tr != registered).any(0).sum())
    shards = getattr(rev, "n_shards", None)
    if shards is not None:  # how it ran, not what it found: the stored rows are those of one process
        params["sharded"] = {"engine": "ray", "shards": shards, "shard_size": rev.shard_size}
    if measured is not None and cost is not None:
        params["check"] = {
            **measured.to_params(), "estimated_seconds": round(cost.seconds, 3), "budget_s": budget_s, "force": force,
        }  # fmt: skip
    if replayed:
        params["steps_replayed"] = rev.scores.n_steps
        params["replay_tolerance"] = tolerance
        params["replay_deviation"] = records.training.deviation
        params["contributions"] = "per interval: the steps each checkpoint stands for (usage weighting's rule)"
    if mode == "exact":
        params["gradients"] = gradients
        if rev.scores.projection_dim is not None:
            params["projection_dim"] = rev.scores.projection_dim
    if hessian:
        params["damping"] = damping
        params["definition"] = (
            "(1/n) grad test loss . (H + damping I)^-1 grad training loss, H the head's exact Hessian of the mean "
            "training loss (training_loss) over the training set at the checkpoint (Koh & Liang 2017, last layer)"
        )
        params["cosine"] = "cosine in the whitened space (H + damping I)^-1"
    if mode == ADAMW_INFLUENCE:
        s = rev.scores
        params["definition"] = (
            "-d test loss(theta_T)/d w_z per unit weight of z in the mean batch loss, gradients held, through "
            "the recorded Adam/AdamW dynamics (arXiv 2605.18814); uses at SGD steps: step-exact TracIn"
        )
        params["adam_steps"], params["sgd_steps"] = s.adam_steps, s.sgd_steps
        params["propagated_uses"], params["tracin_uses"] = s.propagated_uses, s.uses - s.propagated_uses
        params["cosine"] = "score / sqrt(test side * training side), Cauchy-Schwarz over the SGD terms and theta_T"
    run = Run.open(run_dir)
    try:
        analysis_id = run.record_analysis("influence", method, params, chosen, tables, seconds=seconds)
    finally:
        run.close()
    order = torch.argsort(rev.self_influence, descending=True)[:5]
    return InfluenceSummary(
        analysis_id=analysis_id,
        method=method,
        k=params["k"],
        n_train=len(train_ids),
        n_test=len(test_ids_arr),
        seconds=round(seconds, 3),
        checkpoints=chosen,
        accuracy=float((preds["prediction"] == y_te.numpy()).mean()),
        n_misclassified=int((preds["prediction"] != y_te.numpy()).sum()),
        top_self_influence=[
            {
                "sample_id": int(train_ids[i]),
                "label": int(registered[i]),
                "self_influence": float(rev.self_influence[i]),
            }
            for i in order.tolist()
        ],
        weighting=weighting,
        check=params.get("check"),
        shards=shards,
        replay_tolerance=params.get("replay_tolerance"),
        replay_deviation=params.get("replay_deviation"),
    )


def _result_tables(
    rev: Any, train_ids: np.ndarray, test_ids: np.ndarray, labels: np.ndarray, preds: dict[str, np.ndarray]
) -> dict[str, pa.Table]:
    """Arrow tables of the stored rows (row ids and analysis id are assigned by the recorder)."""
    n_test = len(test_ids)
    tests = pa.table(
        {
            "sample_id": pa.array(test_ids, pa.int64()),
            "label": pa.array(labels.astype(np.int32), pa.int32()),
            "prediction": pa.array(preds["prediction"], pa.int32()),
            "confidence": pa.array(preds["confidence"], pa.float64()),
            "loss": pa.array(preds["loss"], pa.float64()),
        }
    )
    parts = []
    for view, top in (("raw", rev.top), ("cosine", rev.top_cosine)):
        for direction, idx in (("proponent", top.proponent_indices), ("opponent", top.opponent_indices)):
            k = idx.shape[1]
            rows = torch.arange(n_test)[:, None].expand(-1, k)
            raw, cosine, contrib = rev.pair_detail(rows, idx)
            contributions = [json.dumps(c) for c in contrib.double().reshape(n_test * k, -1).tolist()]
            parts.append(
                pa.table(
                    {
                        "test_id": pa.array(np.repeat(test_ids, k), pa.int64()),
                        "view": pa.array([view] * (n_test * k)),
                        "direction": pa.array([direction] * (n_test * k)),
                        "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), n_test), pa.int32()),
                        "train_id": pa.array(train_ids[idx.reshape(-1).cpu().numpy()], pa.int64()),
                        "score": pa.array(raw.double().reshape(-1).cpu().numpy(), pa.float64()),
                        "cosine": pa.array(cosine.double().reshape(-1).cpu().numpy(), pa.float64()),
                        "contributions": pa.array(contributions, pa.string()),
                    }
                )
            )
    si = rev.self_influence.double().cpu().numpy()
    # stored highest first: "the top n" then reads only the first row groups (their zone maps on rank rule out the
    # rest), while a lookup by sample goes through the lookup index (fgtrac_core.store.schema)
    order = np.argsort(-si, kind="stable")
    return {
        "influence_tests": tests,
        "influence_topk": pa.concat_tables(parts),
        "self_influence": pa.table(
            {
                "sample_id": pa.array(np.asarray(train_ids)[order], pa.int64()),
                "value": pa.array(si[order], pa.float64()),
                "rank": pa.array(np.arange(1, len(si) + 1, dtype=np.int32), pa.int32()),
            }
        ),
    }
