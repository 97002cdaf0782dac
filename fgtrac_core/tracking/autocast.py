"""Whether a stage's training forwards ran under ``torch.autocast`` (mixed precision), so that replay runs them
under it too.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` a model's matmuls run in bfloat16, and replay in float32
would diverge from the recording within a step or two.  Autocast is a thread-local state of the loop, visible
only while the model's forward runs, so `AutocastProbe` is a forward pre-hook on the model that reads it at the
stage's first training forward (training mode, gradients enabled) and removes itself: a per-forward hook for a
fact that a loop sets once costs every step for nothing.  What it saw goes into the stage's later checkpoint
files (``"autocast"``), which replay reads from the stage's end checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class AutocastProbe:
    """Reads autocast at `model`'s first training forward (until `remove`); `seen` is then None (full precision)
    or ``{"device_type": "cpu", "dtype": "bfloat16"}``."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: dict[str, str] | None = None
        devices = {p.device.type for p in model.parameters()} or {"cpu"}
        self._device_type = "cuda" if "cuda" in devices else next(iter(sorted(devices)))
        self._handle: Any = model.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if torch.is_autocast_enabled(self._device_type):
            dtype = torch.get_autocast_dtype(self._device_type)
            self.seen = {"device_type": self._device_type, "dtype": str(dtype).removeprefix("torch.")}
        self.remove()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def autocast_context(recorded: dict[str, str] | None) -> Any:
    """The ``torch.autocast`` context a recorded `seen` describes (a disabled one for None)."""
    if not recorded:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(recorded["device_type"], dtype=getattr(torch, recorded["dtype"]))


def describe(recorded: dict[str, str] | None) -> str:
    """``torch.autocast(cpu, bfloat16)``, for messages."""
    return "" if not recorded else f"torch.autocast({recorded['device_type']}, {recorded['dtype']})"
