"""Mislabel detection on digits: rank the training samples by how suspicious they look and count how many of the
flipped labels each ranking puts first.

10% of the training labels are flipped, in two ways: *random* (to any other class) and *hard* (to the class a
clean model finds most confusable with the true one: the same MLP trained on the clean labels, its
second-ranked class — so the flipped labels look plausible to exactly the kind of model that is then scored).
On the same noisy training set, the rankings compared are:

* self-influence, SGD form (`mode="last_layer"`) over every epoch's checkpoint of the SGD-trained MLP;
* self-influence of the AdamW-trained MLP, in the SGD form and AdamW-aware (`mode="adamw"`, preconditioned by the
  checkpoints' recorded optimizer state);
* the final model's per-sample loss (SGD- and AdamW-trained);
* cleanlab's label-quality scores (`cleanlab.rank.get_label_quality_scores`, lowest quality first) from 5-fold
  cross-validated probabilities of a logistic regression.

Figures: ROC-AUC of each score for "is flipped", and the recall (share of flipped samples found) when 5%, 10% and
20% of the training set are inspected in score order; means over `seeds` noise draws (also the model seeds).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator
from typing import Any

import cleanlab
import numpy as np
import sklearn
import torch
import torch.nn.functional as F
from cleanlab.rank import get_label_quality_scores
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict, train_test_split
from threadpoolctl import threadpool_limits
from torch import nn

from fgtrac_core.errors import FgtracError
from fgtrac_core.influence import self_influence

NOISE_RATE = 0.10
EPOCHS = 20
BATCH_SIZE = 32
HIDDEN = 64
INSPECTED = (0.05, 0.10, 0.20)
NOISE_KINDS = ("random", "hard")
OPTIMIZERS = {"sgd": {"lr": 0.05, "momentum": 0.9}, "adamw": {"lr": 1e-3, "weight_decay": 1e-2}}

# method key -> label; the order is the table's
METHODS = {
    "self_influence_sgd": "self-influence, SGD form (SGD-trained)",
    "self_influence_adamw_sgd_form": "self-influence, SGD form (AdamW-trained)",
    "self_influence_adamw": "self-influence, AdamW-aware (AdamW-trained)",
    "final_loss_sgd": "final loss (SGD-trained)",
    "final_loss_adamw": "final loss (AdamW-trained)",
    "cleanlab": "cleanlab label quality (CV logistic regression)",
}

Checkpoints = list[tuple[dict[str, Any], float]]


class MLP(nn.Module):
    """64 -> hidden -> 10 with ReLU; `head` is the final layer that last-layer influence differentiates."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x)))


def train_mlp(x: torch.Tensor, y: torch.Tensor, optimizer: str, seed: int) -> tuple[nn.Module, Checkpoints]:
    """Mini-batch training; a `{"model", "optimizer"}` checkpoint with its learning rate after every epoch."""
    torch.manual_seed(seed)
    model = MLP()
    params = OPTIMIZERS[optimizer]
    opt = (
        torch.optim.SGD(model.parameters(), **params)
        if optimizer == "sgd"
        else torch.optim.AdamW(model.parameters(), **params)
    )
    gen = torch.Generator().manual_seed(seed)
    checkpoints: Checkpoints = []
    for _ in range(EPOCHS):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        checkpoints.append(({"model": state, "optimizer": copy.deepcopy(opt.state_dict())}, params["lr"]))
    return model, checkpoints


