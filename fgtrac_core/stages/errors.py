"""The one-line errors stage analysis reports (all `FgtracError`s, so the CLI prints them without a traceback)."""

from __future__ import annotations

from fgtrac_core.errors import FgtracError


class StageAnalysisError(FgtracError):
    """A stage analysis cannot run on this run as recorded (unsupported optimizer, gradient accumulation...)."""


class MissingBoundaryStateError(StageAnalysisError):
    """A stage lacks the boundary checkpoint (parameters and optimizer state) that stage analysis needs."""


class ReplayMismatchError(StageAnalysisError):
    """Replaying the recorded batches did not reproduce the recorded parameters bit for bit."""
