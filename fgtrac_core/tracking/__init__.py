"""The recorder a training loop calls.

`Run` and its companions load torch on first use, so that the writer process
(`fgtrac_core.tracking._writer_process`) imports this package without it."""

from __future__ import annotations

from fgtrac_core._lazy import lazy_getattr

_LAZY = {
    "CheckpointRecord": "fgtrac_core.tracking.run",
    "Run": "fgtrac_core.tracking.run",
    "NullRun": "fgtrac_core.tracking.null",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["CheckpointRecord", "NullRun", "Run"]
