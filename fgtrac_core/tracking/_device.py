"""Values logged on an accelerator during training, fetched to the host later, in one transfer per device."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def fetch_to_host(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[np.ndarray]:
    """Host copies (flattened, as `dtype`) of tensors logged during training: one transfer per device rather than
    one device sync per tensor."""
    out: list[np.ndarray] = [np.empty(0)] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for rows in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1).to(dtype) for i in rows]).cpu().numpy()
        for i, part in zip(rows, np.split(flat, np.cumsum([tensors[i].numel() for i in rows])[:-1]), strict=True):
            out[i] = part
    return out
