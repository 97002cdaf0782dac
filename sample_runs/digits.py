"""The bundled sample pipeline: a small CNN on scikit-learn's handwritten digits, in three stages.

An ordinary PyTorch loop plus recorder calls — the example to copy.  Stages:
  * ``pretrain``: SGD with momentum and weight decay, cosine learning rate, on a clean subset;
  * ``finetune``: AdamW on a disjoint subset in which ~10% of the labels were flipped to another class;
  * ``adapt``: a short, low-learning-rate SGD pass over a mix of both subsets.
The flipped labels' ground truth is stored as sample annotations for benchmarks; no fgtrac algorithm reads it.
Deterministic under a seed (bit for bit on the same machine and thread count).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fgtrac_core.tracking import NullRun, Run
from sample_runs.digits_source import load_raw

NOISE_RATE = 0.10
BATCH_SIZE = 32


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, max-pool, two linear layers; no dropout or BatchNorm (replay stays exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class DigitsData:
    """Sample ids, raw images (uint8, 0..16), model inputs and labels, and the split/subset assignment."""

    ids: np.ndarray
    raw: np.ndarray
    x: torch.Tensor
    y: torch.Tensor
    true_y: np.ndarray
    split: np.ndarray
    subsets: dict[str, np.ndarray]
    mean: float
    std: float


def load_data(seed: int = 0) -> DigitsData:
    """Split digits into train/val/test, flip ~10% of the finetune subset's labels, standardise inputs."""
    raw, true_y = load_raw()
    n = len(raw)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_test, n_val, n_pre = 360, 180, 600
    split = np.empty(n, dtype=object)
    split[order[:n_test]] = "test"
    split[order[n_test : n_test + n_val]] = "val"
    train = order[n_test + n_val :]
    split[train] = "train"
    pretrain, finetune = np.sort(train[:n_pre]), np.sort(train[n_pre:])
    adapt = np.sort(rng.choice(train, size=200, replace=False))
    y = true_y.copy()
    flipped = rng.choice(finetune, size=round(NOISE_RATE * len(finetune)), replace=False)
    y[flipped] = (true_y[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    scaled = raw.astype(np.float32) / 16.0
    mean, std = float(scaled[train].mean()), float(scaled[train].std())
    x = torch.from_numpy((scaled - mean) / std).unsqueeze(1)
    return DigitsData(
        ids=np.arange(n, dtype=np.int64),
        raw=raw,
        x=x,
        y=torch.from_numpy(y),
        true_y=true_y,
        split=split,
        subsets={"pretrain": pretrain, "finetune": finetune, "adapt": adapt},
        mean=mean,
        std=std,
    )


@functools.lru_cache(maxsize=2)
def _cached_data(seed: int) -> DigitsData:
    return load_data(seed)


def model_inputs(config: dict[str, Any], sample_ids: np.ndarray) -> torch.Tensor:
    """The standardised model inputs of these sample ids (the run config's `inputs`, see fgtrac_core.pipeline)."""
    return _cached_data(int(config.get("seed", 0))).x[torch.from_numpy(np.array(sample_ids, dtype=np.int64))]


def thumbnails(raw: np.ndarray) -> np.ndarray:
    """Dark ink on white, 0..255, for the thumbnails (upscaled when encoded)."""
    return (255 - np.minimum(raw.astype(np.int32) * 16, 255)).astype(np.uint8)


def _loader(data: DigitsData, idx: np.ndarray, seed: int, batch_size: int) -> DataLoader:
    ids = torch.from_numpy(idx)
    dataset = TensorDataset(ids, data.x[ids], data.y[ids])
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy."""
    logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


STAGES: dict[str, dict[str, Any]] = {
    "pretrain": {"epochs": 10, "checkpoint_every": 2},
    "finetune": {"epochs": 6, "checkpoint_every": 2},
    "adapt": {"epochs": 2, "checkpoint_every": 1},
}


def _make_optimizer(stage: str, model: nn.Module, n_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    if stage == "pretrain":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_steps)
    if stage == "finetune":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2), None
    return torch.optim.SGD(model.parameters(), lr=5e-3), None


def train(
    data: DigitsData,
    run: Run | NullRun,
    *,
    seed: int = 0,
    progress: bool = False,
    stages: dict[str, dict[str, Any]] = STAGES,
    batch_size: int = BATCH_SIZE,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Train the stages (name -> epochs, checkpoint_every); every recorder call is on `run` (a `NullRun` records
    nothing).  `device` holds the model and each batch (the sample ids stay on the CPU); the bundled run and its
    replay use the CPU, where they are bit for bit."""
    torch.manual_seed(seed)
    model = DigitsCNN().to(device)
    val = data.split == "val"
    x_val, y_val = data.x[val].to(device), data.y[val].to(device)
    step = 0
    for stage_no, (stage, cfg) in enumerate(stages.items()):
        loader = _loader(data, data.subsets[stage], seed + 1000 * stage_no, batch_size)
        n_steps = cfg["epochs"] * len(loader)
        opt, sched = _make_optimizer(stage, model, n_steps)
        with run.stage(stage, optimizer=opt, scheduler=sched, model=model, epochs=cfg["epochs"]):
            for epoch in range(cfg["epochs"]):
                for ids, x, y in _iter(loader, progress, f"{stage} epoch {epoch + 1}/{cfg['epochs']}"):
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
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


def _iter(loader: DataLoader, progress: bool, desc: str) -> Iterator[Any]:
    if not progress:
        return iter(loader)
    from tqdm.auto import tqdm

    return iter(tqdm(loader, desc=desc, leave=False))


def record_dataset(run: Run | NullRun, data: DigitsData) -> None:
    """Register every sample (content hash of the raw uint8 image, thumbnail) and the preprocessing applied."""
    for split in ("train", "val", "test"):
        idx = np.flatnonzero(data.split == split)
        run.register_samples(
            data.ids[idx],
            split=split,
            labels=data.y[idx].numpy(),
            raw=data.raw[idx],
            thumbnails=thumbnails(data.raw[idx]),
            thumbnail_scale=4,
            source="sklearn.datasets.load_digits",
        )
    run.log_transform("scale", data.ids, divisor=16.0)
    run.log_transform("standardize", data.ids, mean=data.mean, std=data.std, fitted_on="train")
    finetune = data.subsets["finetune"]
    run.annotate_samples(
        finetune, "label_flipped", (data.y[finetune].numpy() != data.true_y[finetune]).tolist()
    )
    run.annotate_samples(finetune, "true_label", data.true_y[finetune].tolist())


def configure_determinism() -> None:
    torch.use_deterministic_algorithms(True)


def build(out_dir: str | Path, *, seed: int = 0, progress: bool = False, name: str = "digits-demo") -> Path:
    """Build the recorded sample run into `out_dir` (refuses a directory that already holds a run)."""
    configure_determinism()
    data = load_data(seed)
    config = {
        "pipeline": "sample_runs.digits_source",
        "seed": seed,
        "noise_rate": NOISE_RATE,
        "batch_size": BATCH_SIZE,
        "torch_threads": torch.get_num_threads(),
        "model": "sample_runs.digits:DigitsCNN",
        "inputs": "sample_runs.digits:model_inputs",
        "head_layer": "head",
    }
    with Run.create(out_dir, name=name, config=config) as run:
        record_dataset(run, data)
        train(data, run, seed=seed, progress=progress)
    return Path(out_dir)
