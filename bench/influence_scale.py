"""Influence at scale: 60k training x 10k test samples x 10 checkpoints, last-layer TracInCP review job (top-k
proponents and opponents of every test sample, every training sample's self-influence), on this machine's CPU.

Runs in a fresh subprocess so the peak resident memory it reports (ru_maxrss) belongs to this job alone.  The
model is a small MLP on synthetic inputs (64 -> 128 -> 10, the head's input is 128-dimensional); checkpoints are
the MLP's parameters after successive SGD epochs on the synthetic task.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _problem(n_train: int, n_test: int, n_checkpoints: int) -> tuple[nn.Module, Any, Any, list[Any]]:
    """The synthetic task: model, (x, y) train and test, and `n_checkpoints` (state, lr) after SGD epochs."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 64, generator=gen)
    y_tr = torch.randint(0, 10, (n_train,), generator=gen)
    y_te = torch.randint(0, 10, (n_test,), generator=gen)
    x_tr = centers[y_tr] + 2 * torch.randn(n_train, 64, generator=gen)
    x_te = centers[y_te] + 2 * torch.randn(n_test, 64, generator=gen)
    torch.manual_seed(0)
    model = _MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    checkpoints = []
    for _ in range(n_checkpoints):
        for b in range(0, n_train, 1024):
            opt.zero_grad()
            F.cross_entropy(model(x_tr[b : b + 1024]), y_tr[b : b + 1024]).backward()
            opt.step()
        checkpoints.append(({k_: v.clone() for k_, v in model.state_dict().items()}, 0.05))
    return model, (x_tr, y_tr), (x_te, y_te), checkpoints


def _job(n_train: int, n_test: int, n_checkpoints: int, k: int) -> dict[str, Any]:
    from fgtrac_core.influence import review

    model, (x_tr, y_tr), (x_te, y_te), checkpoints = _problem(n_train, n_test, n_checkpoints)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    rev = review(model, "head", (x_tr, y_tr), (x_te, y_te), checkpoints, k=k)
    seconds = time.perf_counter() - t0
    assert rev.top.proponent_indices.shape == (n_test, min(k, n_train))
    return {
        "n_train": n_train,
        "n_test": n_test,
        "checkpoints": n_checkpoints,
        "k": k,
        "seconds": seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_before_gib": base_rss / 2**20,
        "torch_threads": torch.get_num_threads(),
        "pairs_per_second": n_train * n_test * n_checkpoints / seconds,
    }


def measure(quick: bool = False) -> dict[str, Any]:
    """Run the job in a subprocess (quick: 6k x 1k x 3) and return its figures."""
    shape = (6_000, 1_000, 3) if quick else (60_000, 10_000, 10)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.influence_scale", *map(str, shape)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(r: dict[str, Any]) -> str:
    return (
        f"influence at scale ({r['n_train']:,} train x {r['n_test']:,} test x {r['checkpoints']} checkpoints, "
        f"top-{r['k']} both ways + self-influence, last layer): {r['seconds']:.1f} s, peak RSS "
        f"{r['peak_rss_gib']:.2f} GiB ({r['pairs_per_second'] / 1e9:.2f} G pair-checkpoints/s, "
        f"{r['torch_threads']} threads)"
    )


if __name__ == "__main__":
    if len(sys.argv) == 4:
        print(json.dumps(_job(*map(int, sys.argv[1:]), k=50)))
    else:
        print(report(measure()))
