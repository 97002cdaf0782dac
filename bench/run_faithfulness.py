"""Influence faithfulness on a recorded multi-stage run: the sample run, every influence form fgtrac offers, judged
by exact replays of that run (`fgtrac influence RUN --check K`), not by a stand-in training.

The LOO/LDS settings of `bench/faithfulness.py` use every sample equally in every checkpoint interval at one
learning rate, so usage-aware weighting cannot differ there from checkpoint weighting.  The sample run is where
they part: three stages (SGD pretrain on one subset, AdamW finetune with flipped labels on another, SGD adapt),
learning rates from 0.05 down to 0.001.  Per form:

* **LDS** from `--check K`: K replays of the recorded run, each without a seeded random half of the training
  samples (the same halves for every form), Spearman per test example between a half's summed scores and the
  replayed model's negated test loss, averaged over the test examples;
* **review**: for each misclassified test example, whether its top 5 proponents include a training digit whose
  label was flipped (the recorded ground truth, read by no algorithm), and the real effect of its top 5
  proponents: the run replayed without them, the change of that example's loss (a proponent lowered the loss,
  so removing true proponents should raise it), beside the same replay without 5 random training samples.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fgtrac_core.errors import FgtracError
from fgtrac_core.influence.run_influence import run_influence
from fgtrac_core.store import RunStore

# (mode, weighting) of every form; adamw_influence and exact replay the run, the others read checkpoints
FORMS = (
    ("last_layer", "checkpoint"),
    ("last_layer", "usage"),
    ("adamw", "checkpoint"),
    ("adamw", "usage"),
    ("full", "checkpoint"),
    ("full", "usage"),
    ("exact", "usage"),
    ("adamw_influence", "usage"),
    ("influence_function", None),  # one term at the final checkpoint: no weighting
)
TOP = 5  # proponents removed per misclassified test example


def _review(run_dir: Path, analysis_id: int, n_tests: int) -> dict[str, Any]:
    """Flagged-proponent hits and the replayed effect of removing each misclassified example's top proponents."""
    from fgtrac_core.influence.check import replay_without
    from fgtrac_core.influence.run_influence import _split
    from fgtrac_core.pipeline import load_pipeline
    from fgtrac_core.stages._records import load_training
    from fgtrac_core.stages.replay import deterministic

    with RunStore(run_dir) as store:
        pipeline = load_pipeline(store.meta().get("config", "{}"), need_head=True)
        records = load_training(store, pipeline)
        train_ids = store.samples("train").sample_id.to_numpy(np.int64)
        wrong = [int(t) for t in store.influence_tests(analysis_id).query("misclassified").sample_id][:n_tests]
        tops = [store.influence_topk(analysis_id, t) for t in wrong]
        _, x_te, y_te = _split(store, pipeline, "test", wrong)
    hits, removed = [], []
    for top in tops:
        pro = top[(top.direction == "proponent") & (top["rank"] <= TOP)]
        hits.append(bool(pro.flagged.any()))
        removed.append(pro.train_id.to_numpy(np.int64))
    rng = np.random.default_rng(0)
    with deterministic(records.config.get("torch_threads")):
        base = replay_without(records.training, train_ids, np.ones(len(train_ids), bool), (x_te, y_te))
        effect, random_effect = [], []
        for j, ids in enumerate(removed):
            keep = ~np.isin(train_ids, ids)
            effect.append(float(replay_without(records.training, train_ids, keep, (x_te, y_te))[j] - base[j]))
            keep = ~np.isin(train_ids, rng.choice(train_ids, TOP, replace=False))
            random_effect.append(float(replay_without(records.training, train_ids, keep, (x_te, y_te))[j] - base[j]))
    return {
        "misclassified": len(wrong),
        "flagged_hits": int(sum(hits)),
        "removal_effect": effect,
        "random_removal_effect": random_effect,
    }


def measure(quick: bool = False) -> dict[str, Any]:
    """Build the sample run, then every form with `--check` and the review's replays."""
    from sample_runs import digits

    k_replays, n_tests = (3, 3) if quick else (16, 10)
    forms = FORMS[:2] if quick else FORMS
    out: dict[str, Any] = {"quick": quick, "replays": k_replays, "forms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = digits.build(Path(tmp) / "run")
        for mode, weighting in forms:
            t0 = time.perf_counter()
            try:
                s = run_influence(run_dir, mode=mode, k=20, weighting=weighting, check=k_replays, force=True)
            except FgtracError as exc:
                out["forms"][_name(mode, weighting)] = {"unavailable": str(exc)}
                continue
            seconds = time.perf_counter() - t0
            entry = {
                "mode": mode,
                "weighting": weighting,
                "lds": s.check["lds"],
                "check_seconds": s.check["seconds"],
                "seconds": seconds,
            }
            entry.update(_review(run_dir, s.analysis_id, n_tests))
            out["forms"][_name(mode, weighting)] = entry
    return out


def _name(mode: str, weighting: str | None) -> str:
    return mode if weighting is None else f"{mode}/{weighting}"


def _mean_se(values: list[float]) -> str:
    """'mean ± standard error' over the misclassified examples."""
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):+.3f} ± {se:.3f}"


def summarise(r: dict[str, Any]) -> str:
    rows = []
    for name, e in r["forms"].items():
        if "unavailable" in e:
            rows.append(f"| {name} | not available: {e['unavailable']} | | | | |")
            continue
        flags = f"--mode {e['mode']}" + (f" --weighting {e['weighting']}" if e["weighting"] else "")
        rows.append(
            f"| `{flags}` | {e['lds']:.3f} | "
            f"{e['flagged_hits']}/{e['misclassified']} | {_mean_se(e['removal_effect'])} | "
            f"{_mean_se(e['random_removal_effect'])} | {e['seconds'] - e['check_seconds']:.1f} |"
        )
    return f"""## Influence faithfulness on the sample run (exact replays of the recorded run)

The digits sample run (3 stages), {"two forms (quick run)" if r["quick"] else "every form fgtrac offers"}. *LDS*: `fgtrac
influence RUN --check {r["replays"]}` ({r["replays"]} exact replays without random halves of the training set, the
same halves for every form). *Flagged in top {TOP}*: misclassified test digits whose top {TOP} proponents include a
flipped-label training digit. *Removal effect*: mean change of a misclassified example's test loss when the run is
replayed without its top {TOP} proponents (true proponents raise it), beside the same replay without {TOP} random
training samples (mean ± standard error over the misclassified examples). Scoring seconds exclude the replays.

| form | LDS | flagged in top {TOP} | removal effect | random {TOP} removed | scoring (s) |
|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


if __name__ == "__main__":
    import json
    import sys

    res = measure(quick="--quick" in sys.argv)
    print(json.dumps(res, indent=2))
    print(summarise(res))
