"""Faithfulness measured on the user's own run: the linear datamodeling score (LDS) against exact replays.

`K` counterfactual trainings, each without a seeded random half of the training samples: the recorded run is
replayed (`stages.replay.Cursor`: same start, steps, per-step hyperparameters, clipping and batch order) with
every step's batch reduced to its kept samples (mean loss over them; a step whose batch keeps none still runs,
with zero gradients, so the schedule and the optimizer's own dynamics — momentum, weight decay — go on as
recorded).  Samples outside the training split are never removed.  Exact replay makes each counterfactual the
real outcome of that training, not a proxy.

LDS (dattri's definition): per test example, the Spearman correlation over the K subsets between the subset's
summed attribution Σ_{z ∈ S} score(test, z) and the counterfactual model's negated test loss (a positive score
means the sample lowered the loss), averaged over test examples whose losses are not constant.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from fgtrac_core.budget import CostEstimate, seconds_per_step
from fgtrac_core.errors import FgtracError
from fgtrac_core.outputs import class_logits


def subset_masks(n_train: int, k: int, seed: int) -> np.ndarray:
    """(k, n_train) bool: each row keeps a seeded random n_train // 2 of the training samples."""
    if k < 2:
        raise FgtracError("--check needs at least 2 replays for a rank correlation")
    rng = np.random.default_rng(seed)
    masks = np.zeros((k, n_train), bool)
    for row in masks:
        row[rng.permutation(n_train)[: n_train // 2]] = True
    return masks


def mean_spearman(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Spearman correlation down each column (one per test example), averaged over non-constant columns."""
    ra, rb = rankdata(estimate, axis=0), rankdata(truth, axis=0)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    denom = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (ra * rb).sum(0) / denom
    if np.isnan(corr).all():
        raise FgtracError("every test loss is the same across the replays; LDS is undefined")
    return float(np.nanmean(corr))


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> float:
    """LDS of an (n_test, n_train) score matrix against (K, n_test) counterfactual test losses."""
    return mean_spearman(masks.astype(np.float64) @ np.asarray(scores, np.float64).T, -np.asarray(losses))


def _safe_loss(loss_fn: Any) -> Any:
    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return out.sum() * 0.0 if len(y) == 0 else loss_fn(out, y)

    return loss


def _kept_cursor(training: Any, train_ids: np.ndarray, keep: np.ndarray, stage_index: int = 0) -> Any:
    """A replay cursor at the start of stage `stage_index` whose every batch holds only the kept samples: the
    training samples `train_ids[keep]` and every sample outside the training split.  Steps it has run drop
    their cached batches (memory stays flat)."""
    from fgtrac_core.stages.replay import Cursor

    dropped = np.sort(np.asarray(train_ids, np.int64)[~keep])
    run = dataclasses.replace(training, loss_fn=_safe_loss(training.loss_fn), _batch_cache={})

    class _Kept(Cursor):
        def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = super().batch()
            ids = np.asarray(run.stages[self.stage_index].batches[self.step_index], np.int64)
            m = torch.from_numpy(~np.isin(ids, dropped))
            return x[m], y[m]

        def parts(self) -> list[int]:
            sizes = super().parts()
            ids = np.asarray(run.stages[self.stage_index].batches[self.step_index], np.int64)
            kept = ~np.isin(ids, dropped)
            return [int(kept[a : a + n].sum()) for a, n in zip(np.cumsum([0, *sizes[:-1]]), sizes, strict=True)]

        def step(self, observe: Any = None) -> None:
            j, i = self.stage_index, self.step_index
            super().step(observe)
            run._batch_cache.pop((j, i), None)

    return _Kept(run, stage_index, run.stages[stage_index].start_model, None)


def replay_without(
    training: Any, train_ids: np.ndarray, keep: np.ndarray, test: tuple[torch.Tensor, torch.Tensor]
) -> np.ndarray:
    """Test losses (n_test,) of the run replayed with only the training samples `train_ids[keep]`."""
    cursor = _kept_cursor(training, train_ids, keep)
    cursor.run()
    model = cursor.model.eval()
    with torch.no_grad():
        return F.cross_entropy(class_logits(model(test[0])), test[1], reduction="none").double().numpy()


def estimate(training: Any, train_ids: np.ndarray, k: int, seed: int = 0) -> CostEstimate:
    """The cost of `k` counterfactual replays: per stage, the median time of a few of its steps replayed
    without the first random half (`seconds_per_step`, from the stage's recorded start), times its steps;
    summed over stages and scaled by k.  About 5 steps per stage are run to measure it."""
    keep = subset_masks(len(train_ids), k, seed)[0]
    steps, seconds = 0, 0.0
    for j, stage in enumerate(training.stages):
        if stage.n_steps:
            steps += stage.n_steps
            seconds += stage.n_steps * seconds_per_step(_kept_cursor(training, train_ids, keep, j))
    return CostEstimate(k * steps, 0, seconds / steps if steps else 0.0, 0.0)


@dataclasses.dataclass
class Check:
    k: int
    seed: int
    lds: float
    seconds: float
    masks: np.ndarray
    losses: np.ndarray  # (K, n_test)

    def to_params(self) -> dict[str, Any]:
        return {
            "replays": self.k,
            "subset": "random half of the training samples per replay",
            "seed": self.seed,
            "lds": round(self.lds, 6),
            "seconds": round(self.seconds, 3),
            "test_loss_spread": round(float(self.losses.std(0).mean()), 6),
        }


def check(
    training: Any,
    train_ids: np.ndarray,
    test: tuple[torch.Tensor, torch.Tensor],
    scores: np.ndarray,
    *,
    k: int,
    seed: int = 0,
    progress: bool = False,
) -> Check:
    """K replays without random halves and the LDS of `scores` (n_test, n_train) against them."""
    t0 = time.perf_counter()
    masks = subset_masks(len(train_ids), k, seed)
    rows = range(k)
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="--check replays", unit="replay", leave=False)
    losses = np.stack([replay_without(training, train_ids, masks[r], test) for r in rows])
    return Check(k, seed, lds(scores, masks, losses), time.perf_counter() - t0, masks, losses)
