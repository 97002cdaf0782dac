"""Read-only queries that turn a recorded run directory into a `Training` for stage analysis.

Everything comes from the run's published snapshot (via `RunStore`) and its checkpoint files; every checkpoint
file is read through the one trusted loader (`fgtrac_core.checkpoint_files`), checked against the size and
SHA-256 its ledger entry committed, so an analysis never silently uses a changed or planted file.  Labels are the recorded `samples.label`; inputs come from the run's pipeline (`fgtrac_core.pipeline`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from fgtrac_core.checkpoint_files import load_run_checkpoint
from fgtrac_core.pipeline import Pipeline, load_pipeline
from fgtrac_core.stages.errors import MissingBoundaryStateError, StageAnalysisError
from fgtrac_core.stages.training import Stage, Training, cross_entropy
from fgtrac_core.store.reader import RunStore
from fgtrac_core.tracking.optimizer_hooks import expand_hparams


@dataclass(frozen=True)
class CheckpointUse:
    """A recorded checkpoint an analysis read: its id, kind, step and recorded SHA-256."""

    checkpoint_id: int
    kind: str
    step: int
    sha256: str


@dataclass
class RunRecords:
    """A run's `Training`, its config, and the checkpoints it was built from."""

    training: Training
    config: dict[str, Any]
    checkpoints: list[CheckpointUse]


def load_training(
    store: RunStore, pipeline: Pipeline | None = None, *, split: str = "test", tolerance: float = 0.0
) -> RunRecords:
    """Build the `Training` of the run behind `store` (test examples: the samples of `split`; `tolerance`: how
    closely its replays must reproduce the recording, `Training.tolerance`).

    Raises MissingBoundaryStateError when a stage lacks its stage_start/stage_end checkpoint or the optimizer
    state in it, and StageAnalysisError for runs that cannot be replayed as recorded (e.g. an optimizer step no
    batch was logged for).
    """
    config = json.loads(store.meta().get("config", "{}"))
    pipeline = pipeline or load_pipeline(config)
    samples = store.df("SELECT sample_id, split, label FROM samples ORDER BY sample_id")
    load_batch = _batch_loader(pipeline, samples)
    test_ids = samples.loc[samples["split"] == split, "sample_id"].to_numpy(np.int64)
    if len(test_ids) == 0:
        raise StageAnalysisError(f"this run has no {split!r} samples to measure stage effects on")
    stage_rows = store.df("SELECT stage_id, name, optimizer, status, hparams FROM stages ORDER BY stage_id")
    ckpts = store.df(
        """SELECT checkpoint_id, step, stage_id, kind, path, sha256 FROM checkpoints
           WHERE kind IN ('stage_start', 'stage_end') ORDER BY checkpoint_id"""
    )
    steps = _steps(store)
    applied = store.df(
        """SELECT step, stage_id, hparams, clip, grads_altered, param_fingerprint, forward_seeds
           FROM optimizer_steps ORDER BY step"""
    )
    stages, used = [], []
    for row in stage_rows.itertuples():
        start, end = (_boundary(store, ckpts, row, kind) for kind in ("stage_start", "stage_end"))
        used += [start, end]
        mine = steps[steps["stage_id"] == row.stage_id]
        ran = applied[applied["stage_id"] == row.stage_id]
        _check_steps(row.name, mine["step"].astype(int).tolist(), ran["step"].astype(int).tolist())
        hparams = expand_hparams(ran["hparams"].tolist())
        start_payload, end_payload = _load(store, start, row.name), _load(store, end, row.name)
        stages.append(
            Stage(
                stage_id=int(row.stage_id),
                name=row.name,
                optimizer=row.optimizer,
                start_model=start_payload["model"],
                start_optimizer=start_payload["optimizer"],
                end_model=end_payload["model"],
                end_optimizer=end_payload["optimizer"],
                steps=mine["step"].astype(int).tolist(),
                lrs=[float(groups[0]["lr"]) for groups in hparams],
                batches=[np.asarray(ids, dtype=np.int64) for ids in mine["ids"]],
                hparams=hparams,
                clips=[None if c is None or pd.isna(c) else json.loads(c) for c in ran["clip"]],
                altered=[bool(a) for a in ran["grads_altered"]],
                fingerprints=[None if pd.isna(f) else float(f) for f in ran["param_fingerprint"]],
                targets=[_targets(t) for t in mine["targets"]],
                device=json.loads(row.hparams).get("device"),
                params=start_payload.get("optimizer_params"),
                frozen=start_payload.get("frozen"),
                frozen_end=end_payload.get("frozen"),
                autocast=end_payload.get("autocast"),
                micro=[[int(n) for n in sizes] for sizes in mine["sizes"]],
                seeds=[None if v is None or pd.isna(v) else json.loads(v) for v in ran["forward_seeds"]],
            )
        )
        expected = (start.step, start.step + len(mine))
        if (start.step, end.step) != expected or mine["step"].tolist() != list(range(*expected)):
            raise StageAnalysisError(
                f"stage {row.name!r}: its boundary checkpoints (steps {start.step}, {end.step}) and its "
                f"{len(mine)} logged steps are not one contiguous range"
            )
    training = Training(
        stages=stages, model_factory=pipeline.model, load_batch=load_batch, test_ids=test_ids,
        loss_fn=pipeline.loss_fn or cross_entropy, tolerance=tolerance,
    )  # fmt: skip
    training.validate()
    first = next((s.batches[0][:2] for s in stages if s.batches), None)
    if first is not None:
        pipeline.check(*load_batch(first))
    return RunRecords(
        training,
        config,
        [CheckpointUse(int(c.checkpoint_id), str(c.kind), int(c.step), str(c.sha256)) for c in used],
    )


