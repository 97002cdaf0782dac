"""How far an estimator's stage effects can be trusted: measured against replay, or a proxy where none exists.

Measured (estimator vs the replayed truth, one behaviour, per stage and pooled over all stages):
  * ``pearson`` / ``spearman`` — correlation over test examples (pooled: over every (example, stage) pair);
    None where either side is constant;
  * ``sign_agreement`` — fraction of examples whose effect has the same sign (zero counts as its own sign);
  * ``top1_agreement`` — the responsible stage of an example is the one with the largest |effect|; per stage:
    of the examples replay holds stage k responsible for, the fraction the estimator also does (None if none);
    pooled: the fraction of all examples on which they agree;
  * ``aggregate_error`` — mean over slices (all, misclassified, class=c) of |estimated - replayed| slice-mean
    effect, in the behaviour's units (pooled: mean over stages);
  * ``confidence`` — max(0, pearson), and 1 for exact methods and for the last stage (its effect is exact).

Proxy, when no replay exists (`proxy_confidence`): rho_k = |Delta theta_k| * |theta_T - theta_{end,k}| /
|theta_{end,k}|^2 — the stage's displacement times the distance later training moved the parameters, relative
to their scale — mapped to 1 / (1 + rho_k / RHO_SCALE).  rho is 0 for the last stage (confidence 1: exact), and
grows as a stage moves more and more training follows it, the two things that made first-order estimates fail
on the sample run.  RHO_SCALE is calibrated on the sample run (docs/stage_attribution.md); with one run to
calibrate on, read it as an ordering of stages, not a probability.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from fgtrac_core.stages.training import Training

RHO_SCALE = 0.01
"""rho at which the proxy confidence is 1/2 (calibrated on the sample run, see docs/stage_attribution.md)."""


def _corr(kind: str, a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson, or Spearman (Pearson of average ranks), of two equal-length samples; None if undefined."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    if kind == "spearman":
        a, b = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    value = float(np.corrcoef(a, b)[0, 1])
    return value if math.isfinite(value) else None


def _top1(effects: np.ndarray) -> np.ndarray:
    """Index of the responsible stage of each example: effects is (stages, examples)."""
    return np.abs(effects).argmax(0)


def compare(
    estimate: np.ndarray,
    truth: np.ndarray,
    est_aggregates: np.ndarray,
    true_aggregates: np.ndarray,
) -> list[dict[str, float | int | None]]:
    """Faithfulness rows: one per stage (``stage`` = its index) and a pooled one (``stage`` = None).

    `estimate` and `truth` are (stages, examples) effects of one behaviour; the aggregates are (stages, slices)
    slice means of the same behaviour.
    """
    n_stages = truth.shape[0]
    top_est, top_true = _top1(estimate), _top1(truth)
    rows: list[dict[str, float | int | None]] = []
    for k in range(n_stages):
        mine = top_true == k
        rows.append(
            {
                "stage": k,
                "pearson": _corr("pearson", estimate[k], truth[k]),
                "spearman": _corr("spearman", estimate[k], truth[k]),
                "sign_agreement": float(np.mean(np.sign(estimate[k]) == np.sign(truth[k]))),
                "top1_agreement": float(np.mean(top_est[mine] == k)) if mine.any() else None,
                "aggregate_error": float(np.mean(np.abs(est_aggregates[k] - true_aggregates[k]))),
            }
        )
    pooled_est, pooled_true = estimate.ravel(), truth.ravel()
    rows.append(
        {
            "stage": None,
            "pearson": _corr("pearson", pooled_est, pooled_true),
            "spearman": _corr("spearman", pooled_est, pooled_true),
            "sign_agreement": float(np.mean(np.sign(pooled_est) == np.sign(pooled_true))),
            "top1_agreement": float(np.mean(top_est == top_true)),
            "aggregate_error": float(np.mean(np.abs(est_aggregates - true_aggregates))),
        }
    )
    for row in rows:
        row["confidence"] = measured_confidence(row["pearson"])
    rows[n_stages - 1]["confidence"] = 1.0
    return rows


def measured_confidence(pearson: float | None) -> float:
    """max(0, Pearson with replay); 0 when the correlation is undefined."""
    return max(0.0, pearson) if pearson is not None else 0.0


def proxy_confidences(training: Training, horizon: int | None = None) -> list[float]:
    """The proxy confidence of a first-order estimate of each stage's effect (no replay needed).

    With a partial-replay `horizon`, the later trajectory counts only for the fraction of later steps not
    replayed (an approximation: it assumes the parameters move evenly over those steps).
    """
    out = []
    for k, stage in enumerate(training.stages):
        names = [
            n for n in stage.end_model if n in stage.start_model and stage.end_model[n].is_floating_point()
        ]
        delta = _norm([stage.end_model[n] - stage.start_model[n] for n in names])
        later = _norm([training.final_model[n] - stage.end_model[n] for n in names])
        n_after = training.steps_after(k)
        if horizon is not None:
            later *= max(0.0, 1 - horizon / n_after) if n_after else 0.0
        rho = delta * later / max(_norm([stage.end_model[n] for n in names]), 1e-12) ** 2
        out.append(1.0 / (1.0 + rho / RHO_SCALE))
    return out


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))
