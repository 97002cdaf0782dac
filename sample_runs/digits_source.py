"""The digits sample run's source data, without torch: what the pipeline ingests, and its content hashes.

`fgtrac verify` imports this (named in the run's config) to re-hash every sample from its source.
"""

from __future__ import annotations

import hashlib

import numpy as np
from sklearn.datasets import load_digits


def load_raw() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 images as uint8 (values 0..16, 8x8) and their true labels; sample id = row index."""
    digits = load_digits()
    return digits.images.astype(np.uint8), digits.target.astype(np.int64)


def source_content_hashes() -> dict[int, str]:
    """SHA-256 of every sample's raw bytes (C-order uint8 image), re-read from the source."""
    raw, _ = load_raw()
    return {i: hashlib.sha256(np.ascontiguousarray(r).tobytes()).hexdigest() for i, r in enumerate(raw)}
