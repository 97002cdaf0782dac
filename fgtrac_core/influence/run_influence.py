"""Influence for a recorded run: choose checkpoints, check their files against the ledger, score, store, commit.

What is stored (one analysis; see docs/influence.md): per test example its recorded label, the final model's
prediction, confidence and loss; its top-k proponents and opponents ranked by raw score and by cosine, each with
both scores and the per-checkpoint contributions to the raw score; and every training sample's self-influence.
The rows and an analysis entry (method, parameters, the checkpoints with their file hashes, the Merkle root of
the rows) go into the run's ledger, so `fgtrac verify` catches any edited score.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from fgtrac_core.errors import FgtracError, UnknownSampleError
from fgtrac_core.influence.checkpoints import select_checkpoints
from fgtrac_core.influence.tracin import MODES, load_state_dict, review
from fgtrac_core.ledger import decode_entry
from fgtrac_core.pipeline import Pipeline, load_pipeline
from fgtrac_core.store.reader import RunStore


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _chosen_checkpoints(store: RunStore, rule: str | Sequence[int], tau: float) -> list[dict[str, Any]]:
    """The checkpoints to sum over, each checked: file hash = recorded hash = the ledger entry's hash.

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
    entries = store.df("SELECT ref_id, entry FROM ledger WHERE kind = 'checkpoint'")
    committed = {
        int(r): decode_entry(bytes(e))[1]["sha256"]
        for r, e in zip(entries.ref_id, entries.entry, strict=True)
    }
    out = []
    for pick in picks:
        row = ck.iloc[pick.index]
        cid = int(row["checkpoint_id"])
        path = store.layout.resolve_inside(row["path"])
        if not path.is_file():
            raise CheckpointMismatchError(f"checkpoint file {row['path']} is missing")
        digest = _sha256_file(path)
        if committed.get(cid) is None:
            raise CheckpointMismatchError(f"checkpoint {cid} ({row['path']}) has no ledger entry")
        if digest != committed[cid] or digest != row["sha256"]:
            raise CheckpointMismatchError(
                f"checkpoint file {row['path']} does not match the ledger (sha256 {digest[:16]}..., "
                f"committed {committed[cid][:16]}...); refusing to compute influence from it"
            )
        if row["lr"] is None or not np.isfinite(row["lr"]):
            raise FgtracError(f"checkpoint {cid} has no recorded learning rate")
        out.append(
            {
                "checkpoint_id": cid,
                "step": int(row["step"]),
                "stage": row["stage"],
                "kind": row["kind"],
                "lr": float(row["lr"]),
                "sha256": digest,
                "reason": pick.reason,
                "path": path,
            }
        )
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


def _predictions(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        prob = logits.softmax(1)
        return {
            "prediction": logits.argmax(1).numpy().astype(np.int32),
            "confidence": prob.max(1).values.double().numpy(),
            "loss": F.cross_entropy(logits, y, reduction="none").double().numpy(),
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
    device: str | None = None,
    progress: bool = False,
) -> InfluenceSummary:
    """Compute, store and commit a TracInCP analysis of a recorded run; returns what was stored.

    Scores are positive for proponents (the training sample lowered the test loss); see `tracin` for modes.
    `checkpoints` is `auto` (FG-Trac: validation loss improved by >= `tau` relative to the best so far in its
    stage, plus the final checkpoint), `all`, or checkpoint ids.  Refuses checkpoint files whose hash differs
    from the ledger.
    """
    from fgtrac_core.tracking.run import Run

    if mode not in MODES:
        raise FgtracError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if k < 1:
        raise FgtracError("k must be at least 1")
    t0 = time.perf_counter()
    with RunStore(run_dir) as store:
        pipeline = load_pipeline(
            store.meta().get("config", "{}"), model=model, inputs=inputs, head_layer=layer, need_head=True
        )
        chosen = _chosen_checkpoints(store, checkpoints, tau)
        train_ids, x_tr, y_tr = _split(store, pipeline, "train", None)
        test_ids_arr, x_te, y_te = _split(store, pipeline, "test", test_ids)
    net = pipeline.model()
    rev = review(
        net,
        pipeline.head_layer,
        (x_tr, y_tr),
        (x_te, y_te),
        [(c["path"], c["lr"]) for c in chosen],
        k=k,
        cosine=True,
        mode=mode,
        include_bias=include_bias,
        projection_dim=projection_dim,
        seed=seed,
        device=device,
        progress=progress,
    )
    net.load_state_dict(load_state_dict(chosen[-1]["path"]))
    preds = _predictions(net.cpu(), x_te, y_te)
    tables = _result_tables(rev, train_ids, test_ids_arr, y_te.numpy(), preds)
    seconds = time.perf_counter() - t0
    for c, w in zip(chosen, rev.checkpoint_weights, strict=True):
        c["weight"] = w  # lr, times κ for adamw on Adam checkpoints
        c["path"] = str(c["path"].relative_to(Path(run_dir).resolve()))
    method = f"tracin/{mode}"
    params = {
        "mode": mode,
        "k": min(k, len(train_ids)),
        "checkpoint_rule": checkpoints if isinstance(checkpoints, str) else [int(i) for i in checkpoints],
        "tau": tau,
        "include_bias": include_bias,
        "projection_dim": projection_dim,
        "seed": seed,
        "layer": pipeline.head_layer,
        "n_train": len(train_ids),
        "n_test": len(test_ids_arr),
        "views": ["raw", "cosine"],
        "sign": "positive = proponent (lowered the test loss)",
    }
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
                "label": int(y_tr[i]),
                "self_influence": float(rev.self_influence[i]),
            }
            for i in order.tolist()
        ],
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
    order = np.argsort(-si, kind="stable")
    rank = np.empty(len(si), np.int32)
    rank[order] = np.arange(1, len(si) + 1, dtype=np.int32)
    return {
        "influence_tests": tests,
        "influence_topk": pa.concat_tables(parts),
        "self_influence": pa.table(
            {
                "sample_id": pa.array(train_ids, pa.int64()),
                "value": pa.array(si, pa.float64()),
                "rank": pa.array(rank, pa.int32()),
            }
        ),
    }