def flip_labels(
    y: np.ndarray, kind: str, rng: np.random.Generator, confusable: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask): NOISE_RATE of the samples, chosen at random, get another class — any other
    (random) or `confusable[i]` (hard)."""
    idx = rng.choice(len(y), round(NOISE_RATE * len(y)), replace=False)
    noisy = y.copy()
    if kind == "random":
        noisy[idx] = (y[idx] + rng.integers(1, 10, len(idx))) % 10
    else:
        noisy[idx] = confusable[idx]
    flipped = noisy != y
    assert flipped.sum() == len(idx)
    return noisy, flipped


def detection_figures(flipped: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """ROC-AUC and recall at each inspected fraction for a score where higher = more suspicious."""
    order = np.argsort(-score, kind="stable")
    out = {"auc": float(roc_auc_score(flipped, score))}
    for q in INSPECTED:
        top = order[: math.ceil(q * len(score))]
        out[f"recall_{round(q * 100)}"] = float(flipped[top].sum() / flipped.sum())
    return out


@torch.no_grad()
def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return F.cross_entropy(model(x), y, reduction="none").numpy()


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def _scores(
    x_np: np.ndarray,
    x: torch.Tensor,
    noisy: np.ndarray,
    seed: int,
    test: tuple[torch.Tensor, torch.Tensor],
) -> tuple[dict[str, np.ndarray | str], dict[str, float]]:
    """Every method's suspicion score (higher = more suspicious; a string says why a method is unavailable) and
    the trained models' test accuracies."""
    y = torch.from_numpy(noisy)
    train = (x, y)
    sgd_model, sgd_ckpts = train_mlp(x, y, "sgd", seed)
    aw_model, aw_ckpts = train_mlp(x, y, "adamw", seed)
    scores: dict[str, np.ndarray | str] = {
        "self_influence_sgd": self_influence(sgd_model, "head", train, sgd_ckpts, device="cpu").numpy(),
        "self_influence_adamw_sgd_form": self_influence(
            aw_model, "head", train, aw_ckpts, device="cpu"
        ).numpy(),
    }
    try:
        scores["self_influence_adamw"] = self_influence(
            aw_model, "head", train, aw_ckpts, mode="adamw", device="cpu"
        ).numpy()
    except FgtracError as e:  # a build of fgtrac without the AdamW-aware mode
        scores["self_influence_adamw"] = str(e)
    scores["final_loss_sgd"] = _losses(sgd_model, x, y)
    scores["final_loss_adamw"] = _losses(aw_model, x, y)
    probs = cross_val_predict(LogisticRegression(max_iter=2000), x_np, noisy, cv=5, method="predict_proba")
    scores["cleanlab"] = -get_label_quality_scores(noisy, probs)  # low quality = suspicious
    accuracy = {"sgd": _accuracy(sgd_model, *test), "adamw": _accuracy(aw_model, *test)}
    return scores, accuracy


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One torch thread and one BLAS/OpenMP thread for the block.

    On the shared 2-core machine extra threads mostly spin waiting for a busy core: the cross-validated logistic
    regression took 30 s with the default BLAS threads and 0.3 s with one, under load from other processes.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


def measure(quick: bool = False) -> dict[str, Any]:
    """Mislabel-detection figures per noise kind and method (means over seeds, and per seed)."""
    with single_threaded():
        return _measure(quick)


def _measure(quick: bool) -> dict[str, Any]:
    seeds = [0] if quick else [0, 1, 2]
    digits = load_digits()
    x_all, y_all = (digits.data / 16.0).astype(np.float32), digits.target
    x_np, x_te, y_clean, y_te = train_test_split(x_all, y_all, test_size=360, stratify=y_all, random_state=0)
    x = torch.from_numpy(x_np)
    test = (torch.from_numpy(x_te), torch.from_numpy(y_te))
    t0 = time.perf_counter()
    per_seed: dict[str, list[dict[str, Any]]] = {kind: [] for kind in NOISE_KINDS}
    for seed in seeds:
        # the most confusable other class under a clean model: its highest-probability wrong class
        clean_model, _ = train_mlp(x, torch.from_numpy(y_clean), "sgd", seed)
        with torch.no_grad():
            logits = clean_model(x)
        logits[torch.arange(len(x)), torch.from_numpy(y_clean)] = -math.inf
        confusable = logits.argmax(1).numpy()
        for kind in NOISE_KINDS:
            rng = np.random.default_rng(1000 * seed + NOISE_KINDS.index(kind))
            noisy, flipped = flip_labels(y_clean, kind, rng, confusable)
            scores, accuracy = _scores(x_np, x, noisy, seed, test)
            per_seed[kind].append(
                {
                    "seed": seed,
                    "n_flipped": int(flipped.sum()),
                    "test_accuracy": accuracy,
                    "methods": {
                        k: ({"unavailable": s} if isinstance(s, str) else detection_figures(flipped, s))
                        for k, s in scores.items()
                    },
                }
            )
    noise: dict[str, Any] = {}
    for kind, runs in per_seed.items():
        methods: dict[str, Any] = {}
        for key in METHODS:
            figs = [r["methods"][key] for r in runs]
            if any("unavailable" in f for f in figs):
                methods[key] = {"unavailable": next(f["unavailable"] for f in figs if "unavailable" in f)}
                continue
            methods[key] = {name: float(np.mean([f[name] for f in figs])) for name in figs[0]} | {
                f"{name}_std": float(np.std([f[name] for f in figs])) for name in figs[0]
            }
        goal = {}
        for key in ("self_influence_sgd", "self_influence_adamw"):
            if "unavailable" not in methods[key]:
                goal[key] = bool(methods[key]["recall_10"] >= methods["cleanlab"]["recall_10"])
        noise[kind] = {
            "methods": methods,
            "goal_recall10_vs_cleanlab": goal,
            "test_accuracy": {
                opt: float(np.mean([r["test_accuracy"][opt] for r in runs])) for opt in OPTIMIZERS
            },
            "per_seed": runs,
        }
    return {
        "quick": quick,
        "seeds": seeds,
        "n_train": len(x_np),
        "n_test": len(x_te),
        "noise_rate": NOISE_RATE,
        "epochs": EPOCHS,
        "hidden": HIDDEN,
        "optimizers": OPTIMIZERS,
        "versions": {"cleanlab": cleanlab.__version__, "scikit-learn": sklearn.__version__},
        "noise": noise,
        "seconds": time.perf_counter() - t0,
    }


