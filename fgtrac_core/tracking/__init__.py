"""The recorder a training loop calls."""

from fgtrac_core.tracking.null import NullRun
from fgtrac_core.tracking.run import CheckpointRecord, Run

__all__ = ["CheckpointRecord", "NullRun", "Run"]
