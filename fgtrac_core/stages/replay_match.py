"""How closely a replay must reproduce the recorded run: bit for bit, or within a relative tolerance.

Replay is bit-exact wherever the machine computes each kernel the same way twice.  Some CPU kernels do not: their
rounding depends on where the allocator put their operands (LayerNorm's does, measured on this machine: the same
loop, run twice with a different allocation before it, parts in the last bits from some step on), so a pipeline
using them cannot be replayed bit for bit however faithfully it was recorded.  A difference that small is told
apart from a recorded fact the loop did not follow (an lr, a batch, a target, a clipping rule), whose effect on the
updated parameters is many orders of magnitude larger, by its size: `ROUNDING_LEVEL`.

`Training.tolerance` (``--tolerance`` on the command line; 0: bit for bit) accepts a replay whose parameters stay
within that relative difference of the recorded ones — per step by the parameter fingerprints, at every stage end,
carried optimizer state and the final model tensor by tensor — and `Training.deviation` keeps the largest
relative difference accepted (of a fingerprint, or of a tensor: its largest absolute difference over its largest
recorded magnitude), which the analyses store beside their results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fgtrac_core.errors import FgtracError

ROUNDING_LEVEL = 1e-6
"""Relative fingerprint differences up to this are float rounding (float32's unit roundoff is 6e-8), not a fact."""

_FINGERPRINT_EXACT = 1e-12  # float64 summation order of the fingerprint itself


def require_tolerance(tolerance: float) -> None:
    """Refuse a tolerance that is not a finite relative difference in [0, 1)."""
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and 0 <= tolerance < 1):
        raise FgtracError(f"tolerance must be a relative difference in [0, 1) (0: bit for bit), not {tolerance!r}")


def deviation_text(tolerance: float, deviation: float) -> str:
    """How closely a replay followed the recording, in words (for the command line)."""
    if deviation == 0:
        return "replay reproduced the recorded parameters bit for bit"
    return (
        f"replay reproduced the recorded parameters within a relative difference of {deviation:.2g} "
        f"(--tolerance {tolerance:g}): not bit for bit"
    )


def fingerprint_gap(recorded: float, replayed: float) -> float:
    """The relative difference of two parameter fingerprints (`fgtrac_core.tracking.optimizer_hooks`)."""
    return abs(recorded - replayed) / max(1.0, abs(recorded))


def fingerprints_differ(recorded: float, replayed: float, tolerance: float = 0.0) -> bool:
    """True when two fingerprints cannot come from the same parameters (float64 summation order aside), or, with a
    `tolerance`, from parameters within that relative difference."""
    return fingerprint_gap(recorded, replayed) > max(_FINGERPRINT_EXACT, tolerance)


@dataclass(frozen=True)
class Difference:
    """How far replayed tensors are from recorded ones: the largest absolute difference, and the largest of each
    tensor's absolute difference over its largest recorded magnitude (inf for a missing or reshaped tensor)."""

    absolute: float
    relative: float

    def within(self, tolerance: float) -> bool:
        return tolerance > 0 and self.relative <= tolerance

    def text(self, tolerance: float) -> str:
        """'max abs difference 3e-07' (bit for bit asked), or with the relative one and the tolerance it exceeds."""
        if tolerance <= 0:
            return f"max abs difference {self.absolute:.3g}"
        return (
            f"max abs difference {self.absolute:.3g}, relative {self.relative:.3g}, over the tolerance "
            f"{tolerance:g}"
        )


def difference(replayed: dict[str, torch.Tensor], recorded: dict[str, torch.Tensor]) -> Difference | None:
    """None when `replayed` and `recorded` hold the same names and bitwise equal tensors, else their `Difference`
    (infinite when a name is missing on either side)."""
    if replayed.keys() != recorded.keys():
        return Difference(float("inf"), float("inf"))
    if all(torch.equal(torch.as_tensor(replayed[k]), torch.as_tensor(recorded[k])) for k in recorded):
        return None
    absolute = relative = 0.0
    for k, want in recorded.items():
        want, got = torch.as_tensor(want), torch.as_tensor(replayed[k])
        if got.shape != want.shape:
            return Difference(float("inf"), float("inf"))
        if not want.is_floating_point():  # a step count: equal or not
            if not torch.equal(got, want):
                return Difference(float("inf"), float("inf"))
            continue
        gap = float((got.double() - want.double()).abs().max()) if want.numel() else 0.0
        scale = float(want.double().abs().max()) if want.numel() else 0.0
        absolute = max(absolute, gap)
        relative = max(relative, gap / scale if scale > 0 else (0.0 if gap == 0 else float("inf")))
    return Difference(absolute, relative)