def summarise(r: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    tables = []
    for kind, n in r["noise"].items():
        rows = []
        for key, label in METHODS.items():
            m = n["methods"][key]
            if "unavailable" in m:
                rows.append(f"| {label} | not available in this build | | | |")
                continue
            cells = [f"{m[name]:.3f}" + (f" ± {m[name + '_std']:.3f}" if len(r["seeds"]) > 1 else "")
                     for name in ("auc", "recall_5", "recall_10", "recall_20")]  # fmt: skip
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
        acc = n["test_accuracy"]
        tables.append(
            f"**{kind} flips** (MLP test accuracy on clean test labels: SGD {acc['sgd']:.3f}, "
            f"AdamW {acc['adamw']:.3f})\n\n"
            "| method | ROC-AUC | recall @5% | recall @10% | recall @20% |\n|---|---|---|---|---|\n"
            + "\n".join(rows)
        )
    goals = []
    for key in ("self_influence_sgd", "self_influence_adamw"):
        verdicts = []
        for kind, n in r["noise"].items():
            if key not in n["goal_recall10_vs_cleanlab"]:
                verdicts.append(f"{kind}: not evaluated (mode unavailable)")
                continue
            ours, theirs = n["methods"][key]["recall_10"], n["methods"]["cleanlab"]["recall_10"]
            verdicts.append(
                f"{kind}: {ours:.3f} vs {theirs:.3f} — {'met' if n['goal_recall10_vs_cleanlab'][key] else 'not met'}"
            )
        goals.append(f"- {METHODS[key]}: " + "; ".join(verdicts))
    seeds = r["seeds"]
    return f"""## Mislabel detection (digits, {r["noise_rate"]:.0%} flipped labels)

{r["n_train"]} training digits ({r["n_test"]} held out for the accuracy figures), inputs scaled to [0, 1]. A
{r["hidden"]}-unit ReLU MLP trained {r["epochs"]} epochs (batch 32) with SGD (lr {r["optimizers"]["sgd"]["lr"]},
momentum {r["optimizers"]["sgd"]["momentum"]}) and, separately, AdamW (lr {r["optimizers"]["adamw"]["lr"]}, weight
decay {r["optimizers"]["adamw"]["weight_decay"]}), a `{{"model", "optimizer"}}` checkpoint after every epoch;
self-influence sums over all of them. *Random* flips go to any other class; *hard* flips to the clean model's
most confusable other class (the same MLP trained on clean labels, its highest-scoring wrong class). cleanlab
{r["versions"]["cleanlab"]} label-quality scores from 5-fold cross-validated logistic-regression probabilities
(scikit-learn {r["versions"]["scikit-learn"]}). Same noisy training set for every method;
{"one seed" if len(seeds) == 1 else f"mean ± std over {len(seeds)} seeds (noise draw and model initialisation)"}.
Recall @q: share of the flipped samples among the top q of the training set in score order (at most 0.5 at 5%,
since 10% are flipped). One torch and one BLAS thread.

{chr(10).join(t + chr(10) for t in tables)}
Goal: self-influence recall @10% >= cleanlab's on both noise kinds:
{chr(10).join(goals)}

Run time: {r["seconds"]:.0f} s.
"""


if __name__ == "__main__":
    import json
    import sys

    res = measure(quick="--quick" in sys.argv)
    print(json.dumps({k: v for k, v in res.items() if k != "noise"}, indent=2))
    print(summarise(res))
