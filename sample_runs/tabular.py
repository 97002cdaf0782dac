"""The bundled tabular sample pipeline: a small MLP on scikit-learn's breast-cancer table, in two stages.

The tabular counterpart of `sample_runs.digits`: an ordinary PyTorch loop plus recorder calls.  Samples have no
image; each is registered with its 30 named feature values (``display=``), which is what a reviewer sees.  Stages:
  * ``pretrain``: SGD with momentum, one-cycle learning rate (and momentum) schedule, on a clean subset;
  * ``finetune``: AdamW on a disjoint subset in which ~15% of the labels were flipped (binary: y -> 1 - y).
The flipped labels' ground truth is stored as sample annotations for benchmarks; no fgtrac algorithm reads it.
Deterministic under a seed (bit for bit on the same machine and thread count).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fgtrac_core.tracking import NullRun, Run
from sample_runs.digits import _iter as _iter  # the same loop helpers as the digits pipeline
from sample_runs.digits import evaluate

NOISE_RATE = 0.15
BATCH_SIZE = 32
N_TEST, N_VAL, N_PRETRAIN = 120, 60, 200
SOURCE = "sklearn.datasets.load_breast_cancer"


class TabularMLP(nn.Module):
    """30 -> 32 -> 16 -> 2 with ReLU; no dropout or BatchNorm (replay stays exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(30, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class TabularData:
    """Sample ids, raw feature rows (float64), model inputs and labels, and the split/subset assignment."""

    ids: np.ndarray
    raw: np.ndarray
    feature_names: list[str]
    x: torch.Tensor
    y: torch.Tensor
    true_y: np.ndarray
    split: np.ndarray
    subsets: dict[str, np.ndarray]
    mean: np.ndarray
    std: np.ndarray


def load_raw() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The source table: float64 feature rows (569 x 30), labels (0 malignant, 1 benign), feature names."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    raw = np.ascontiguousarray(bunch.data, dtype=np.float64)
    return raw, bunch.target.astype(np.int64), [str(f) for f in bunch.feature_names]


def source_content_hashes() -> dict[int, str]:
    """SHA-256 of every sample's raw bytes (C-order float64 row), re-read from the source (`fgtrac verify`)."""
    raw, _, _ = load_raw()
    return {i: hashlib.sha256(np.ascontiguousarray(r).tobytes()).hexdigest() for i, r in enumerate(raw)}


def load_data(seed: int = 0) -> TabularData:
    """Split the table into train/val/test, flip ~15% of the finetune subset's labels, standardise each feature
    with the train split's mean and standard deviation."""
    raw, true_y, feature_names = load_raw()
    n = len(raw)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    split = np.empty(n, dtype=object)
    split[order[:N_TEST]] = "test"
    split[order[N_TEST : N_TEST + N_VAL]] = "val"
    train = order[N_TEST + N_VAL :]
    split[train] = "train"
    pretrain, finetune = np.sort(train[:N_PRETRAIN]), np.sort(train[N_PRETRAIN:])
    y = true_y.copy()
    flipped = rng.choice(finetune, size=round(NOISE_RATE * len(finetune)), replace=False)
    y[flipped] = 1 - true_y[flipped]
    mean, std = raw[train].mean(axis=0), raw[train].std(axis=0)
    x = torch.from_numpy(((raw - mean) / std).astype(np.float32))
    return TabularData(
        ids=np.arange(n, dtype=np.int64),
        raw=raw,
        feature_names=feature_names,
        x=x,
        y=torch.from_numpy(y),
        true_y=true_y,
        split=split,
        subsets={"pretrain": pretrain, "finetune": finetune},
        mean=mean,
        std=std,
    )


@functools.lru_cache(maxsize=2)
def _cached_data(seed: int) -> TabularData:
    return load_data(seed)


def model_inputs(config: dict[str, Any], sample_ids: Any) -> torch.Tensor:
    """The standardised model inputs of these sample ids (the run config's `inputs`, see fgtrac_core.pipeline)."""
    return _cached_data(int(config.get("seed", 0))).x[torch.from_numpy(np.array(sample_ids, dtype=np.int64))]


def displays(raw: np.ndarray, feature_names: list[str]) -> list[dict[str, float]]:
    """Per sample, each feature's raw value rounded to 4 significant digits (what a reviewer sees)."""
    return [{name: float(f"{v:.4g}") for name, v in zip(feature_names, row, strict=True)} for row in raw]


def _loader(data: TabularData, idx: np.ndarray, seed: int, batch_size: int) -> DataLoader:
    ids = torch.from_numpy(idx)
    dataset = TensorDataset(ids, data.x[ids], data.y[ids])
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


STAGES: dict[str, dict[str, Any]] = {
    "pretrain": {"epochs": 16, "checkpoint_every": 2},
    "finetune": {"epochs": 10, "checkpoint_every": 2},
}


def _make_optimizer(stage: str, model: nn.Module, n_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    if stage == "pretrain":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=n_steps)
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2), None


def train(
    data: TabularData,
    run: Run | NullRun,
    *,
    seed: int = 0,
    progress: bool = False,
    stages: dict[str, dict[str, Any]] = STAGES,
    batch_size: int = BATCH_SIZE,
) -> nn.Module:
    """Train the stages (name -> epochs, checkpoint_every); every recorder call is on `run` (a `NullRun` records
    nothing)."""
    torch.manual_seed(seed)
    model = TabularMLP()
    val = data.split == "val"
    x_val, y_val = data.x[val], data.y[val]
    step = 0
    for stage_no, (stage, cfg) in enumerate(stages.items()):
        loader = _loader(data, data.subsets[stage], seed + 1000 * stage_no, batch_size)
        n_steps = cfg["epochs"] * len(loader)
        opt, sched = _make_optimizer(stage, model, n_steps)
        with run.stage(stage, optimizer=opt, scheduler=sched, model=model, epochs=cfg["epochs"]):
            for epoch in range(cfg["epochs"]):
                for ids, x, y in _iter(loader, progress, f"{stage} epoch {epoch + 1}/{cfg['epochs']}"):
                    lr = opt.param_groups[0]["lr"]
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                    run.log_batch(ids, step=step, epoch=epoch, lr=lr, loss=loss, targets=y)
                    step += 1
                if (epoch + 1) % cfg["checkpoint_every"] == 0:
                    val_loss, val_acc = evaluate(model, x_val, y_val)
                    run.checkpoint(
                        model, opt, epoch=epoch, val_loss=val_loss, metrics={"val_accuracy": val_acc}
                    )
    return model


def record_dataset(run: Run | NullRun, data: TabularData) -> None:
    """Register every sample (content hash of the raw float64 row, named feature values, no thumbnail) and the
    preprocessing applied."""
    for split in ("train", "val", "test"):
        idx = np.flatnonzero(data.split == split)
        run.register_samples(
            data.ids[idx],
            split=split,
            labels=data.y[idx].numpy(),
            raw=data.raw[idx],
            display=displays(data.raw[idx], data.feature_names),
            source=SOURCE,
        )
    run.log_transform(
        "standardize", data.ids, mean=data.mean.tolist(), std=data.std.tolist(), fitted_on="train"
    )
    finetune = data.subsets["finetune"]
    run.annotate_samples(
        finetune, "label_flipped", (data.y[finetune].numpy() != data.true_y[finetune]).tolist()
    )
    run.annotate_samples(finetune, "true_label", data.true_y[finetune].tolist())


def configure_determinism() -> None:
    torch.use_deterministic_algorithms(True)


def build(out_dir: str | Path, *, seed: int = 0, progress: bool = False, name: str = "tabular-demo") -> Path:
    """Build the recorded sample run into `out_dir` (refuses a directory that already holds a run)."""
    configure_determinism()
    data = load_data(seed)
    config = {
        "pipeline": "sample_runs.tabular",
        "seed": seed,
        "noise_rate": NOISE_RATE,
        "batch_size": BATCH_SIZE,
        "torch_threads": torch.get_num_threads(),
        "model": "sample_runs.tabular:TabularMLP",
        "inputs": "sample_runs.tabular:model_inputs",
        "head_layer": "head",
    }
    with Run.create(out_dir, name=name, config=config) as run:
        record_dataset(run, data)
        train(data, run, seed=seed, progress=progress)
    return Path(out_dir)
