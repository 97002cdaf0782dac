"""A scaled variant of the digits sample run for dashboard benchmarks: 50,000 training samples, augmented.

The 1,257 digits training images are augmented (random one-pixel shifts, additive noise) into `n_train` distinct
samples; validation and test sets are augmented from their own originals in the same way, so no augmented test
image derives from a training original.  Same model, three stages, label flips in ``finetune`` and recorder calls
as `sample_runs.digits`, with fewer epochs and larger batches.  Deterministic under a seed; `fgtrac verify`
re-derives every sample from the source through `source_content_hashes`.

    python -m sample_runs.digits_large OUT_DIR [--n-train 50000]   # then: fgtrac influence OUT_DIR --k 20
"""

from __future__ import annotations

import argparse
import functools
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgtrac_core.tracking import NullRun, Run
from sample_runs import digits
from sample_runs.digits_source import load_raw

N_TRAIN, N_VAL, N_TEST = 50_000, 1_000, 2_000
BATCH_SIZE = 256
STAGES: dict[str, dict[str, Any]] = {
    "pretrain": {"epochs": 3, "fraction": 0.45, "checkpoint_every": 1},
    "finetune": {"epochs": 2, "fraction": 0.45, "checkpoint_every": 1},
    "adapt": {"epochs": 1, "fraction": 0.10, "checkpoint_every": 1},
}


def _augment(raw: np.ndarray, sources: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Copies of `raw[sources]`, each shifted by up to one pixel each way and given integer noise (0..16)."""
    out = np.zeros((len(sources), 8, 8), np.int16)
    shifts = rng.integers(-1, 2, size=(len(sources), 2))
    for dy, dx in np.unique(shifts, axis=0):
        mask = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
        out[mask] = np.roll(raw[sources[mask]], (dy, dx), axis=(1, 2))
    noise = rng.integers(0, 3, size=out.shape)
    return np.clip(out + noise, 0, 16).astype(np.uint8)


@functools.lru_cache(maxsize=2)
def generate(seed: int = 0, n_train: int = N_TRAIN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw uint8 images, true labels, split) for every sample id, derived deterministically from the source."""
    raw, y = load_raw()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(raw))
    originals = {"test": order[:360], "val": order[360:540], "train": order[540:]}
    sizes = {"train": n_train, "val": N_VAL, "test": N_TEST}
    images, labels, split = [], [], []
    for name in ("train", "val", "test"):
        sources = rng.choice(originals[name], size=sizes[name], replace=True)
        images.append(_augment(raw, sources, rng))
        labels.append(y[sources])
        split += [name] * sizes[name]
    return np.concatenate(images), np.concatenate(labels), np.array(split, dtype=object)


def source_content_hashes() -> dict[int, str]:
    """SHA-256 of every sample's raw bytes, re-derived from the source (what `fgtrac verify` re-hashes; it
    knows the default seed and size only, so a run built with others reports its samples as changed)."""
    raw, _, _ = generate()
    return {i: hashlib.sha256(np.ascontiguousarray(r).tobytes()).hexdigest() for i, r in enumerate(raw)}


def load_data(seed: int = 0, n_train: int = N_TRAIN) -> digits.DigitsData:
    """The generated samples as `digits.DigitsData`: ~10% of the finetune subset's labels flipped."""
    raw, true_y, split = generate(seed, n_train)
    rng = np.random.default_rng(seed + 1)
    train = rng.permutation(np.flatnonzero(split == "train"))
    cut = np.cumsum([round(cfg["fraction"] * len(train)) for cfg in STAGES.values()])
    subsets = {name: np.sort(part) for name, part in zip(STAGES, np.split(train, cut[:-1]), strict=True)}
    y = true_y.copy()
    finetune = subsets["finetune"]
    flipped = rng.choice(finetune, size=round(digits.NOISE_RATE * len(finetune)), replace=False)
    y[flipped] = (true_y[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    scaled = raw.astype(np.float32) / 16.0
    mean, std = float(scaled[split == "train"].mean()), float(scaled[split == "train"].std())
    return digits.DigitsData(
        ids=np.arange(len(raw), dtype=np.int64),
        raw=raw,
        x=torch.from_numpy((scaled - mean) / std).unsqueeze(1),
        y=torch.from_numpy(y),
        true_y=true_y,
        split=split,
        subsets=subsets,
        mean=mean,
        std=std,
    )


@functools.lru_cache(maxsize=2)
def _cached_data(seed: int, n_train: int) -> digits.DigitsData:
    return load_data(seed, n_train)


def model_inputs(config: dict[str, Any], sample_ids: np.ndarray) -> torch.Tensor:
    """The standardised model inputs of these sample ids (the run config's `inputs`)."""
    data = _cached_data(int(config.get("seed", 0)), int(config.get("n_train", N_TRAIN)))
    return data.x[torch.from_numpy(np.array(sample_ids, dtype=np.int64))]


def train(data: digits.DigitsData, run: Run | NullRun, *, seed: int = 0) -> torch.nn.Module:
    """The sample run's loop and optimizers on the scaled data, one checkpoint per epoch."""
    return digits.train(data, run, seed=seed, stages=STAGES, batch_size=BATCH_SIZE)


def build(out_dir: str | Path, *, seed: int = 0, n_train: int = N_TRAIN, name: str = "digits-large") -> Path:
    """Record the scaled run into `out_dir` (refuses a directory that already holds a run)."""
    digits.configure_determinism()
    data = load_data(seed, n_train)
    config = {
        "pipeline": "sample_runs.digits_large",
        "seed": seed,
        "n_train": n_train,
        "noise_rate": digits.NOISE_RATE,
        "batch_size": BATCH_SIZE,
        "torch_threads": torch.get_num_threads(),
        "model": "sample_runs.digits:DigitsCNN",
        "inputs": "sample_runs.digits_large:model_inputs",
        "head_layer": "head",
    }
    with Run.create(out_dir, name=name, config=config) as run:
        digits.record_dataset(run, data)
        train(data, run, seed=seed)
    return Path(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="run directory to create")
    parser.add_argument("--n-train", type=int, default=N_TRAIN)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.out, seed=args.seed, n_train=args.n_train)


if __name__ == "__main__":
    main()