def _steps(store: RunStore) -> pd.DataFrame:
    """One row per optimizer step: step, stage_id, lr, sample ids in log order (batch by batch, each in batch
    order), their targets, and the sizes of its batches (several: the loop accumulated gradients over them)."""
    steps = store.df(
        """WITH logged AS (
               SELECT b.batch_id, b.step, b.stage_id, b.lr,
                      list(bs.sample_id ORDER BY bs.position) AS ids,
                      list(bs.target ORDER BY bs.position) AS targets
               FROM batches b JOIN batch_samples bs USING (batch_id)
               GROUP BY b.batch_id, b.step, b.stage_id, b.lr)
           SELECT step, stage_id, lr,
                  flatten(list(ids ORDER BY batch_id)) AS ids,
                  flatten(list(targets ORDER BY batch_id)) AS targets,
                  list(len(ids) ORDER BY batch_id) AS sizes
           FROM logged GROUP BY step, stage_id, lr ORDER BY step"""
    )
    if steps["step"].duplicated().any():
        step = int(steps.loc[steps["step"].duplicated(), "step"].iloc[0])
        raise StageAnalysisError(
            f"the batches logged for optimizer step {step} disagree on its stage or learning rate; replay needs "
            f"each step's batches recorded by the one stage that ran it"
        )
    return steps


def _targets(values: Any) -> list[int | None] | None:
    """A step's recorded targets (None where a sample has none); None when the step recorded no targets."""
    if isinstance(values, np.ma.MaskedArray):  # a list with NULLs, as DuckDB hands it to pandas
        mask, data = np.ma.getmaskarray(values), np.ma.getdata(values)
        out = [None if m else int(v) for v, m in zip(data.tolist(), mask.tolist(), strict=True)]
    else:
        out = [None if v is None or pd.isna(v) else int(v) for v in values]
    return None if all(v is None for v in out) else out


def _check_steps(stage: str, logged: list[int], ran: list[int]) -> None:
    """Every optimizer step the recorder saw in a stage has one logged batch, and every batch a step."""
    no_step = sorted(set(logged) - set(ran))
    if no_step:
        raise StageAnalysisError(
            f"stage {stage!r}: a batch was logged for step {no_step[0]}, but no optimizer step of the stage's "
            f"optimizer followed it; replay needs every logged batch to be stepped on (with gradient accumulation, "
            f"log each micro-batch right after its backward: before the optimizer.step() that applies it, or "
            f"the last one just after it)"
        )
    no_batch = sorted(set(ran) - set(logged))
    if no_batch:
        raise StageAnalysisError(
            f"stage {stage!r}: optimizer step {no_batch[0]} ran with no batch logged for it; call "
            f"run.log_batch(ids) once per optimizer step"
        )


def _boundary(store: RunStore, ckpts: pd.DataFrame, stage: Any, kind: str) -> Any:
    rows = ckpts[(ckpts["stage_id"] == stage.stage_id) & (ckpts["kind"] == kind)]
    if rows.empty:
        raise MissingBoundaryStateError(
            f"stage {stage.name!r} (status {stage.status}) has no {kind} checkpoint; stage analysis needs the "
            f"parameters and optimizer state at every stage boundary — record each stage with "
            f"`with run.stage(name, optimizer=opt, model=model):` and let it finish"
        )
    return rows.iloc[0 if kind == "stage_start" else -1]


def _load(store: RunStore, ckpt: Any, stage_name: str) -> dict[str, Any]:
    # through the one trusted reader: inside the run, no links, a regular file of the size and SHA-256 its
    # ledger entry committed (RunFileError, one line, otherwise)
    payload = load_run_checkpoint(store, store.layout, int(ckpt.checkpoint_id))
    if payload.get("optimizer") is None:
        raise MissingBoundaryStateError(
            f"the {ckpt.kind} checkpoint of stage {stage_name!r} holds no optimizer state; record the stage "
            f"with its optimizer (`run.stage(name, optimizer=opt, ...)`)"
        )
    return payload


def _batch_loader(pipeline: Pipeline, samples: pd.DataFrame) -> Any:
    """sample ids -> (pipeline inputs, recorded labels as int64), both in the given order."""
    known = samples["sample_id"].to_numpy(np.int64)
    labels = samples["label"]

    def load(ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pos = np.searchsorted(known, ids)
        if (pos >= len(known)).any() or (known[np.minimum(pos, len(known) - 1)] != ids).any():
            raise StageAnalysisError("a logged batch names a sample id that is not registered")
        y = labels.iloc[pos]
        if y.isna().any():
            raise StageAnalysisError("stage analysis needs the recorded label of every sample it uses")
        return pipeline.inputs(ids), torch.as_tensor(y.to_numpy(np.int64))

    return load
