"""Seeds for the random numbers a model draws in training (dropout masks), so that replay can draw them again.

A model with dropout draws its masks from torch's global generator.  The masks are too large to record and the
generator's state (~5 KB) would cost more per step than the rest of the step's record, so for a stage whose model
draws random numbers the recorder reseeds torch's generator before every training forward pass of the model (a
forward pre-hook: in training mode, with gradients enabled) with a seed of its own.  The masks then depend only on
that seed, recorded with the optimizer step the forward fed (`optimizer_steps.forward_seeds`), and replay reseeds
before the same forward.  The stage's first seed is drawn from the loop's generator, each next one is the
SplitMix64 successor of the one before (drawing from a torch generator costs ~5 us, `torch.manual_seed` ~170 us
with its every-backend bookkeeping; the generator's own `manual_seed` ~2 us).

A recorded run stays as reproducible from the loop's own `torch.manual_seed` as it was (the seeds follow from the
generator it seeded), but it does not draw the same masks as the same loop without the recorder: recording such
a model changes which random numbers it trains with, not how they are distributed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def random_modules(model: nn.Module) -> list[str]:
    """The modules of `model` that draw random numbers in training, as ``name (p=...)``: dropout layers (any
    ``_DropoutNd``, ``AlphaDropout``...) with a non-zero rate."""
    return [
        f"{name} (p={module.p})"
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
    ]


_MASK64 = (1 << 64) - 1


def _successor(seed: int) -> int:
    """SplitMix64's next output after `seed` (a 64-bit mix: consecutive seeds share no structure), below 2**63."""
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def reseed(seed: int, devices: Any = ()) -> None:
    """Seed the CPU generator (and those of the CUDA `devices`) with `seed`, as before a recorded forward."""
    torch.default_generator.manual_seed(seed)
    for device in devices:
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)


class ForwardSeeds:
    """Reseeds torch's generator before each training forward of `model` (until `remove`); `take()` hands over
    the seeds of the forwards since the previous call (the recorder calls it at every optimizer step)."""

    def __init__(self, model: nn.Module) -> None:
        self._seeds: list[int] = []
        self._last: int | None = None
        self._devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
        self._handle = model.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():  # not an evaluation (eval mode or under no_grad)
            if self._last is None:  # from the generator the loop seeded
                seed = int(torch.empty((), dtype=torch.int64).random_())
            else:
                seed = _successor(self._last)
            reseed(seed, self._devices)
            self._last = seed
            self._seeds.append(seed)

    def take(self) -> list[int]:
        seeds, self._seeds = self._seeds, []
        return seeds

    def remove(self) -> None:
        self._handle.remove()
