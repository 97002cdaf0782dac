"""Influence speed on the sample run: fgtrac's last-layer TracInCP vs Captum's TracInCPFast, same checkpoints, same
data, interleaved repetitions in one process (bias gradient left out on both sides: Captum's convention).

(a) the review job: top-k proponents and opponents of every test example plus every training sample's
self-influence; (b) the full test x train score matrix, also against the bare matmuls it needs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fgtrac_core import RunStore
from fgtrac_core.influence import head_factors, load_state_dict, review, select_checkpoints, tracin
from sample_runs import digits


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(repeats: int = 5, k: int = 20) -> dict[str, Any]:
    from captum.influence import TracInCPFast

    with tempfile.TemporaryDirectory() as tmp:
        run = digits.build(Path(tmp) / "run")
        with RunStore(run) as store:
            ck = store.checkpoints()
        chosen = select_checkpoints(ck["val_loss"].tolist())
        checkpoints = [(str(run / ck.path[c.index]), float(ck.lr[c.index])) for c in chosen]
        data = digits.load_data(0)
        tr, te = np.flatnonzero(data.split == "train"), np.flatnonzero(data.split == "test")
        train, test = (data.x[tr], data.y[tr]), (data.x[te], data.y[te])
        model = digits.DigitsCNN()
        lrs = dict(checkpoints)

        def load(m: nn.Module, path: str) -> float:
            m.load_state_dict(load_state_dict(path))
            return lrs[path]

        captum = TracInCPFast(
            model, model.head, TensorDataset(*train), [p for p, _ in checkpoints], checkpoints_load_func=load,
            loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=512,
        )  # fmt: skip

        def ours_review() -> None:
            review(model, "head", train, test, checkpoints, k=k, include_bias=False)

        def captum_review() -> None:
            captum.influence(test, k=k, proponents=True)
            captum.influence(test, k=k, proponents=False)
            captum.self_influence()

        def ours_full() -> None:
            tracin(model, "head", train, test, checkpoints, include_bias=False)

        def captum_full() -> None:
            captum.influence(test, k=None)

        # the scoring phase alone (gradient features precomputed), through the same private helpers `tracin` uses:
        # the part of the full-matrix job that the bare matmuls below are a floor for
        from fgtrac_core.influence.tracin import _full_matrix, _Options

        opts = _Options(include_bias=False)
        features = opts.features(model, "head", [(test, "test"), (train, "train")], checkpoints)

        def ours_scoring() -> None:
            _full_matrix(features, opts, normalize=False)

        factors = []
        for path, lr in checkpoints:
            model.load_state_dict(load_state_dict(path))
            factors.append((lr, head_factors(model, "head", test), head_factors(model, "head", train)))

        def bare_matmuls() -> None:
            for lr, (dt, at), (dr, ar) in factors:
                _ = lr * (dt @ dr.T) * (at @ ar.T)

        times: dict[str, list[float]] = {
            n: []
            for n in ("ours_review", "captum_review", "ours_full", "captum_full", "ours_scoring", "matmuls")
        }
        fns = {"ours_review": ours_review, "captum_review": captum_review, "ours_full": ours_full,
               "captum_full": captum_full, "ours_scoring": ours_scoring, "matmuls": bare_matmuls}  # fmt: skip
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(_timed(fn))
    med = {n: statistics.median(v) for n, v in times.items()}
    return {
        "repeats": repeats,
        "k": k,
        "n_train": len(tr),
        "n_test": len(te),
        "checkpoints": len(checkpoints),
        "torch_threads": torch.get_num_threads(),
        **{f"{n}_s": v for n, v in med.items()},
        "review_speedup": med["captum_review"] / med["ours_review"],
        "full_speedup": med["captum_full"] / med["ours_full"],
        "full_vs_matmuls": med["ours_full"] / med["matmuls"],
        "scoring_vs_matmuls": med["ours_scoring"] / med["matmuls"],
    }


def report(r: dict[str, Any]) -> str:
    return (
        f"influence ({r['n_test']} test x {r['n_train']} train, {r['checkpoints']} checkpoints, median of {r['repeats']}): "
        f"review job (top-{r['k']} both ways + self-influence) fgtrac {r['ours_review_s']:.3f} s vs Captum "
        f"{r['captum_review_s']:.3f} s = {r['review_speedup']:.1f}x; full matrix fgtrac {r['ours_full_s']:.3f} s vs "
        f"Captum {r['captum_full_s']:.3f} s = {r['full_speedup']:.1f}x, {r['full_vs_matmuls']:.1f}x the bare matmuls "
        f"({r['matmuls_s']:.3f} s; fgtrac's time includes the forward/backward passes for the factors); scoring "
        f"phase alone {r['ours_scoring_s']:.3f} s = {r['scoring_vs_matmuls']:.2f}x the bare matmuls"
    )


if __name__ == "__main__":
    print(report(measure()))
